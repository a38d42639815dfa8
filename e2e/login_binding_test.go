package e2e

import (
	"io"
	"net/http"
	"net/url"
	"strings"
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
