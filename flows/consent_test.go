package flows

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// consentURLFor runs authorize in br and returns the consent page URL it leads to.
func consentURLFor(t *testing.T, br *hybridBrowser, front *httptest.Server, q url.Values) *url.URL {
	t.Helper()
	next := br.authorize(front, q)
	if next.Path != pathConsent {
		t.Fatalf("authorize sent the browser to %s, want the consent page", next.Redacted())
	}
	return next
}

func TestConsentPage(t *testing.T) {
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", hybridClients)

	t.Run("names the client, its id, the redirect host and the scopes", func(t *testing.T) {
		br := newHybridBrowser(t)
		resp, page := br.get(consentURLFor(t, br, front, hybridQuery(nil)).String())
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %s", resp.Status)
		}
		for _, want := range []string{"Native Test Client", testenv.NativeClientID, "127.0.0.1", "<code>openid</code>", "<code>notes:read</code>",
			`value="approve"`, `value="deny"`, `method="post"`} {
			if !strings.Contains(page, want) {
				t.Errorf("page lacks %q", want)
			}
		}
		// notes:write is listed only among the IdP's scopes, not as the application's.
		asked, _, _ := strings.Cut(page, "You then sign in")
		if strings.Contains(asked, "notes:write") {
			t.Error("page lists a scope that was not asked")
		}
	})

	t.Run("headers forbid framing, caching and referrers", func(t *testing.T) {
		br := newHybridBrowser(t)
		resp, _ := br.get(consentURLFor(t, br, front, hybridQuery(nil)).String())
		h := resp.Header
		for k, want := range map[string]string{
			"X-Frame-Options": "DENY",
			"Cache-Control":   "no-store",
			"Referrer-Policy": "no-referrer",
			"Content-Type":    "text/html; charset=utf-8",
		} {
			if h.Get(k) != want {
				t.Errorf("%s = %q, want %q", k, h.Get(k), want)
			}
		}
		csp := h.Get("Content-Security-Policy")
		for _, want := range []string{"frame-ancestors 'none'", "default-src 'none'", "form-action 'self' http://127.0.0.1:49152 " + o.Issuer} {
			if !strings.Contains(csp, want) {
				t.Errorf("CSP %q lacks %q", csp, want)
			}
		}
		if strings.Contains(csp, "script-src") {
			t.Errorf("CSP allows scripts: %q", csp)
		}
		var csrf *http.Cookie
		for _, c := range resp.Cookies() {
			if strings.HasPrefix(c.Name, "mcp_oauth_csrf_") {
				csrf = c
			}
		}
		if csrf == nil || !csrf.HttpOnly || csrf.SameSite != http.SameSiteLaxMode || csrf.Path != pathConsent || csrf.MaxAge != 600 || csrf.Secure {
			t.Errorf("CSRF cookie on http loopback: %+v", csrf)
		}
	})

	t.Run("a client name with markup is escaped", func(t *testing.T) {
		br := newHybridBrowser(t)
		_, page := br.get(consentURLFor(t, br, front, hybridAuthorizeQuery(xssClient, "", hybridVerifier, "s", nil)).String())
		if strings.Contains(page, "<script>") || strings.Contains(page, `alert("pwned")`) {
			t.Errorf("client name rendered unescaped: %.800s", page)
		}
		if !strings.Contains(page, "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt; &amp; Co") {
			t.Errorf("escaped client name missing: %.800s", page)
		}
		if !strings.Contains(page, "xss.example.com") {
			t.Error("redirect host missing")
		}
	})

	t.Run("unknown or missing ticket", func(t *testing.T) {
		for _, u := range []string{front.URL + pathConsent, front.URL + pathConsent + "?ticket=nope"} {
			resp, _ := newHybridBrowser(t).get(u)
			if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" || resp.Header.Get("X-Frame-Options") != "DENY" {
				t.Errorf("%s: %s %q", u, resp.Status, resp.Header.Get("Location"))
			}
		}
	})
}

// On https the cookies carry the __Host- prefix, Secure and Path=/.
func TestConsentCookiesOnHTTPS(t *testing.T) {
	b := newTestBroker(t, testenv.SharedOP(t), func(c *Config) { c.Mode = ModeHybrid; hybridClients(c) })
	ticket := randomToken()
	req := AuthorizationRequest{ClientID: webClient, RedirectURI: webRedirectURI, State: "s",
		CodeChallenge: oauth2.S256ChallengeFromVerifier(hybridVerifier), CodeChallengeMethod: "S256", Scopes: []string{"openid"}}
	if err := b.cfg.Records.Put(t.Context(), recordKey(kindConsent, ticket), ConsentTicket{Request: req, CSRF: "csrf-value"}, time.Minute); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	b.Handle(rec, httptest.NewRequest(http.MethodGet, "https://mcp.example.test/oauth/consent?ticket="+ticket, nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d", rec.Code)
	}
	cookies := rec.Result().Cookies()
	if len(cookies) != 1 {
		t.Fatalf("cookies %v", cookies)
	}
	c := cookies[0]
	if !strings.HasPrefix(c.Name, "__Host-mcp_oauth_csrf_") || !c.Secure || !c.HttpOnly || c.Path != "/" || c.Domain != "" ||
		c.SameSite != http.SameSiteLaxMode || c.Value != "csrf-value" {
		t.Errorf("CSRF cookie %+v", c)
	}

	// Approving sets the consent cookie, also __Host- prefixed.
	post := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/consent",
		strings.NewReader(url.Values{"ticket": {ticket}, "csrf": {"csrf-value"}, "decision": {"approve"}}.Encode()))
	post.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	post.AddCookie(c)
	rec = httptest.NewRecorder()
	b.Handle(rec, post)
	if rec.Code != http.StatusFound {
		t.Fatalf("approve: %d %s", rec.Code, rec.Body)
	}
	var consent *http.Cookie
	for _, c := range rec.Result().Cookies() {
		if c.Name == "__Host-mcp_oauth_consent" {
			consent = c
		}
	}
	if consent == nil || !consent.Secure || !consent.HttpOnly || consent.Path != "/" || consent.SameSite != http.SameSiteLaxMode ||
		consent.MaxAge != int(consentRememberFor/time.Second) {
		t.Errorf("consent cookie %+v", consent)
	}

	// The redirect to the IdP sets the login binding cookie, __Host- prefixed as well.
	var login *http.Cookie
	for _, c := range rec.Result().Cookies() {
		if strings.HasPrefix(c.Name, "__Host-mcp_oauth_login_") {
			login = c
		}
	}
	if login == nil || !login.Secure || !login.HttpOnly || login.Path != "/" || login.Domain != "" || login.SameSite != http.SameSiteLaxMode ||
		login.MaxAge != int(idpStateTTL/time.Second) || len(login.Value) < 43 {
		t.Errorf("login cookie %+v", login)
	}
}

// A POST without the page's cookie, or with a CSRF token other than the ticket's, is
// refused with no code, no redirect, and the ticket left for the real user.
func TestConsentRefusesForgedPosts(t *testing.T) {
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", hybridClients)

	user := newHybridBrowser(t)
	consentURL := consentURLFor(t, user, front, hybridQuery(nil))
	_, page := user.get(consentURL.String())
	ticket, csrf := consentForm(t, page)

	// Another ticket, viewed by the attacker in their own browser.
	attacker := newHybridBrowser(t)
	_, otherPage := attacker.get(consentURLFor(t, attacker, front, hybridQuery(nil)).String())
	otherTicket, otherCSRF := consentForm(t, otherPage)

	postURL := front.URL + pathConsent
	for _, tc := range []struct {
		name    string
		browser *hybridBrowser
		form    url.Values
		header  http.Header
		status  int
	}{
		{"no cookie (another browser)", newHybridBrowser(t), url.Values{"ticket": {ticket}, "csrf": {csrf}, "decision": {"approve"}}, nil, http.StatusForbidden},
		{"wrong CSRF token", user, url.Values{"ticket": {ticket}, "csrf": {otherCSRF}, "decision": {"approve"}}, nil, http.StatusForbidden},
		{"missing CSRF token", user, url.Values{"ticket": {ticket}, "decision": {"approve"}}, nil, http.StatusForbidden},
		{"empty CSRF token", user, url.Values{"ticket": {ticket}, "csrf": {""}, "decision": {"approve"}}, nil, http.StatusForbidden},
		{"the attacker's cookie and token for the user's ticket", attacker, url.Values{"ticket": {ticket}, "csrf": {otherCSRF}, "decision": {"approve"}}, nil, http.StatusForbidden},
		{"cross-site post from the user's browser", user, url.Values{"ticket": {ticket}, "csrf": {csrf}, "decision": {"approve"}},
			http.Header{"Sec-Fetch-Site": {"cross-site"}}, http.StatusForbidden},
		{"same-site post from the user's browser", user, url.Values{"ticket": {ticket}, "csrf": {csrf}, "decision": {"approve"}},
			http.Header{"Sec-Fetch-Site": {"same-site"}}, http.StatusForbidden},
		{"no decision", user, url.Values{"ticket": {ticket}, "csrf": {csrf}}, nil, http.StatusBadRequest},
		{"unknown ticket", user, url.Values{"ticket": {"forged"}, "csrf": {csrf}, "decision": {"approve"}}, nil, http.StatusBadRequest},
		{"ticket in the query only", user, url.Values{"csrf": {csrf}, "decision": {"approve"}}, nil, http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := postURL
			if tc.form.Get("ticket") == "" {
				u += "?ticket=" + ticket
			}
			resp, body := tc.browser.post(u, tc.form, tc.header)
			if resp.StatusCode != tc.status {
				t.Errorf("status %s, want %d", resp.Status, tc.status)
			}
			if loc := resp.Header.Get("Location"); loc != "" {
				t.Errorf("redirected to %s", loc)
			}
			if strings.Contains(body, "code=") {
				t.Error("a code in the answer")
			}
			if err := b.cfg.Records.Get(t.Context(), recordKey(kindConsent, ticket), &ConsentTicket{}); err != nil {
				t.Errorf("the forged post spent the ticket: %v", err)
			}
		})
	}

	// No IdP login was started by any of them.
	if keys, _ := b.cfg.Records.List(t.Context(), storage.Key(kindIdPState)); len(keys) != 0 {
		t.Errorf("%d IdP logins started by forged posts", len(keys))
	}
	// The real user's decision still works, once; the attacker's ticket is untouched.
	if next := user.decide(consentURL, "approve"); !strings.HasPrefix(next.String(), o.AuthorizationEndpoint+"?") {
		t.Errorf("approve sent the browser to %s", next.Redacted())
	}
	resp, _ := user.post(postURL, url.Values{"ticket": {ticket}, "csrf": {csrf}, "decision": {"approve"}}, nil)
	if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
		t.Errorf("second decision on one ticket: %s %q", resp.Status, resp.Header.Get("Location"))
	}
	if err := b.cfg.Records.Get(t.Context(), recordKey(kindConsent, otherTicket), &ConsentTicket{}); err != nil {
		t.Errorf("the attacker's ticket is gone: %v", err)
	}
}

func TestConsentDeny(t *testing.T) {
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", hybridClients)
	br := newHybridBrowser(t)
	consentURL := consentURLFor(t, br, front, hybridQuery(nil))
	next := br.decide(consentURL, "deny")

	if got := next.Scheme + "://" + next.Host + next.Path; got != hybridRedirectURI {
		t.Fatalf("deny sent the browser to %s", next.Redacted())
	}
	q := next.Query()
	if q.Get("error") != "access_denied" || q.Get("state") != "client-state-123" || q.Get("iss") != front.URL || q.Has("code") {
		t.Errorf("deny redirect query %v", q)
	}
	if keys, _ := b.cfg.Records.List(t.Context(), storage.Key(kindIdPState)); len(keys) != 0 {
		t.Errorf("deny started %d IdP logins", len(keys))
	}
	// A denial is not remembered: the next request asks again.
	consentURLFor(t, br, front, hybridQuery(nil))
}

// Approving sends the browser to the IdP as the broker's own client, with PKCE S256,
// a nonce, a fresh state, openid, offline_access and the client's scopes (not every
// configured scope: SECURITY.md S1.20).
func TestConsentApproveRedirectsToIdP(t *testing.T) {
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", hybridClients)
	br := newHybridBrowser(t)
	next := br.decide(consentURLFor(t, br, front, hybridQuery(nil)), "approve")

	if got := next.Scheme + "://" + next.Host + next.Path; got != o.AuthorizationEndpoint {
		t.Fatalf("approve sent the browser to %s", got)
	}
	q := next.Query()
	for k, want := range map[string]string{
		"client_id":             testenv.BrokerClientID,
		"redirect_uri":          front.URL + pathCallback,
		"response_type":         "code",
		"code_challenge_method": "S256",
		"prompt":                "consent",
		"scope":                 "openid offline_access notes:read",
	} {
		if q.Get(k) != want {
			t.Errorf("%s = %q, want %q", k, q.Get(k), want)
		}
	}
	state, nonce, challenge := q.Get("state"), q.Get("nonce"), q.Get("code_challenge")
	if len(state) < 40 || len(nonce) < 40 || len(challenge) != 43 || state == "client-state-123" {
		t.Errorf("state %q, nonce %q, code_challenge %q", state, nonce, challenge)
	}
	if q.Has("client_secret") || strings.Contains(next.String(), testenv.BrokerClientSecret) {
		t.Error("the client secret went to the browser")
	}

	var pending PendingLogin
	key := recordKey(kindIdPState, state)
	if err := b.cfg.Records.Get(t.Context(), key, &pending); err != nil {
		t.Fatalf("no pending login under the state: %v", err)
	}
	if pending.Nonce != nonce || pending.Request.ClientID != testenv.NativeClientID || pending.Request.State != "client-state-123" {
		t.Errorf("pending login %+v", pending)
	}
	verifier, err := b.cfg.Records.Open(key, pending.PKCEVerifier)
	if err != nil {
		t.Fatalf("the PKCE verifier is not sealed under its record: %v", err)
	}
	if strings.Contains(pending.PKCEVerifier, string(verifier)) || oauth2.S256ChallengeFromVerifier(string(verifier)) != challenge {
		t.Error("the stored verifier does not match the challenge, or is stored in the clear")
	}

	// An approval for a loopback redirect URI is not remembered (SECURITY.md S1.40).
	u, _ := url.Parse(front.URL + "/oauth/authorize")
	for _, c := range br.client.Jar.Cookies(u) {
		if c.Name == "mcp_oauth_consent" {
			t.Error("a consent cookie after approving a loopback redirect URI")
		}
	}
}

// W15, the confused deputy: an approval spares the page only for the client id it was
// given to, from the browser it was given in, within its scopes and lifetime.
func TestConsentBoundToClientID(t *testing.T) {
	o := testenv.SharedOP(t)
	clock := &testenv.Clock{}
	b, front := startHybridFrontWith(t, o, "", hybridClients, func(b *Broker) { b.now = clock.Now })
	isIdP := func(u *url.URL) bool { return strings.HasPrefix(u.String(), o.AuthorizationEndpoint+"?") }
	isConsent := func(u *url.URL) bool { return strings.HasPrefix(u.String(), front.URL+pathConsent+"?") }

	br := newHybridBrowser(t)
	if next := br.toIdP(front, webQuery(nil)); !isIdP(next) {
		t.Fatalf("approve sent the browser to %s", next.Redacted())
	}

	for _, tc := range []struct {
		name    string
		browser *hybridBrowser
		q       url.Values
		want    func(*url.URL) bool
	}{
		{"same client, same browser: remembered", br, webQuery(nil), isIdP},
		{"same client, fewer scopes: remembered", br, webQuery(func(q url.Values) { q.Set("scope", "notes:read") }), isIdP},
		{"same client, a scope not approved: asked again", br, webQuery(func(q url.Values) { q.Set("scope", "openid notes:write") }), isConsent},
		{"another client in the same browser: asked", br,
			hybridAuthorizeQuery(secondClient, secondRedirectURI, hybridVerifier, "s", nil), isConsent},
		{"same client in another browser: asked", newHybridBrowser(t), webQuery(nil), isConsent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if next := tc.browser.authorize(front, tc.q); !tc.want(next) {
				t.Errorf("sent to %s", next.Redacted())
			}
		})
	}

	t.Run("an unregistered redirect URI is refused even with consent", func(t *testing.T) {
		resp, _ := br.get(front.URL + pathAuthorize + "?" + webQuery(func(q url.Values) { q.Set("redirect_uri", "https://evil.example/cb") }).Encode())
		if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
			t.Errorf("%s %q", resp.Status, resp.Header.Get("Location"))
		}
	})

	t.Run("a consent cookie moved to another name or edited is worthless", func(t *testing.T) {
		u, _ := url.Parse(front.URL + pathAuthorize)
		var value string
		for _, c := range br.client.Jar.Cookies(u) {
			if c.Name == "mcp_oauth_consent" {
				value = c.Value
			}
		}
		if value == "" {
			t.Fatal("no consent cookie")
		}
		edited := newHybridBrowser(t)
		edited.client.Jar.SetCookies(u, []*http.Cookie{{Name: "mcp_oauth_consent", Value: value[:len(value)-2] + "AA", Path: "/oauth"}})
		if next := edited.authorize(front, webQuery(nil)); !isConsent(next) {
			t.Errorf("edited cookie: sent to %s", next.Redacted())
		}
		// Sealed for another purpose, the same bytes do not open as a consent cookie.
		other, err := b.cfg.Records.Seal(storage.Key("cookies", "other"), []byte(`{"c":[{"i":"web-client","r":"https://web.example.com/cb","s":["openid","notes:read"],"x":9999999999}]}`))
		if err != nil {
			t.Fatal(err)
		}
		forged := newHybridBrowser(t)
		forged.client.Jar.SetCookies(u, []*http.Cookie{{Name: "mcp_oauth_consent", Value: other, Path: "/oauth"}})
		if next := forged.authorize(front, webQuery(nil)); !isConsent(next) {
			t.Errorf("foreign sealed cookie: sent to %s", next.Redacted())
		}
	})

	t.Run("approvals of both clients live side by side", func(t *testing.T) {
		next := br.toIdP(front, hybridAuthorizeQuery(singleURIClient, singleURI, hybridVerifier, "s", nil))
		if !isIdP(next) {
			t.Fatalf("approve of the second client: %s", next.Redacted())
		}
		for _, q := range []url.Values{webQuery(nil), hybridAuthorizeQuery(singleURIClient, singleURI, hybridVerifier, "s", nil)} {
			if next := br.authorize(front, q); !isIdP(next) {
				t.Errorf("%s not remembered: %s", q.Get("client_id"), next.Redacted())
			}
		}
	})

	t.Run("an approval expires", func(t *testing.T) {
		clock.Advance(consentRememberFor + time.Minute)
		if next := br.authorize(front, webQuery(nil)); !isConsent(next) {
			t.Errorf("after expiry: sent to %s", next.Redacted())
		}
	})
}

// The consent cookie holds at most maxRememberedApprovals approvals, newest kept.
func TestRememberConsentIsBounded(t *testing.T) {
	b := newTestBroker(t, testenv.SharedOP(t), func(c *Config) { c.Mode = ModeHybrid })
	var cookie *http.Cookie
	for i := range maxRememberedApprovals + 5 {
		r := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/consent", nil)
		if cookie != nil {
			r.AddCookie(cookie)
		}
		rec := httptest.NewRecorder()
		b.rememberConsent(rec, r, "https://client-"+strings.Repeat("x", 100)+"/"+string(rune('a'+i)), "https://app.example/cb", []string{"openid", "notes:read", "notes:write"})
		cs := rec.Result().Cookies()
		if len(cs) != 1 {
			t.Fatalf("round %d: cookies %v", i, cs)
		}
		cookie = cs[0]
		if len(cookie.String()) > 4096 {
			t.Fatalf("round %d: cookie of %d bytes", i, len(cookie.String()))
		}
	}
	r := httptest.NewRequest(http.MethodGet, "https://mcp.example.test/oauth/authorize", nil)
	r.AddCookie(cookie)
	approved := b.readConsentCookie(r)
	if len(approved) == 0 || len(approved) > maxRememberedApprovals {
		t.Fatalf("%d approvals kept", len(approved))
	}
	last := "https://client-" + strings.Repeat("x", 100) + "/" + string(rune('a'+maxRememberedApprovals+4))
	if !b.consentRemembered(r, last, "https://app.example/cb", []string{"notes:read"}) {
		t.Error("the newest approval was dropped")
	}
	if b.consentRemembered(r, "https://client-"+strings.Repeat("x", 100)+"/a", "https://app.example/cb", nil) {
		t.Error("the oldest approval was kept")
	}
}

// W15 with a dynamically registered client that copies another client's name: a browser
// that approved the original still gets the consent page for the copy, which shows the
// copy's own client id; after approval the copy's login runs to a code like any other.
func TestConsentRequiredForRegisteredClient(t *testing.T) {
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", func(c *Config) {
		hybridClients(c)
		c.Registration = true
	})
	br := newHybridBrowser(t)
	if next := br.toIdP(front, hybridQuery(nil)); !strings.HasPrefix(next.String(), o.AuthorizationEndpoint+"?") {
		t.Fatalf("approve sent the browser to %s", next.Redacted())
	}

	resp := do(t, http.MethodPost, front.URL+pathRegister, http.Header{"Content-Type": {"application/json"}},
		`{"client_name":"Native Test Client","redirect_uris":["http://127.0.0.1/copy"],"token_endpoint_auth_method":"none"}`)
	var reg struct {
		ClientID string `json:"client_id"`
	}
	decodeJSON(t, resp, &reg)
	if resp.StatusCode != http.StatusCreated || reg.ClientID == "" {
		t.Fatalf("registration: %s %+v", resp.Status, reg)
	}
	copyRedirect := "http://127.0.0.1:40000/copy"
	next := br.authorize(front, hybridAuthorizeQuery(reg.ClientID, copyRedirect, hybridVerifier, "s", nil))
	if !strings.HasPrefix(next.String(), front.URL+pathConsent+"?") {
		t.Fatalf("the copy skipped consent: sent to %s", next.Redacted())
	}
	_, page := br.get(next.String())
	if !strings.Contains(page, reg.ClientID) {
		t.Error("the consent page does not show the copy's client id")
	}
	if code := br.login(front, o, reg.ClientID, copyRedirect, hybridVerifier, nil); code == "" {
		t.Error("no code for the registered client")
	}
}

// SECURITY.md, "remembered consent not bound to the redirect URI": an approval given on a
// page that named one redirect URI does not spare the page for another URI of the same
// client, and approvals remembered before redirect URIs were part of them spare nothing.
func TestConsentBoundToRedirectURI(t *testing.T) {
	o := testenv.SharedOP(t)
	const twin = "twin-client"
	b, front := startHybridFront(t, o, "", func(c *Config) {
		hybridClients(c)
		c.Clients = append(c.Clients, ClientConfig{ClientID: twin, Name: "Claude",
			RedirectURIs: []string{"https://claude.example/cb", "https://evil.example/cb", "http://127.0.0.1/cli", "https://127.1:8443/cb"}})
	})
	isIdP := func(u *url.URL) bool { return strings.HasPrefix(u.String(), o.AuthorizationEndpoint+"?") }
	isConsent := func(u *url.URL) bool { return strings.HasPrefix(u.String(), front.URL+pathConsent+"?") }
	query := func(redirect string) url.Values {
		return hybridAuthorizeQuery(twin, redirect, hybridVerifier, "s", []string{"openid"})
	}

	br := newHybridBrowser(t)
	if next := br.toIdP(front, query("https://claude.example/cb")); !isIdP(next) {
		t.Fatalf("approve sent the browser to %s", next.Redacted())
	}
	if next := br.toIdP(front, query("http://127.0.0.1:40001/cli")); !isIdP(next) {
		t.Fatalf("approve sent the browser to %s", next.Redacted())
	}
	if next := br.toIdP(front, query("https://127.1:8443/cb")); !isIdP(next) {
		t.Fatalf("approve sent the browser to %s", next.Redacted())
	}
	for _, tc := range []struct {
		name string
		q    url.Values
		want func(*url.URL) bool
	}{
		{"the approved redirect URI: remembered", query("https://claude.example/cb"), isIdP},
		{"another registered redirect URI: asked again", query("https://evil.example/cb"), isConsent},
		{"the approved loopback URI on another port: asked again (S1.40)", query("http://127.0.0.1:50123/cli"), isConsent},
		{"the approved loopback URI itself: asked again", query("http://127.0.0.1:40001/cli"), isConsent},
		{"an approved https URI a browser sends to 127.0.0.1: asked again (S1.42)", query("https://127.1:8443/cb"), isConsent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if next := br.authorize(front, tc.q); !tc.want(next) {
				t.Errorf("sent to %s", next.Redacted())
			}
		})
	}

	t.Run("an approval remembered without a redirect URI spares nothing", func(t *testing.T) {
		old, err := b.cfg.Records.Seal(consentCookieKey, []byte(`{"c":[{"i":"twin-client","s":["openid"],"x":9999999999}]}`))
		if err != nil {
			t.Fatal(err)
		}
		u, _ := url.Parse(front.URL + pathAuthorize)
		nb := newHybridBrowser(t)
		nb.client.Jar.SetCookies(u, []*http.Cookie{{Name: "mcp_oauth_consent", Value: old, Path: "/oauth"}})
		for _, redirect := range []string{"https://claude.example/cb", "https://evil.example/cb"} {
			if next := nb.authorize(front, query(redirect)); !isConsent(next) {
				t.Errorf("%s: sent to %s", redirect, next.Redacted())
			}
		}
	})
}
