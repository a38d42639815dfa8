package caddyoauthbroker

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/modelcontextprotocol/go-sdk/oauthex"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

func TestMain(m *testing.M) {
	// The example OP logs every request at INFO through slog's default logger.
	slog.SetLogLoggerLevel(slog.LevelWarn)
	os.Exit(m.Run())
}

// freePort finds a loopback port nobody listens on.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startCaddy runs a whole Caddy in this process with handler in front of a reverse
// proxy to upstream, on a loopback port, with its own file storage. It returns the
// site's base URL.
func startCaddy(t *testing.T, port int, handler map[string]any, upstream string) string {
	t.Helper()
	up, _ := url.Parse(upstream)
	return startCaddyWith(t, port, handler, map[string]any{"handler": "reverse_proxy", "upstreams": []any{map[string]any{"dial": up.Host}}})
}

// startCaddyWith is startCaddy with any handler after mcp_oauth.
func startCaddyWith(t *testing.T, port int, handler, next map[string]any) string {
	t.Helper()
	handler["handler"] = "mcp_oauth"
	return startCaddyRoutes(t, port, []any{map[string]any{"handle": []any{handler, next}}})
}

// startCaddyRoutes is startCaddy with the server's routes.
func startCaddyRoutes(t *testing.T, port int, routes []any) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mcp_oauth-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"storage": map[string]any{"module": "file_system", "root": dir},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"mcp": map[string]any{
			"listen":          []string{fmt.Sprintf("127.0.0.1:%d", port)},
			"automatic_https": map[string]any{"disable": true},
			"routes":          routes,
		}}}},
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(raw, true); err != nil {
		t.Fatalf("loading Caddy config: %v", err)
	}
	t.Cleanup(func() { caddy.Stop() })
	return fmt.Sprintf("http://127.0.0.1:%d", port)
}

// connectSteppingUp connects a go-sdk client (the native test client) to base's /mcp
// through Caddy, logging test-user in at o wherever it is sent (visited records where).
// It starts read-only, so that the write tool needs a step-up, then takes what is
// challenged.
func connectSteppingUp(t *testing.T, o *testenv.OP, base, name string, visited *[]string) *mcp.ClientSession {
	t.Helper()
	handler, err := auth.NewAuthorizationCodeHandler(&auth.AuthorizationCodeHandlerConfig{
		PreregisteredClient:      &oauthex.ClientCredentials{ClientID: testenv.NativeClientID},
		RedirectURL:              "http://127.0.0.1:49152/callback",
		AuthorizationCodeFetcher: fetcherFor(o, visited),
		ScopeFilter: func(discovered []string) []string {
			if len(*visited) == 0 {
				return []string{"openid", "notes:read"}
			}
			return discovered
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	client := mcp.NewClient(&mcp.Implementation{Name: name, Version: "1"}, nil)
	session, err := client.Connect(t.Context(), &mcp.StreamableClientTransport{
		Endpoint: base + "/mcp", OAuthHandler: handler, DisableStandaloneSSE: true,
	}, nil)
	if err != nil {
		t.Fatalf("connecting through Caddy: %v", err)
	}
	return session
}

// fetcherFor logs test-user in at o wherever the client is sent, and hands back the code.
func fetcherFor(o *testenv.OP, visited *[]string) auth.AuthorizationCodeFetcher {
	return func(ctx context.Context, args *auth.AuthorizationArgs) (*auth.AuthorizationResult, error) {
		*visited = append(*visited, args.URL)
		cb, err := o.Login(ctx, args.URL)
		if err != nil {
			return nil, err
		}
		q := cb.Query()
		return &auth.AuthorizationResult{Code: q.Get("code"), State: q.Get("state"), Iss: q.Get("iss")}, nil
	}
}

// TestProgressiveEndToEnd: a go-sdk MCP client with its OAuth handler, knowing only the
// MCP URL, discovers the IdP through the broker, logs in there directly (the progressive login), lists
// and calls tools through Caddy, steps up for a write tool, and the upstream never sees
// its token.
func TestProgressiveEndToEnd(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	port := freePort(t)
	resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
	base := startCaddy(t, port, map[string]any{
		"mode":            "progressive",
		"issuer":          o.Issuer,
		"client_id":       testenv.BrokerClientID,
		"client_secret":   testenv.BrokerClientSecret,
		"resource":        resource,
		"scopes":          []string{"openid", "notes:read", "notes:write"},
		"encryption_keys": []string{testKey},
		"clients":         []any{map[string]any{"client_id": testenv.NativeClientID, "redirect_uris": []string{"http://127.0.0.1/callback"}}},
		"delegation":      map[string]any{"mode": "none"},
		"tool_scopes":     []any{map[string]any{"tool": "notes_write", "scopes": []string{"notes:write"}}},
	}, up.URL)

	var visited []string
	session := connectSteppingUp(t, o, base, "e2e", &visited)
	defer session.Close()

	if len(visited) != 1 || !strings.HasPrefix(visited[0], o.AuthorizationEndpoint+"?") {
		t.Fatalf("the client was sent to %v, want the IdP's authorization endpoint", visited)
	}
	if q, _ := url.Parse(visited[0]); q.Query().Get("resource") != resource {
		t.Errorf("the client asked for resource %q, want %q", q.Query().Get("resource"), resource)
	}
	tools, err := session.ListTools(t.Context(), nil)
	if err != nil || len(tools.Tools) == 0 {
		t.Fatalf("tools/list: %v", err)
	}
	res, err := session.CallTool(t.Context(), &mcp.CallToolParams{Name: "whoami"})
	if err != nil || res.IsError {
		t.Fatalf("whoami: %v", err)
	}
	var who testenv.Identity
	if err := json.Unmarshal([]byte(res.Content[0].(*mcp.TextContent).Text), &who); err != nil {
		t.Fatal(err)
	}
	if who.Subject != o.User.Subject {
		t.Errorf("upstream saw %q, want %q", who.Subject, o.User.Subject)
	}

	// The write tool: 403 insufficient_scope, the SDK re-authorizes with the union, retries.
	res, err = session.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "hi"}})
	if err != nil || res.IsError {
		t.Fatalf("notes_write after step-up: %v %+v", err, res)
	}
	if len(visited) != 2 {
		t.Fatalf("want one step-up authorization, got %d logins", len(visited))
	}
	if q, _ := url.Parse(visited[1]); !strings.Contains(q.Query().Get("scope"), "notes:write") {
		t.Errorf("step-up asked for %q", q.Query().Get("scope"))
	}

	for _, r := range up.Seen() {
		if r.Header.Get("Authorization") != "" {
			t.Errorf("upstream received an Authorization header (%s %s)", r.Method, r.RPCMethod)
		}
		if r.SubjectHeader != o.User.Subject {
			t.Errorf("upstream subject header %q", r.SubjectHeader)
		}
	}
}

// TestProgressiveAuthorizeThroughCaddy: the broker's own progressive authorization endpoint, reached through
// Caddy, sends the browser to the IdP and refuses W1's redirect URI.
func TestProgressiveAuthorizeThroughCaddy(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	port := freePort(t)
	base := startCaddy(t, port, map[string]any{
		"mode":            "progressive",
		"issuer":          o.Issuer,
		"public_issuer":   "https://cloud.example.com",
		"client_id":       testenv.BrokerClientID,
		"client_secret":   testenv.BrokerClientSecret,
		"resource":        fmt.Sprintf("http://127.0.0.1:%d/mcp", port),
		"encryption_keys": []string{testKey},
		"clients":         []any{map[string]any{"client_id": testenv.NativeClientID, "redirect_uris": []string{"http://127.0.0.1/callback"}}},
		"delegation":      map[string]any{"mode": "none"},
	}, up.URL)
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	q := url.Values{
		"response_type": {"code"}, "client_id": {testenv.NativeClientID}, "state": {"s"},
		"code_challenge": {"E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"}, "code_challenge_method": {"S256"},
	}
	q.Set("redirect_uri", "http://localhost:@evil.com/cb")
	resp, err := noRedirect.Get(base + "/oauth/authorize?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
		t.Errorf("W1 redirect: %s to %q", resp.Status, resp.Header.Get("Location"))
	}
	q.Set("redirect_uri", "http://127.0.0.1:5000/callback")
	resp, err = noRedirect.Get(base + "/oauth/authorize?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusFound || !strings.HasPrefix(loc, "https://cloud.example.com/") {
		t.Errorf("good request: %s to %q", resp.Status, loc)
	}
}

// TestPlaceholders: later handlers see who the request is for, as with caddyauth.
func TestPlaceholders(t *testing.T) {
	o := testenv.StartOP(t)
	port := freePort(t)
	resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
	base := startCaddyWith(t, port, map[string]any{
		"mode":            "progressive",
		"issuer":          o.Issuer,
		"client_id":       testenv.BrokerClientID,
		"client_secret":   testenv.BrokerClientSecret,
		"resource":        resource,
		"encryption_keys": []string{testKey},
		"delegation":      map[string]any{"mode": "none"},
	}, map[string]any{
		"handler": "static_response",
		"body":    "{http.auth.user.id}|{http.auth.user.scopes}|{http.auth.user.client_id}|{http.request.header.Authorization}",
	})
	claims := o.AccessTokenClaims(o.User.Subject, resource)
	claims["scope"] = "openid notes:read"
	claims["client_id"] = "some-client"
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, base+"/mcp", nil)
	req.Header.Set("Authorization", "Bearer "+o.MintJWT(claims))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if want := o.User.Subject + "|openid notes:read|some-client|"; string(body) != want {
		t.Errorf("placeholders gave %q, want %q", body, want)
	}
}

// TestRefusalsBypassHandleErrors: the broker answers a refusal itself, so a server's
// handle_errors routes, which do answer the upstream's errors, never replace the challenge
// MCP clients discover the authorization server by (the Handler's doc comment).
func TestRefusalsBypassHandleErrors(t *testing.T) {
	port := freePort(t)
	resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
	cfg, _ := json.Marshal(map[string]any{
		"admin":   map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"storage": map[string]any{"module": "file_system", "root": t.TempDir()},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"mcp": map[string]any{
			"listen":          []string{fmt.Sprintf("127.0.0.1:%d", port)},
			"automatic_https": map[string]any{"disable": true},
			"routes": []any{map[string]any{
				"match":  []any{map[string]any{"path": []string{"/broken"}}},
				"handle": []any{map[string]any{"handler": "error", "status_code": 502, "error": "broken"}},
			}, map[string]any{"handle": []any{map[string]any{
				"handler":         "mcp_oauth",
				"issuer":          "https://idp.example.com",
				"client_id":       "broker",
				"resource":        resource,
				"encryption_keys": []string{testKey},
				"delegation":      map[string]any{"mode": "none"},
			}, map[string]any{"handler": "static_response", "body": "upstream"}}}},
			"errors": map[string]any{"routes": []any{map[string]any{"handle": []any{map[string]any{
				"handler": "static_response", "status_code": 418, "body": "handled by handle_errors",
			}}}}},
		}}}},
	})
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading Caddy config: %v", err)
	}
	t.Cleanup(func() { caddy.Stop() })

	do := func(bearer string, path ...string) (*http.Response, string) {
		target := resource
		if len(path) > 0 {
			target = fmt.Sprintf("http://127.0.0.1:%d%s", port, path[0])
		}
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, target, strings.NewReader(`{}`))
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, string(body)
	}
	resp, body := do("")
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `resource_metadata="`) || strings.Contains(body, "handled") {
		t.Errorf("no token: %d %q %q, want the broker's 401 challenge", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body)
	}
	resp, body = do("mcpat_not-a-token")
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) || !strings.Contains(body, `"error":"invalid_token"`) {
		t.Errorf("a bad token: %d %q %q, want the broker's 401 invalid_token", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body)
	}
	// Another handler's error does reach handle_errors: the routes are live.
	resp, body = do("", "/broken")
	if resp.StatusCode != http.StatusTeapot || body != "handled by handle_errors" {
		t.Errorf("another handler's error: %d %q, want handle_errors' answer", resp.StatusCode, body)
	}
}
