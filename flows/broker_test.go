package flows

import (
	"bytes"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"testing"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

func TestMain(m *testing.M) {
	// The example OP logs every request at INFO through slog's default logger.
	slog.SetLogLoggerLevel(slog.LevelWarn)
	os.Exit(m.Run())
}

// testResource is the MCP endpoint the brokers of these tests protect.
const testResource = verifierResource

// newTestBroker builds a progressive-mode broker for o on file storage, after change.
func newTestBroker(t testing.TB, o *testenv.OP, change func(*Config)) *Broker {
	t.Helper()
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Mode:           ModeProgressive,
		Issuer:         o.Issuer,
		ClientID:       testenv.BrokerClientID,
		ClientSecret:   testenv.BrokerClientSecret,
		Resource:       testResource,
		Scopes:         []string{"openid", "notes:read", "notes:write", "offline_access"},
		DelegationMode: DelegationNone,
		Clients: []ClientConfig{{
			ClientID:     testenv.NativeClientID,
			Name:         "Native Test Client",
			RedirectURIs: []string{"http://127.0.0.1/callback", "https://app.example.com/cb"},
		}},
		ToolScopes: []ToolScopeRule{{Tool: "notes_write", Scopes: []string{"notes:write"}}},
		Records:    storage.New(&certmagic.FileStorage{Path: t.TempDir()}, ring),
	}
	if change != nil {
		change(&cfg)
	}
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// startFront serves b in front of upstream the way the Caddy module does: the broker
// first, then a reverse proxy with the request the broker passes on.
func startFront(t testing.TB, b *Broker, upstream string) *httptest.Server {
	t.Helper()
	target, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	proxy := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(&url.URL{Scheme: target.Scheme, Host: target.Host})
	}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if pass, who := b.Handle(w, r); pass != nil {
			g := b.GuardResponse(w, pass, who)
			defer g.Release()
			proxy.ServeHTTP(g, pass)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}
