package caddyoauthbroker

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/internal/upgradefixture"
)

// flowsUpgradeDir is the storage an earlier release wrote, and fixture.json describing it
// (flows' TestWriteUpgradeFixture).
const flowsUpgradeDir = "../flows/testdata/upgrade"

// TestUpgradeCaddyfile adapts the Caddyfile of the release before issue 11's refactoring
// (testdata/upgrade/Caddyfile, every subdirective form it had) and provisions its two
// handlers with this release as Caddy does, the first over a copy of the storage that
// release wrote. Through the module, the stored offline access grant still yields background
// tokens, and the dynamically registered and configured clients are still known. A
// directive renamed later must keep this passing, as a deprecated alias: adapting may warn.
func TestUpgradeCaddyfile(t *testing.T) {
	fx, dir := upgradefixture.Load(t, flowsUpgradeDir)
	o := testenv.StartOP(t)
	t.Setenv("MCP_OAUTH_UPGRADE_ISSUER", o.Issuer)
	t.Setenv("MCP_OAUTH_UPGRADE_SECRET", testenv.BrokerClientSecret)
	t.Setenv("MCP_OAUTH_UPGRADE_KEY", fx.EncryptionKey)

	const caddyfile = "testdata/upgrade/Caddyfile"
	in, err := os.ReadFile(caddyfile)
	if err != nil {
		t.Fatal(err)
	}
	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(in, map[string]any{"filename": caddyfile})
	if err != nil {
		t.Fatalf("adapting the Caddyfile of the earlier release: %v", err)
	}
	for _, w := range warnings {
		t.Logf("adapting: %s", w.String())
	}
	var cfg any
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	handlers := mcpOAuthHandlers(cfg)
	if len(handlers) != 2 {
		t.Fatalf("found %d mcp_oauth handlers in the adapted config, want 2", len(handlers))
	}

	// The records were written at fx.WrittenAt; their clock stays a minute after it, so
	// that they are as live as when the earlier release left them.
	clock := func() time.Time { return fx.WrittenAt.Add(time.Minute) }
	ctx, _ := provisionContext(t)
	var site, progressive *Handler
	for _, js := range handlers {
		delete(js, "handler")
		if _, ok := js["storage"]; ok {
			js["storage"] = map[string]any{"module": "file_system", "root": dir}
		}
		raw, err := json.Marshal(js)
		if err != nil {
			t.Fatal(err)
		}
		h := new(Handler)
		// As Caddy loads a module: unknown fields are an error.
		if err := caddy.StrictUnmarshalJSON(raw, h); err != nil {
			t.Fatalf("decoding the adapted handler: %v", err)
		}
		h.now = clock
		if err := h.Provision(ctx); err != nil {
			t.Fatalf("provisioning %s: %v", h.Resource, err)
		}
		t.Cleanup(func() { h.Cleanup() })
		if err := h.Validate(); err != nil {
			t.Fatalf("validating %s: %v", h.Resource, err)
		}
		switch h.Resource {
		case fx.Resource:
			site = h
		case "https://progressive.example.test/mcp":
			progressive = h
		}
	}
	if site == nil || progressive == nil {
		t.Fatalf("the adapted handlers are not the fixture's two sites")
	}

	t.Run("the stored offline access grant yields background tokens", func(t *testing.T) {
		o.SeedRefreshToken(fx.OfflineRefreshToken, testenv.BrokerClientID, fx.Subject, fx.OfflineScopes)
		for i := range 2 { // the second uses the IdP refresh token the first one rotated in
			r := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/background-token",
				strings.NewReader(url.Values{"subject": {fx.Subject}}.Encode()))
			r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			r.SetBasicAuth(fx.WorkerID, fx.WorkerSecret)
			w := serve(t, site, r)
			var tok struct {
				AccessToken string `json:"access_token"`
			}
			if err := json.Unmarshal(w.Body.Bytes(), &tok); w.Code != http.StatusOK || err != nil || tok.AccessToken == "" {
				t.Fatalf("background token %d: %d %s", i+1, w.Code, w.Body)
			}
		}
	})

	t.Run("the registered and the configured clients are known", func(t *testing.T) {
		for _, c := range []struct{ id, redirect string }{
			{fx.ClientID, fx.RedirectURI},
			{"claude-desktop", "https://claude.ai/api/mcp/auth_callback"},
		} {
			q := url.Values{
				"response_type":         {"code"},
				"client_id":             {c.id},
				"redirect_uri":          {c.redirect},
				"code_challenge":        {oauth2.S256ChallengeFromVerifier(oauth2.GenerateVerifier())},
				"code_challenge_method": {"S256"},
				"state":                 {"st"},
			}
			w := serve(t, site, httptest.NewRequest(http.MethodGet, "https://mcp.example.test/oauth/authorize?"+q.Encode(), nil))
			if loc, _ := url.Parse(w.Header().Get("Location")); w.Code != http.StatusFound || loc == nil || loc.Path != "/oauth/consent" {
				t.Errorf("authorization request of %s: %d to %q", c.id, w.Code, w.Header().Get("Location"))
			}
		}
	})

	t.Run("the progressive site asks for a token", func(t *testing.T) {
		w := serve(t, progressive, httptest.NewRequest(http.MethodPost, "https://progressive.example.test/mcp", strings.NewReader("{}")))
		if w.Code != http.StatusUnauthorized || !strings.Contains(w.Header().Get("WWW-Authenticate"), "resource_metadata=") {
			t.Errorf("a request without a token: %d, WWW-Authenticate %q", w.Code, w.Header().Get("WWW-Authenticate"))
		}
	})
}

// serve passes r through h as Caddy's HTTP server would, with a next handler that
// answers 204, and returns the response.
func serve(t *testing.T, h *Handler, r *http.Request) *httptest.ResponseRecorder {
	t.Helper()
	w := httptest.NewRecorder()
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, nil)
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
	if err := h.ServeHTTP(w, r, next); err != nil {
		t.Fatal(err)
	}
	return w
}

// mcpOAuthHandlers finds the JSON objects of every mcp_oauth handler in an adapted
// config, however deep in routes and subroutes.
func mcpOAuthHandlers(v any) []map[string]any {
	var found []map[string]any
	switch x := v.(type) {
	case map[string]any:
		if x["handler"] == "mcp_oauth" {
			return []map[string]any{x}
		}
		for _, e := range x {
			found = append(found, mcpOAuthHandlers(e)...)
		}
	case []any:
		for _, e := range x {
			found = append(found, mcpOAuthHandlers(e)...)
		}
	}
	return found
}
