package e2e

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestIdPLoginBoundToBrowserThroughCaddyBinary (SECURITY.md, "IdP login not bound to the
// browser"): an attacker approves their own consent page and stops at the redirect to
// the IdP; a victim who opens that URL and logs in gets a page, not a code, and the
// attacker's browser can still finish its own login.
func TestIdPLoginBoundToBrowserThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	caddy := startCaddy(t, hybridSite(o, "http://127.0.0.1:9", ""))

	attacker, victim := newBrowser(o), newBrowser(o)
	q := url.Values{
		"response_type": {"code"}, "client_id": {"preregistered"}, "redirect_uri": {"http://127.0.0.1:49152/callback"},
		"state": {"attacker-state"}, "code_challenge": {oauth2.S256ChallengeFromVerifier(oauth2.GenerateVerifier())},
		"code_challenge_method": {"S256"}, "scope": {"openid notes:read"},
	}
	authorize, _ := url.Parse(caddy.Base + "/oauth/authorize?" + q.Encode())
	consent, err := attacker.get(t.Context(), authorize)
	if err != nil {
		t.Fatal(err)
	}
	idp, err := attacker.consent(t.Context(), consent)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(idp.String(), o.AuthorizationEndpoint+"?") {
		t.Fatalf("approve sent the browser to %s", idp.Redacted())
	}
	callbackURL, _ := url.Parse(caddy.Base + "/oauth/callback")
	var bound bool
	for _, c := range attacker.client.Jar.Cookies(callbackURL) {
		bound = bound || strings.HasPrefix(c.Name, "mcp_oauth_login_")
	}
	if !bound {
		t.Error("no login cookie in the browser that approved")
	}

	// The victim logs in at the IdP with the attacker's URL.
	cb, err := o.Login(t.Context(), idp.String(), testenv.LoginAs(o.OtherUser))
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, cb.String(), nil)
	resp, err := victim.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || resp.Header.Get("Location") != "" ||
		!strings.Contains(string(page), "another browser") || strings.Contains(string(page), "code=") {
		t.Fatalf("victim's callback: %s, Location %q: %.400s", resp.Status, resp.Header.Get("Location"), page)
	}

	// The browser that approved finishes its own login: the pending login was not spent.
	own, err := o.Login(t.Context(), idp.String())
	if err != nil {
		t.Fatal(err)
	}
	final, err := attacker.get(t.Context(), own)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(final.String(), "http://127.0.0.1:49152/callback?") || final.Query().Get("code") == "" {
		t.Errorf("the browser that started got %s", final.Redacted())
	}
	caddy.assertLogsFree(final.Query().Get("code"), cb.Query().Get("code"), own.Query().Get("code"))
}

// TestInteropLoginHandoffBrowser: the same in Debian's chromium against the Keycloak-like
// IdP. One browser context approves and stops at the redirect to the IdP; a second
// context (its own cookies: another person's browser) opens that URL and logs in. It ends
// on the broker's page saying the sign-in was started in another browser, and the
// client's redirect URI receives nothing; the first context then finishes with a code.
func TestInteropLoginHandoffBrowser(t *testing.T) {
	requireInterop(t)
	chromiumPath(t)
	idp := startNodeIdP(t, profileKeycloak, nodeBrokerClient())
	caddy := startCaddy(t, hybridNodeSite(idp, "http://127.0.0.1:9/mcp", ""))

	var mu sync.Mutex
	var received []string
	callback := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/callback" {
			return // the browser's own requests, such as /favicon.ico
		}
		mu.Lock()
		received = append(received, r.URL.RawQuery)
		mu.Unlock()
		w.Write([]byte("the client received the redirect"))
	}))
	t.Cleanup(callback.Close)
	cfg := brokerClient(t, caddy, "Interop Handoff Client")
	cfg.RedirectURL = callback.URL + "/callback"
	authorizeURL, verifier := brokerAuthorizeURL(cfg, caddy)
	runs := runConsentBrowser(t, []consentRun{{Name: "handoff", URL: authorizeURL, Action: "approve", RedirectPrefix: cfg.RedirectURL, Handoff: true}})
	if len(runs) != 1 {
		t.Fatalf("runs %+v", runs)
	}
	r := runs[0]
	if r.Error != "" {
		t.Fatalf("handoff run: %s", r.Error)
	}
	if h := r.Handoff; h == nil || h.Status != http.StatusForbidden || !strings.HasPrefix(h.URL, caddy.Base+"/oauth/callback?") ||
		!strings.Contains(h.Text, "another browser") {
		t.Fatalf("the second browser ended at %+v", r.Handoff)
	}
	mu.Lock()
	if len(received) != 1 {
		t.Errorf("the client's redirect URI was called %d times, want once (by the browser that approved)", len(received))
	}
	mu.Unlock()
	got, err := url.Parse(r.Redirect)
	if err != nil || got.Query().Get("code") == "" {
		t.Fatalf("the browser that approved ended at %q", r.Redirect)
	}
	if _, err := cfg.Exchange(t.Context(), got.Query().Get("code"), oauth2.VerifierOption(verifier), oauth2.SetAuthURLParam("resource", caddy.Base+"/mcp")); err != nil {
		t.Errorf("the approving browser's code does not redeem: %v", err)
	}
}
