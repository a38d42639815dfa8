package flows

import (
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// SECURITY.md, "IdP login not bound to the browser": an attacker approves their own
// consent page, stops at the redirect to the IdP and sends that URL to a victim. The
// victim's login at the IdP must not finish the attacker's pending login: no code goes
// anywhere, and the pending login stays for the browser that started it.
func TestIdPLoginBoundToBrowser(t *testing.T) {
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", hybridClients)
	isIdP := func(u *url.URL) bool { return strings.HasPrefix(u.String(), o.AuthorizationEndpoint+"?") }

	t.Run("a login finished in another browser yields no code", func(t *testing.T) {
		attacker, victim := newHybridBrowser(t), newHybridBrowser(t)
		idp := attacker.toIdP(front, hybridQuery(nil))
		if !isIdP(idp) {
			t.Fatalf("approve sent the browser to %s", idp.Redacted())
		}
		before := len(sessions(t, b))
		cb := victim.loginAtIdP(o, idp, testenv.LoginAs(o.OtherUser))
		resp, page := victim.get(cb.String())
		if resp.StatusCode != http.StatusForbidden || resp.Header.Get("Location") != "" {
			t.Fatalf("victim's callback: %s, Location %q: %.300s", resp.Status, resp.Header.Get("Location"), page)
		}
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
			t.Errorf("Content-Type %q, want an HTML page", ct)
		}
		for _, want := range []string{"another browser", "Start again"} {
			if !strings.Contains(page, want) {
				t.Errorf("page lacks %q: %.300s", want, page)
			}
		}
		if strings.Contains(page, "code=") || strings.Contains(page, hybridRedirectURI) {
			t.Errorf("the page leads to the client: %.300s", page)
		}
		if len(sessions(t, b)) != before {
			t.Error("a session was created for the victim")
		}
		// The pending login was not spent: the browser that started it still finishes.
		final := attacker.redirect(attacker.get(attacker.loginAtIdP(o, idp).String()))
		if final.Query().Get("code") == "" {
			t.Errorf("the rightful browser got no code: %v", final.Query())
		}
	})

	t.Run("a login with no binding cookie at all yields no code", func(t *testing.T) {
		br := newHybridBrowser(t)
		idp := br.toIdP(front, hybridQuery(nil))
		cb := br.loginAtIdP(o, idp)
		resp, _ := newHybridBrowser(t).get(cb.String())
		if resp.StatusCode != http.StatusForbidden || resp.Header.Get("Location") != "" {
			t.Errorf("%s, Location %q", resp.Status, resp.Header.Get("Location"))
		}
	})

	t.Run("a binding cookie of another login does not fit", func(t *testing.T) {
		attacker, victim := newHybridBrowser(t), newHybridBrowser(t)
		idp := attacker.toIdP(front, hybridQuery(nil))
		// The victim has a login of their own under way, with its own cookie.
		victim.toIdP(front, hybridQuery(nil))
		u, _ := url.Parse(front.URL + pathCallback)
		var own *http.Cookie
		for _, c := range victim.client.Jar.Cookies(u) {
			if strings.HasPrefix(c.Name, "mcp_oauth_login_") {
				own = c
			}
		}
		if own == nil {
			t.Fatal("no login cookie in the victim's browser")
		}
		// Their value under the name of the attacker's login is still no match.
		state := idp.Query().Get("state")
		victim.client.Jar.SetCookies(u, []*http.Cookie{{Name: b.loginBindingCookie(state, "", pathCallback, 0).Name, Value: own.Value, Path: pathCallback}})
		cb := victim.loginAtIdP(o, idp)
		if resp, _ := victim.get(cb.String()); resp.StatusCode != http.StatusForbidden {
			t.Errorf("%s", resp.Status)
		}
	})

	t.Run("two logins in one browser both finish", func(t *testing.T) {
		br := newHybridBrowser(t)
		idp1 := br.toIdP(front, hybridQuery(nil))
		idp2 := br.toIdP(front, hybridAuthorizeQuery(secondClient, secondRedirectURI, hybridVerifier, "s2", nil))
		cb1, cb2 := br.loginAtIdP(o, idp1), br.loginAtIdP(o, idp2)
		for _, cb := range []*url.URL{cb2, cb1} {
			final := br.redirect(br.get(cb.String()))
			if final.Query().Get("code") == "" {
				t.Errorf("no code: %v", final.Query())
			}
		}
		// Each finished login clears its own cookie.
		u, _ := url.Parse(front.URL + pathCallback)
		for _, c := range br.client.Jar.Cookies(u) {
			if strings.HasPrefix(c.Name, "mcp_oauth_login_") {
				t.Errorf("cookie %s left behind", c.Name)
			}
		}
	})

	t.Run("the cookie is HttpOnly and Lax; only its hash is stored", func(t *testing.T) {
		br := newHybridBrowser(t)
		idp := br.toIdP(front, hybridQuery(nil))
		u, _ := url.Parse(front.URL + pathCallback)
		var value string
		for _, c := range br.client.Jar.Cookies(u) {
			if strings.HasPrefix(c.Name, "mcp_oauth_login_") {
				value = c.Value
			}
		}
		var pending PendingLogin
		if err := b.cfg.Records.Get(t.Context(), recordKey(kindIdPState, idp.Query().Get("state")), &pending); err != nil {
			t.Fatal(err)
		}
		if value == "" || pending.BrowserBinding != storage.Hash(value) {
			t.Errorf("binding %q for cookie set %v", pending.BrowserBinding, value != "")
		}
	})
}

// The same for offline access: an offline access login that returns to the broker in another browser
// stores nothing and leaves the pending login in place.
func TestOfflineAccessLoginBoundToBrowser(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	token := f.userToken(t, o.User)

	first, other := newHybridBrowser(t), newHybridBrowser(t)
	to := first.redirect(first.get(f.link(t, token)))
	cb := other.loginAtIdP(o, to)
	resp, page := other.get(cb.String())
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(page, "another browser") {
		t.Fatalf("another browser: %s %s", resp.Status, page)
	}
	if _, _, err := f.grant(t, o.User.Subject); err == nil {
		t.Fatal("a grant was stored from another browser")
	}
	if resp, page := first.get(cb.String()); resp.StatusCode != http.StatusOK {
		t.Fatalf("the browser that started: %s %s", resp.Status, page)
	}
	if _, _, err := f.grant(t, o.User.Subject); err != nil {
		t.Fatalf("no grant: %v", err)
	}
}
