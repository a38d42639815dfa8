package caddyoauthbroker

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

type discard struct{ h http.Header }

func (d *discard) Header() http.Header         { return d.h }
func (d *discard) Write(p []byte) (int, error) { return len(p), nil }
func (d *discard) WriteHeader(int)             {}

// BenchmarkServeHTTPWarm is the module's whole cost on a warm request, Caddy glue
// (placeholders) included, in front of a next handler that does nothing. Compare with
// flows' BenchmarkHandleWarm for what the glue adds.
func BenchmarkServeHTTPWarm(b *testing.B) {
	o := testenv.StartOP(b)
	ctx, _ := provisionContext(b)
	cfg := progressiveConfig()
	cfg["issuer"] = o.Issuer
	cfg["client_id"] = testenv.BrokerClientID
	cfg["client_secret"] = testenv.BrokerClientSecret
	cfg["delegation"] = map[string]any{"mode": "token_exchange", "audience": "nextcloud"}
	cfg["tool_scopes"] = []any{map[string]any{"tool": "notes_read", "scopes": []string{"notes:read"}}}
	h, err := load(b, ctx, cfg)
	if err != nil {
		b.Fatal(err)
	}
	claims := o.AccessTokenClaims(o.User.Subject, "https://mcp.example.com/mcp")
	claims["scope"] = "openid notes:read"
	token := o.MintJWT(claims)
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read","arguments":{}}}`
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })
	request := func() *http.Request {
		r := httptest.NewRequest(http.MethodPost, "https://mcp.example.com/mcp", strings.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+token)
		r.Header.Set("Content-Type", "application/json")
		return caddyhttp.PrepareRequest(r, caddy.NewReplacer(), nil, nil)
	}
	w := &discard{h: http.Header{}}
	if err := h.ServeHTTP(w, request(), next); err != nil {
		b.Fatal(err)
	}
	reqs := make([]*http.Request, b.N)
	for i := range reqs {
		reqs[i] = request()
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := h.ServeHTTP(w, reqs[i], next); err != nil {
			b.Fatal(err)
		}
	}
}
