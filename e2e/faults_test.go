package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// kill ends caddy with SIGKILL, as a crash: no cleanup runs.
func (p *caddyProc) kill() {
	p.t.Helper()
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	_ = p.cmd.Wait()
	p.cmd = nil
}

// faultSite is a hybrid site delegating by token exchange, for the fault tests.
func faultSite(o *testenv.OP, upstream string) string {
	return hybridSite(o, upstream, "")
}

// redisStorage is the global storage option of caddy on srv.
func redisStorage(srv *testenv.RedisServer) caddyOption {
	return withGlobal("\tstorage mcp_oauth_redis {\n\t\taddresses " + srv.Addr + "\n\t}")
}

// browserCode walks a login from the authorize URL of cfg to the client's redirect URI
// and returns the code.
func browserCode(t *testing.T, br *browser, cfg oauth2.Config, verifier string) string {
	t.Helper()
	final, err := br.login(t.Context(), cfg.AuthCodeURL("st", oauth2.S256ChallengeOption(verifier)))
	if err != nil {
		t.Fatal(err)
	}
	code := final.Query().Get("code")
	if code == "" {
		t.Fatalf("no code: %s", final.Redacted())
	}
	return code
}

// clientConfig is the oauth2 configuration of a DCR client registered at base.
func clientConfig(t *testing.T, base string) oauth2.Config {
	return oauth2.Config{ClientID: dcrRegister(t, base), RedirectURL: "http://127.0.0.1/cb", Scopes: []string{"openid", "notes:read", "notes:write"},
		Endpoint: oauth2.Endpoint{AuthURL: base + "/oauth/authorize", TokenURL: base + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams}}
}

// mcpInitialize posts an MCP initialize with token and returns the answer.
func mcpInitialize(t *testing.T, base, token string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/mcp",
		strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("MCP request: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	return resp, string(body)
}

// TestFaultKillBetweenCallbackAndToken: caddy A is killed (SIGKILL) after the IdP's
// callback issued the client's code and before the client redeems it; B, on the same
// Redis, redeems the code, and the tokens work there.
func TestFaultKillBetweenCallbackAndToken(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the caddy binary; not with -short")
	}
	srv := testenv.Redis(t)
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
	resourcePort := freePort(t)
	site := strings.ReplaceAll(faultSite(o, up.URL), "resource http://127.0.0.1:{port}/mcp", fmt.Sprintf("resource http://127.0.0.1:%d/mcp", resourcePort))
	a := startCaddy(t, site, redisStorage(srv), withPort(resourcePort))
	b := startCaddy(t, site, redisStorage(srv))

	cfg := clientConfig(t, a.Base)
	verifier := oauth2.GenerateVerifier()
	code := browserCode(t, newBrowser(o), cfg, verifier)
	a.kill()

	cfg.Endpoint.TokenURL = b.Base + "/oauth/token"
	tok, err := cfg.Exchange(t.Context(), code, oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatalf("redeeming the code at B after A was killed: %v", err)
	}
	if resp, body := mcpInitialize(t, b.Base, tok.AccessToken); resp.StatusCode != http.StatusOK {
		t.Errorf("MCP at B: %s %.200s", resp.Status, body)
	}
	if _, err := cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: tok.RefreshToken}).Token(); err != nil {
		t.Errorf("refreshing at B: %v", err)
	}
}

// TestFaultRedisDown: Redis hangs (SIGSTOP), then stops, under a running caddy. What
// needs storage — a registration, an authorization request, a refresh, a cold
// verification of a token this caddy has not seen — answers 503 temporarily_unavailable
// with Retry-After (the authorization request: that error sent to the client) within
// bounded time; a warm MCP request (its verdict and delegated token in memory) goes on.
// Redis back (stopped, with what it had saved), the same caddy refreshes, verifies and logs
// in again.
func TestFaultRedisDown(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the caddy binary; not with -short")
	}
	srv := testenv.Redis(t)
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
	caddy := startCaddy(t, faultSite(o, up.URL), withGlobal("\tstorage mcp_oauth_redis {\n\t\taddresses "+srv.Addr+
		"\n\t\tdial_timeout 500ms\n\t\tread_timeout 500ms\n\t\twrite_timeout 500ms\n\t}"))

	cfg := clientConfig(t, caddy.Base)
	login := func() *oauth2.Token {
		t.Helper()
		verifier := oauth2.GenerateVerifier()
		code := browserCode(t, newBrowser(o), cfg, verifier)
		tok, err := cfg.Exchange(t.Context(), code, oauth2.VerifierOption(verifier))
		if err != nil {
			t.Fatalf("redeeming: %v", err)
		}
		return tok
	}
	warm := login()
	if resp, body := mcpInitialize(t, caddy.Base, warm.AccessToken); resp.StatusCode != http.StatusOK {
		t.Fatalf("MCP: %s %.200s", resp.Status, body)
	}
	refreshToken := warm.RefreshToken
	client := &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	read := func(resp *http.Response, err error) (*http.Response, string) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		return resp, string(b)
	}
	refresh := func() (*http.Response, string) {
		return read(client.PostForm(caddy.Base+"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "client_id": {cfg.ClientID}, "refresh_token": {refreshToken}}))
	}
	register := func() (*http.Response, string) {
		return read(client.Post(caddy.Base+"/oauth/register", "application/json", strings.NewReader(`{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`)))
	}
	authorize := func() (*http.Response, string) {
		return read(client.Get(cfg.AuthCodeURL("st", oauth2.S256ChallengeOption(oauth2.GenerateVerifier()))))
	}

	for _, fault := range []struct {
		name        string
		start, stop func()
	}{
		{"hung", srv.Pause, srv.Resume},
		{"stopped", func() {
			if out, err := srv.Do("SAVE"); err != nil || out != "+OK" {
				t.Fatalf("SAVE: %q %v", out, err)
			}
			srv.Stop()
		}, srv.Start},
	} {
		t.Run(fault.name, func(t *testing.T) {
			// A login whose access token this caddy verifies only later: cold, as the
			// token endpoint does not fill the verdict cache.
			cold := login()
			fault.start()
			for _, tc := range []struct {
				what    string
				request func() (*http.Response, string)
			}{
				{"a registration", register},
				{"an authorization request", authorize},
				{"a refresh", refresh},
				{"a cold verification", func() (*http.Response, string) { return mcpInitialize(t, caddy.Base, cold.AccessToken) }},
			} {
				start := time.Now()
				resp, body := tc.request()
				took := time.Since(start)
				if took > 10*time.Second {
					t.Errorf("%s with Redis %s took %v", tc.what, fault.name, took)
				}
				var e struct {
					Error string `json:"error"`
				}
				_ = json.Unmarshal([]byte(body), &e)
				status, retry := resp.StatusCode, resp.Header.Get("Retry-After")
				if loc, _ := url.Parse(resp.Header.Get("Location")); status == http.StatusFound && loc != nil {
					// The error sent to the client's redirect URI, which carries no header.
					status, e.Error, retry = http.StatusServiceUnavailable, loc.Query().Get("error"), "-"
				}
				if status != http.StatusServiceUnavailable || e.Error != "temporarily_unavailable" || retry == "" {
					t.Errorf("%s with Redis %s: %s %q Retry-After %q: %.200s", tc.what, fault.name, resp.Status, e.Error, retry, body)
				}
			}
			if resp, body := mcpInitialize(t, caddy.Base, warm.AccessToken); resp.StatusCode != http.StatusOK {
				t.Errorf("a warm MCP request with Redis %s: %s %.200s", fault.name, resp.Status, body)
			}

			fault.stop()
			deadline := time.Now().Add(20 * time.Second)
			for {
				resp, body := refresh()
				if resp.StatusCode == http.StatusOK {
					var tok struct {
						RefreshToken string `json:"refresh_token"`
					}
					_ = json.Unmarshal([]byte(body), &tok)
					refreshToken = tok.RefreshToken
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("a refresh after Redis came back: %s %.200s", resp.Status, body)
				}
				time.Sleep(200 * time.Millisecond)
			}
			if resp, body := mcpInitialize(t, caddy.Base, cold.AccessToken); resp.StatusCode != http.StatusOK {
				t.Errorf("the cold token after Redis came back: %s %.200s", resp.Status, body)
			}
			again := login()
			if resp, body := mcpInitialize(t, caddy.Base, again.AccessToken); resp.StatusCode != http.StatusOK {
				t.Errorf("a new login after Redis came back: %s %.200s", resp.Status, body)
			}
		})
	}
	caddy.assertLogsFree(warm.AccessToken, warm.RefreshToken, refreshToken, testKey)
}

// reload posts caddy's running configuration back to its admin API's /load, forcing a
// reload although nothing changed (Cache-Control: must-revalidate), as an operator's
// `caddy reload` does, and waits for it to complete.
func (p *caddyProc) reload(t *testing.T) {
	t.Helper()
	admin := "http://" + p.admin
	resp, err := http.Get(admin + "/config/")
	if err != nil {
		t.Fatal(err)
	}
	cfg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	before := strings.Count(p.logs.String(), "autosaved config")
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, admin+"/load", bytes.NewReader(cfg))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Cache-Control", "must-revalidate")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /load: %s %s", resp.Status, body)
	}
	// The line reaches the test through a pipe, maybe after the answer.
	for deadline := time.Now().Add(5 * time.Second); strings.Count(p.logs.String(), "autosaved config") <= before; {
		if time.Now().After(deadline) {
			t.Fatalf("caddy did not reload: no new \"autosaved config\" line")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestFaultConfigReloadMidLogin: a config reload through the admin API between authorize
// and callback, and another between callback and token, do not break a hybrid login.
func TestFaultConfigReloadMidLogin(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
	caddy := startCaddy(t, faultSite(o, up.URL), withAdmin(freePort(t)))
	cfg := clientConfig(t, caddy.Base)
	verifier := oauth2.GenerateVerifier()

	// Walk the browser to the IdP's login form, reload, then log in and come back.
	br := newBrowser(o)
	next, _ := url.Parse(cfg.AuthCodeURL("st", oauth2.S256ChallengeOption(verifier)))
	for hops := 0; next.Host == strings.TrimPrefix(caddy.Base, "http://"); hops++ {
		var err error
		if next.Path == "/oauth/consent" {
			next, err = br.consent(t.Context(), next)
		} else {
			next, err = br.get(t.Context(), next)
		}
		if err != nil || hops > 5 {
			t.Fatalf("to the IdP: %v", err)
		}
	}
	caddy.reload(t) // between authorize and callback
	cb, err := o.Login(t.Context(), next.String(), testenv.LoginWithClient(br.client))
	if err != nil {
		t.Fatalf("logging in at the IdP: %v", err)
	}
	final, err := br.get(t.Context(), cb)
	if err != nil {
		t.Fatalf("the callback after a reload: %v", err)
	}
	code := final.Query().Get("code")
	if code == "" {
		t.Fatalf("no code after a reload: %s", final.Redacted())
	}
	caddy.reload(t) // between callback and token
	tok, err := cfg.Exchange(t.Context(), code, oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatalf("redeeming after a reload: %v", err)
	}
	if resp, body := mcpInitialize(t, caddy.Base, tok.AccessToken); resp.StatusCode != http.StatusOK {
		t.Errorf("MCP after the reloads: %s %.200s", resp.Status, body)
	}
}
