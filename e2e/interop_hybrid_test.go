package e2e

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/oauth2"
)

// TestInteropHybridTSClient (issue 6, part 2): the TypeScript SDK's client against the
// caddy binary in hybrid mode, once with each IdP profile: 401 → protected-resource
// metadata → the broker's AS metadata → DCR at the broker → authorize → consent → IdP
// login → callback → token → tools/list → tools/call → a forced refresh at the broker.
// Behind it: server-everything, whose front door records the tokens it receives. With the
// Keycloak-like IdP the broker exchanges tokens (RFC 8693): the upstream sees JWTs for
// audience nextcloud, scoped per tool. With the Nextcloud-like IdP (no RFC 8693) it falls
// back to the refresh grant by itself: the upstream sees opaque IdP tokens that
// introspect active for the user. Never the client's token.
func TestInteropHybridTSClient(t *testing.T) {
	for _, profile := range []string{profileKeycloak, profileNextcloud} {
		t.Run(profile, func(t *testing.T) {
			requireInterop(t)
			idp := startNodeIdP(t, profile, nodeBrokerClient(), nodeRSClient())
			rec := startTokenRecorder(t, idp, startEverything(t))
			caddy := startCaddy(t, hybridNodeSite(idp, rec.URL, ""))
			br := newNodeHybridBrowser(idp)
			s := runTSClient(t, caddy.Base+"/mcp", br.login, tsClientOptions{
				RedirectURL: tsRedirectURL,
				Calls: []map[string]any{
					{"name": "echo", "arguments": map[string]any{"message": "hello from the TS SDK"}},
					{"name": "get-sum", "arguments": map[string]any{"a": 2, "b": 3}},
				},
				Refresh: true,
			})

			// The discovery chain, as the SDK walked it.
			want := []struct{ method, suffix string }{
				{"POST", "/mcp"}, {"GET", "/.well-known/oauth-protected-resource/mcp"},
				{"GET", "/.well-known/oauth-authorization-server"}, {"POST", "/oauth/register"}, {"POST", "/oauth/token"},
			}
			i := 0
			for _, r := range s.Requests {
				if i < len(want) && r.Method == want[i].method && strings.HasSuffix(r.URL, want[i].suffix) && strings.HasPrefix(r.URL, caddy.Base) {
					i++
				}
			}
			if i != len(want) || s.Requests[0].Status != http.StatusUnauthorized {
				t.Errorf("discovery chain stopped at step %d of %v: %+v", i, want, s.Requests)
			}
			if s.RegisteredClientID == "" || len(s.Authorizations) != 1 || s.Authorizations[0].Endpoint != caddy.Base+"/oauth/authorize" ||
				s.Authorizations[0].ClientID != s.RegisteredClientID || s.Authorizations[0].Resource != caddy.Base+"/mcp" {
				t.Errorf("registration %q, authorizations %+v", s.RegisteredClientID, s.Authorizations)
			}
			if br.page.consents != 1 {
				t.Errorf("consent pages shown: %d", br.page.consents)
			}
			if s.ServerInfo.Name != "mcp-servers/everything" || !slices.Contains(s.Tools, "echo") {
				t.Errorf("server %q tools %v", s.ServerInfo.Name, s.Tools)
			}
			if len(s.Calls) != 2 || s.Calls[0].Text != "Echo: hello from the TS SDK" || !strings.Contains(s.Calls[1].Text, "5") {
				t.Errorf("calls %+v", s.Calls)
			}
			if s.Refresh == nil || !s.Refresh.OK || !s.Refresh.Rotated || !s.Refresh.NewAccessToken {
				t.Errorf("refresh at the broker %+v", s.Refresh)
			}
			if g := s.grants(); !slices.Equal(g, []string{"authorization_code", "refresh_token"}) {
				t.Errorf("grants at the broker %v", g)
			}

			// What the upstream saw.
			scopeOfTool := map[string]string{}
			seen := rec.Seen()
			if len(seen) == 0 {
				t.Fatal("the upstream saw nothing")
			}
			for _, u := range seen {
				if u.SHA256 == "" {
					t.Errorf("%s %s reached the upstream without a token", u.Method, u.RPCMethod)
					continue
				}
				if slices.Contains(s.AccessTokens, u.SHA256) {
					t.Fatalf("the upstream received the client's token")
				}
				if !u.Active || u.Subject != nodeUser || u.Error != "" {
					t.Errorf("upstream token for %s %s: %+v", u.Method, u.RPCMethod, u)
				}
				if u.Tool != "" {
					scopeOfTool[u.Tool] = u.Scope
				}
				switch profile {
				case profileKeycloak:
					if !u.JWT || !slices.Equal(u.Audience, []string{"nextcloud"}) {
						t.Errorf("upstream token %+v: want a JWT for audience nextcloud", u)
					}
				case profileNextcloud:
					if u.JWT || u.ClientID != nodeBrokerClientID {
						t.Errorf("upstream token %+v: want the broker's opaque IdP token", u)
					}
				}
			}
			if profile == profileKeycloak && (scopeOfTool["echo"] != "notes:read" || scopeOfTool["get-sum"] != "notes:write") {
				t.Errorf("scopes per tool as the upstream saw them: %v", scopeOfTool)
			}
			grants := idp.Logs()
			if profile == profileKeycloak && !strings.Contains(grants, `"grant_type":"`+tokenExchangeGrant+`"`) {
				t.Errorf("no token exchange at the IdP:\n%s", tail(grants))
			}
			if profile == profileNextcloud && (strings.Contains(grants, tokenExchangeGrant) || !strings.Contains(grants, `"grant.success","grant_type":"refresh_token"`)) {
				t.Errorf("want the refresh fallback, IdP grants:\n%s", tail(grants))
			}
			t.Logf("upstream saw %d requests; scopes per tool %v", len(seen), scopeOfTool)
			caddy.assertLogsFree(append(br.codes, nodeBrokerClientSecret, testKey)...)
		})
	}
}

// TestInteropHybridEverything (issue 6, part 3): server-everything behind the broker in
// hybrid mode (Keycloak-like IdP, token exchange): Streamable HTTP passes through intact
// (Mcp-Session-Id, SSE progress notifications as they happen, a notification on the GET
// stream, a multi-megabyte result, DELETE), and every request reached the upstream with
// a delegated token for audience nextcloud.
func TestInteropHybridEverything(t *testing.T) {
	requireInterop(t)
	idp := startNodeIdP(t, profileKeycloak, nodeBrokerClient(), nodeRSClient())
	rec := startTokenRecorder(t, idp, startEverything(t))
	caddy := startCaddy(t, hybridNodeSite(idp, rec.URL, ""))
	tok := brokerToken(t, caddy, idp)

	wire := newMCPWire(caddy.Base+"/mcp", http.Header{"Authorization": {"Bearer " + tok.AccessToken}})
	rep := checkEverything(t, wire, serveBigFile(t, 3<<20))
	t.Logf("through caddy: progress at %v, result at %v, large result %d bytes, DELETE %d, after %d",
		rep.ProgressAt, rep.ResultAt, rep.ResultBytes, rep.DeleteStatus, rep.AfterDelete)

	methods := map[string]bool{}
	for _, u := range rec.Seen() {
		methods[u.Method] = true
		if !u.JWT || !slices.Equal(u.Audience, []string{"nextcloud"}) || u.Subject != nodeUser {
			t.Errorf("upstream token for %s %s: %+v", u.Method, u.RPCMethod, u)
		}
	}
	if !methods["GET"] || !methods["POST"] || !methods["DELETE"] {
		t.Errorf("methods that reached the upstream: %v", methods)
	}
	caddy.assertLogsFree(tok.AccessToken, tok.RefreshToken, nodeBrokerClientSecret, testKey)
}

// TestInteropConsentBrowser (issue 6, part 4): Debian's chromium, driven by
// playwright-core, on the broker's consent page. The page names the client, the host its
// answer goes to and the scopes; a screenshot is saved as a CI artifact; forged posts of
// the page's own ticket and CSRF value from another origin (cross-site: localhost;
// same-site: another port of 127.0.0.1) are refused and do not spend the ticket; approve
// then leads, through the IdP's login, to the client's redirect with a code that redeems;
// deny leads to access_denied.
func TestInteropConsentBrowser(t *testing.T) {
	requireInterop(t)
	chromiumPath(t)
	idp := startNodeIdP(t, profileKeycloak, nodeBrokerClient())
	caddy := startCaddy(t, hybridNodeSite(idp, "http://127.0.0.1:9/mcp", ""))
	forge := forgeServer(t)
	forgePort := forge.URL[strings.LastIndex(forge.URL, ":")+1:]

	// The client's redirect URI, live: the broker accepts any port on a loopback URI.
	callback := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("the client received the redirect"))
	}))
	t.Cleanup(callback.Close)
	cfg := brokerClient(t, caddy, "Interop Browser Client")
	cfg.RedirectURL = callback.URL + "/callback"
	approveURL, verifier := brokerAuthorizeURL(cfg, caddy)
	denyURL, _ := brokerAuthorizeURL(cfg, caddy)
	shot := filepath.Join(artifactsDir(t), "consent-page.png")
	os.Remove(shot)
	expect := map[string]any{"clientName": "Interop Browser Client", "redirectHost": "127.0.0.1", "scopes": []string{"openid", "notes:read", "notes:write"}}
	runs := runConsentBrowser(t, []consentRun{
		{Name: "approve", URL: approveURL, Action: "approve", RedirectPrefix: cfg.RedirectURL, Expect: expect, Screenshot: shot,
			ForgeOrigins: []string{"http://localhost:" + forgePort, "http://127.0.0.1:" + forgePort}},
		{Name: "deny", URL: denyURL, Action: "deny", RedirectPrefix: cfg.RedirectURL, Expect: expect},
	})
	if len(runs) != 2 {
		t.Fatalf("runs %+v", runs)
	}
	for _, r := range runs {
		if r.Error != "" {
			t.Errorf("%s: %s", r.Name, r.Error)
		}
		if r.ConsentStatus != http.StatusOK || r.ConsentPath != "/oauth/consent" {
			t.Errorf("%s: consent page %d at %s", r.Name, r.ConsentStatus, r.ConsentPath)
		}
		c := r.Checks
		if c.ClientName == nil || !*c.ClientName || c.RedirectHost == nil || !*c.RedirectHost || len(c.Scopes) != 3 {
			t.Errorf("%s: the page lacks what it must show: %+v\n%s", r.Name, c, r.Text)
		}
		for s, ok := range c.Scopes {
			if !ok {
				t.Errorf("%s: scope %s not shown", r.Name, s)
			}
		}
	}

	approve := runs[0]
	if approve.Screenshot == nil || approve.Screenshot.Bytes < 1024 {
		t.Errorf("screenshot %+v", approve.Screenshot)
	}
	if png, err := os.ReadFile(shot); err != nil || len(png) < 1024 || !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		t.Errorf("screenshot file %s: %d bytes, %v", shot, len(png), err)
	}
	wantSite := map[string]string{"http://localhost:" + forgePort: "cross-site", "http://127.0.0.1:" + forgePort: "same-site"}
	if len(approve.Forged) != 2 {
		t.Fatalf("forged posts %+v", approve.Forged)
	}
	for _, f := range approve.Forged {
		if f.Status != http.StatusForbidden || f.Location != "" {
			t.Errorf("forged post from %s answered %d (Location %q): %s", f.Origin, f.Status, f.Location, f.Text)
		}
	}
	// The broker says why it refused: the browser marked each post as not same-origin.
	for _, site := range wantSite {
		if !strings.Contains(caddy.logs.String(), `"sec_fetch_site":"`+site+`"`) {
			t.Errorf("no refusal of a %s post in caddy's logs", site)
		}
	}
	if approve.ConsentStatusAfterForgery != "shown" {
		t.Errorf("after the forged posts the consent page is %q: a forged post spent the ticket", approve.ConsentStatusAfterForgery)
	}
	got, err := url.Parse(approve.Redirect)
	if err != nil || !strings.HasPrefix(approve.Redirect, cfg.RedirectURL+"?") || got.Query().Get("code") == "" || got.Query().Get("iss") != caddy.Base {
		t.Fatalf("approve ended at %q", approve.Redirect)
	}
	approveQ, _ := url.Parse(approveURL)
	if got.Query().Get("state") != approveQ.Query().Get("state") {
		t.Errorf("state lost")
	}
	tok, err := cfg.Exchange(t.Context(), got.Query().Get("code"), oauth2.VerifierOption(verifier), oauth2.SetAuthURLParam("resource", caddy.Base+"/mcp"))
	if err != nil || tok.AccessToken == "" {
		t.Errorf("the browser's code does not redeem: %v", err)
	}

	denied, err := url.Parse(runs[1].Redirect)
	if err != nil || denied.Query().Get("error") != "access_denied" || denied.Query().Get("code") != "" || denied.Query().Get("state") == "" {
		t.Errorf("deny ended at %q", runs[1].Redirect)
	}
	t.Logf("screenshot: %s (%d bytes)", shot, approve.Screenshot.Bytes)
}

// TestInteropConformance (issue 6, part 5): @modelcontextprotocol/conformance's
// authorization-server scenarios against the broker's AS facade: the metadata scenario,
// and the authorization-code scenario with the browser step played by the login helper
// (consent page, IdP login) for a client pre-registered in the Caddyfile. interop/README.md
// records what passes and why anything cannot.
func TestInteropConformance(t *testing.T) {
	requireInterop(t)
	idp := startNodeIdP(t, profileKeycloak, nodeBrokerClient())
	caddy := startCaddy(t, hybridNodeSite(idp, "http://127.0.0.1:9/mcp", ""))
	br := newNodeHybridBrowser(idp)
	results, code := runConformance(t, caddy.Base, "conformance", caddy.Base+"/mcp", br.login)
	for _, id := range []string{"authorization-server-metadata", "authorization-server-metadata-cimd", "authorization-code-grant"} {
		if c := results[id]; c.Status != "SUCCESS" {
			t.Errorf("conformance check %s: %q %s", id, c.Status, c.ErrorMessage)
		}
	}
	if len(results) != 3 || code != 0 {
		t.Errorf("conformance exited %d with checks %+v", code, results)
	}
	if br.page.consents != 1 {
		t.Errorf("consent pages shown: %d", br.page.consents)
	}
}

// stepsUp checks a successful step-up: the 403 names "openid notes:read notes:write", the
// client re-authorizes with it, the consent page is shown again for the new scope, and the
// call goes through with notes:write upstream.
func stepsUp(t *testing.T, s *tsSummary, br *nodeHybridBrowser, rec *tokenRecorder) {
	if !s.StepUp.OK || s.StepUp.Scope != "openid notes:read notes:write" || s.StepUp.Authorizations != 1 {
		t.Errorf("step-up %+v", *s.StepUp)
	}
	if br.page.consents != 2 || !strings.Contains(s.Calls[len(s.Calls)-1].Text, "42") {
		t.Errorf("consents %d, calls %+v", br.page.consents, s.Calls)
	}
	if !slices.Equal(s.grants(), []string{"authorization_code", "authorization_code"}) {
		t.Errorf("grants %v", s.grants())
	}
	var sawWrite bool
	for _, u := range rec.Seen() {
		sawWrite = sawWrite || (u.Tool == "get-sum" && u.Scope == "notes:write" && slices.Equal(u.Audience, []string{"nextcloud"}))
	}
	if !sawWrite {
		t.Errorf("the upstream never got get-sum with a notes:write token: %+v", rec.Seen())
	}
}

// TestInteropHybridTSClientStepUp: the broker's 403 insufficient_scope and the TS SDK's
// step-up in hybrid mode. The broker's challenge names every configured scope, so a
// conformant client holds them all and never meets a 403; here the client asks for less
// first (--first-scope "openid notes:read"), then calls get-sum, which needs notes:write.
// The rows record what happens today (interop/README.md):
//   - a DCR client (SDK 1.32.2 registers with the scope it first asked for; the broker does
//     not hold a registered client to it) and a client pre-registered in the Caddyfile: the 403 names
//     "openid notes:read notes:write", the client re-authorizes with it, the consent page is
//     shown again for the new scope, and the call goes through with notes:write upstream;
//   - the same with step-up left to the SDK alone: it refreshes first (same scope), meets
//     the same 403 and gives up ("Server returned 403 after trying upscoping").
func TestInteropHybridTSClientStepUp(t *testing.T) {
	rows := []struct {
		name      string
		clientID  string
		sdkStepUp bool
		check     func(t *testing.T, s *tsSummary, br *nodeHybridBrowser, rec *tokenRecorder)
	}{
		{"DCR client steps up", "", false, stepsUp},
		{"pre-registered client steps up", "conformance", false, stepsUp},
		{"SDK alone refreshes and gives up", "conformance", true, func(t *testing.T, s *tsSummary, br *nodeHybridBrowser, rec *tokenRecorder) {
			if s.StepUp.OK || !strings.Contains(s.StepUp.Error, "403 after trying upscoping") || s.StepUp.Authorizations != 0 {
				t.Errorf("step-up %+v", *s.StepUp)
			}
			if !slices.Equal(s.grants(), []string{"authorization_code", "refresh_token"}) {
				t.Errorf("grants %v", s.grants())
			}
		}},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			requireInterop(t)
			idp := startNodeIdP(t, profileKeycloak, nodeBrokerClient(), nodeRSClient())
			rec := startTokenRecorder(t, idp, startEverything(t))
			caddy := startCaddy(t, hybridNodeSite(idp, rec.URL, ""))
			br := newNodeHybridBrowser(idp)
			s := runTSClient(t, caddy.Base+"/mcp", br.login, tsClientOptions{
				ClientID: row.clientID, RedirectURL: tsRedirectURL, FirstScope: "openid notes:read",
				Calls:     []map[string]any{{"name": "echo", "arguments": map[string]any{"message": "before"}}},
				StepUp:    map[string]any{"name": "get-sum", "arguments": map[string]any{"a": 20, "b": 22}},
				SDKStepUp: row.sdkStepUp,
			})
			if s.StepUp == nil || len(s.Calls) == 0 || s.Calls[0].IsError || s.Authorizations[0].Scope != "openid notes:read" {
				t.Fatalf("before the step-up: %+v %+v %+v", s.StepUp, s.Calls, s.Authorizations)
			}
			if n := s.requestsTo("POST", "/mcp", http.StatusForbidden); n == 0 {
				t.Errorf("no 403 from the broker")
			}
			for _, r := range s.Requests {
				if r.Status == http.StatusForbidden && !strings.Contains(r.WWWAuthenticate, `error="insufficient_scope", scope="openid notes:read notes:write"`) {
					t.Errorf("403 challenge %q", r.WWWAuthenticate)
				}
			}
			row.check(t, s, br, rec)
		})
	}
}
