package flows

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// sessions returns the broker's stored sessions.
func sessions(t *testing.T, b *Broker) []Session {
	t.Helper()
	keys, err := b.cfg.Records.List(t.Context(), storage.Key(kindSession))
	if err != nil {
		t.Fatal(err)
	}
	var out []Session
	for _, k := range keys {
		var s Session
		if err := b.cfg.Records.Get(t.Context(), k, &s); err != nil {
			t.Fatal(err)
		}
		s.key = k // as loadSession does: the grant opens only where it was read
		out = append(out, s)
	}
	return out
}

// onlySession is b's one stored session and its opened IdP grant; any other number of
// sessions fails the test.
func onlySession(t *testing.T, b *Broker) (Session, IdPGrant) {
	t.Helper()
	ss := sessions(t, b)
	if len(ss) != 1 {
		t.Fatalf("%d sessions, want 1", len(ss))
	}
	g, err := b.sessions.grant(&ss[0])
	if err != nil {
		t.Fatal(err)
	}
	return ss[0], g
}

// The whole hybrid login: the client's redirect URI gets a broker code with its state
// and the broker's iss; the session holds the IdP grant of the user who logged in.
func TestHybridLogin(t *testing.T) {
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", hybridClients)

	verifier := oauth2.GenerateVerifier()
	code := hybridLogin(t, front, o, testenv.NativeClientID, hybridRedirectURI, verifier, []string{"openid", "notes:read"}, testenv.LoginAs(o.OtherUser))
	if code == "" {
		t.Fatal("no code")
	}

	ss := sessions(t, b)
	if len(ss) != 1 {
		t.Fatalf("%d sessions", len(ss))
	}
	s := ss[0]
	if s.Subject != o.OtherUser.Subject || s.ClientID != testenv.NativeClientID || !slices.Equal(s.Scopes, []string{"openid", "notes:read"}) {
		t.Errorf("session %+v", s)
	}
	g, err := b.sessions.grant(&s)
	if err != nil {
		t.Fatal(err)
	}
	if g.AccessToken == "" || g.RefreshToken == "" || g.IDToken == "" || g.Expiry.IsZero() {
		t.Errorf("IdP grant incomplete: access %v refresh %v id %v expiry %v", g.AccessToken != "", g.RefreshToken != "", g.IDToken != "", g.Expiry)
	}
	// The IdP was asked for the client's scopes, openid and offline_access: not the
	// configured notes:write (S1.20).
	for _, want := range []string{"openid", "offline_access", "notes:read"} {
		if !slices.Contains(g.Scopes, want) {
			t.Errorf("IdP grant scopes %v lack %s", g.Scopes, want)
		}
	}
	if slices.Contains(g.Scopes, "notes:write") {
		t.Errorf("IdP grant scopes %v hold notes:write, which the client did not ask for", g.Scopes)
	}
	if keys, _ := b.cfg.Records.List(t.Context(), storage.Key(kindIdPState)); len(keys) != 0 {
		t.Errorf("%d pending logins left behind", len(keys))
	}

	// The client redeems the code at the broker's token endpoint with its verifier.
	conf := oauth2.Config{
		ClientID:    testenv.NativeClientID,
		Endpoint:    oauth2.Endpoint{TokenURL: front.URL + pathToken, AuthStyle: oauth2.AuthStyleInParams},
		RedirectURL: hybridRedirectURI,
	}
	tok, err := conf.Exchange(t.Context(), code, oauth2.VerifierOption(verifier), oauth2.SetAuthURLParam("resource", front.URL+"/mcp"))
	if err != nil {
		t.Fatalf("redeeming the broker's code: %v", err)
	}
	if tok.AccessToken == "" || tok.AccessToken == g.AccessToken || tok.RefreshToken == g.RefreshToken {
		t.Error("the client got no broker token, or the IdP's own")
	}
}

// startLogin runs authorize and consent in br and signs in at the OP; it returns the
// callback URL the OP sends the browser to, not yet requested.
func startLogin(t *testing.T, br *hybridBrowser, front string, o *testenv.OP, q url.Values) *url.URL {
	t.Helper()
	next := br.redirect(br.get(front + pathAuthorize + "?" + q.Encode()))
	if next.Path == pathConsent {
		next = br.decide(next, "approve")
	}
	return br.loginAtIdP(o, next)
}

func TestCallbackRefusals(t *testing.T) {
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", hybridClients)

	t.Run("a replayed state is refused", func(t *testing.T) {
		br := newHybridBrowser(t)
		cb := startLogin(t, br, front.URL, o, hybridQuery(nil))
		if final := br.redirect(br.get(cb.String())); final.Query().Has("error") {
			t.Fatalf("first callback: %v", final.Query())
		}
		before := len(sessions(t, b))
		resp, body := br.get(cb.String())
		if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" || !strings.Contains(body, `"invalid_request"`) {
			t.Errorf("replay: %s %q %s", resp.Status, resp.Header.Get("Location"), body)
		}
		if len(sessions(t, b)) != before {
			t.Error("the replay created a session")
		}
	})

	for _, tc := range []struct {
		name  string
		query string
	}{
		{"no state", "code=abc"},
		{"unknown state", "code=abc&state=forged"},
		{"an IdP error with an unknown state", "error=access_denied&state=forged"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(sessions(t, b))
			resp, body := newHybridBrowser(t).get(front.URL + pathCallback + "?" + tc.query)
			if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" || !strings.Contains(body, `"invalid_request"`) {
				t.Errorf("%s %q %s", resp.Status, resp.Header.Get("Location"), body)
			}
			if len(sessions(t, b)) != before {
				t.Error("a session was created")
			}
		})
	}

	// W15: a login at the IdP that the broker did not start (no consent, no state of
	// its own) yields nothing, even though the IdP redirects to the broker's callback.
	t.Run("an IdP login the broker did not start", func(t *testing.T) {
		conf := oauth2.Config{ClientID: testenv.BrokerClientID, Endpoint: o.Endpoint(), RedirectURL: front.URL + pathCallback, Scopes: []string{"openid"}}
		v := oauth2.GenerateVerifier()
		cb, err := o.Login(t.Context(), conf.AuthCodeURL("attacker-state", oauth2.S256ChallengeOption(v)))
		if err != nil {
			t.Fatal(err)
		}
		before := len(sessions(t, b))
		resp, _ := newHybridBrowser(t).get(cb.String())
		if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
			t.Errorf("%s %q", resp.Status, resp.Header.Get("Location"))
		}
		if len(sessions(t, b)) != before {
			t.Error("a session was created")
		}
	})
}

// The IdP's error reaches the client as a fixed code with the client's state; nothing
// the IdP wrote is echoed (W11).
func TestCallbackIdPError(t *testing.T) {
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", hybridClients)

	for _, tc := range []struct {
		idpError string
		want     string
	}{
		{"access_denied", "access_denied"},
		{"temporarily_unavailable", "temporarily_unavailable"},
		{"login_required", "server_error"},
		{"<script>x</script>", "server_error"},
	} {
		t.Run(tc.idpError, func(t *testing.T) {
			br := newHybridBrowser(t)
			idp := br.toIdP(front, hybridQuery(nil))
			state := idp.Query().Get("state")
			evil := "IdP-internal-detail-" + randomToken()[:8]
			q := url.Values{"state": {state}, "error": {tc.idpError}, "error_description": {evil}, "error_uri": {"https://evil.example/" + evil}}
			final := br.redirect(br.get(front.URL + pathCallback + "?" + q.Encode()))
			if got := final.Scheme + "://" + final.Host + final.Path; got != hybridRedirectURI {
				t.Fatalf("sent to %s", final.Redacted())
			}
			fq := final.Query()
			if fq.Get("error") != tc.want || fq.Get("state") != "client-state-123" || fq.Get("iss") != front.URL || fq.Has("code") {
				t.Errorf("client redirect query %v", fq)
			}
			if strings.Contains(final.String(), evil) || strings.Contains(final.String(), "%3Cscript") {
				t.Errorf("IdP text echoed: %s", final)
			}
			// The state is spent either way.
			if resp, _ := br.get(front.URL + pathCallback + "?" + q.Encode()); resp.StatusCode != http.StatusBadRequest {
				t.Errorf("second use of the state: %s", resp.Status)
			}
		})
	}
	if n := len(sessions(t, b)); n != 0 {
		t.Errorf("%d sessions after IdP errors", n)
	}
}

// A code the IdP refuses, an ID token with another nonce, and an IdP that went down
// each end the login with an error to the client and no session.
func TestCallbackExchangeFailures(t *testing.T) {
	o := testenv.StartOP(t)
	b, front := startHybridFront(t, o, "", hybridClients)

	check := func(t *testing.T, final *url.URL, want string) {
		t.Helper()
		q := final.Query()
		if got := final.Scheme + "://" + final.Host + final.Path; got != hybridRedirectURI {
			t.Fatalf("sent to %s", final.Redacted())
		}
		if q.Get("error") != want || q.Get("state") != "client-state-123" || q.Get("iss") != front.URL || q.Has("code") {
			t.Errorf("client redirect query %v, want error=%s", q, want)
		}
		if n := len(sessions(t, b)); n != 0 {
			t.Errorf("%d sessions", n)
		}
	}

	t.Run("a code the IdP does not know", func(t *testing.T) {
		br := newHybridBrowser(t)
		cb := startLogin(t, br, front.URL, o, hybridQuery(nil))
		q := cb.Query()
		q.Set("code", "forged-code")
		check(t, br.redirect(br.get(front.URL+pathCallback+"?"+q.Encode())), "server_error")
	})

	t.Run("an ID token with another nonce", func(t *testing.T) {
		br := newHybridBrowser(t)
		cb := startLogin(t, br, front.URL, o, hybridQuery(nil))
		// Fault injection: the stored nonce no longer matches the one the IdP signed.
		key := recordKey(kindIdPState, cb.Query().Get("state"))
		var p PendingLogin
		if err := b.cfg.Records.Get(t.Context(), key, &p); err != nil {
			t.Fatal(err)
		}
		p.Nonce = randomToken()
		if err := b.cfg.Records.Put(t.Context(), key, p, idpStateTTL); err != nil {
			t.Fatal(err)
		}
		check(t, br.redirect(br.get(cb.String())), "server_error")
	})

	t.Run("a mix-up: the callback names another issuer", func(t *testing.T) {
		br := newHybridBrowser(t)
		cb := startLogin(t, br, front.URL, o, hybridQuery(nil))
		q := cb.Query()
		q.Set("iss", "https://evil.example")
		check(t, br.redirect(br.get(front.URL+pathCallback+"?"+q.Encode())), "server_error")
	})

	t.Run("the IdP is down", func(t *testing.T) {
		br := newHybridBrowser(t)
		cb := startLogin(t, br, front.URL, o, hybridQuery(nil))
		o.SetDown(true)
		defer o.SetDown(false)
		check(t, br.redirect(br.get(cb.String())), "temporarily_unavailable")
	})
}

// While the IdP is down and undiscovered, approving sends the error to the client.
func TestConsentApproveIdPUnavailable(t *testing.T) {
	o := testenv.StartOP(t)
	o.SetDown(true)
	_, front := startHybridFront(t, o, "", hybridClients)
	br := newHybridBrowser(t)
	final := br.decide(consentURLFor(t, br, front, hybridQuery(nil)), "approve")
	q := final.Query()
	if got := final.Scheme + "://" + final.Host + final.Path; got != hybridRedirectURI || q.Get("error") != "temporarily_unavailable" ||
		q.Get("state") != "client-state-123" || q.Get("iss") != front.URL {
		t.Errorf("sent to %s", final)
	}
}

// W13: a whole login, errors included, logs no token, code, verifier, ticket, CSRF
// token, state, nonce or secret.
func TestHybridLoginLogsNoSecrets(t *testing.T) {
	o := testenv.SharedOP(t)
	core, logs := observer.New(zapcore.DebugLevel)
	b, front := startHybridFront(t, o, "", func(c *Config) {
		hybridClients(c)
		c.Logger = zap.New(core)
	})

	br := newHybridBrowser(t)
	verifier := oauth2.GenerateVerifier()
	consentURL := consentURLFor(t, br, front, hybridAuthorizeQuery(testenv.NativeClientID, hybridRedirectURI, verifier, "client-state-123", nil))
	_, page := br.get(consentURL.String())
	ticket, csrf := consentForm(t, page)
	// A forged post and a bad callback, for their log lines.
	br.post(front.URL+pathConsent, url.Values{"ticket": {ticket}, "csrf": {"forged-" + csrf}, "decision": {"approve"}}, nil)
	idp := br.decide(consentURL, "approve")
	cb := br.loginAtIdP(o, idp)
	final := br.redirect(br.get(cb.String()))
	br.get(cb.String()) // replay
	code := final.Query().Get("code")
	if code == "" {
		t.Fatalf("no code: %v", final.Query())
	}
	sess, g := onlySession(t, b)

	var all strings.Builder
	for _, e := range logs.All() {
		fmt.Fprintf(&all, "%s %v\n", e.Message, e.ContextMap())
	}
	if logs.Len() == 0 {
		t.Fatal("nothing logged")
	}
	for name, secret := range map[string]string{
		"broker code": code, "PKCE verifier": verifier, "consent ticket": ticket, "CSRF token": csrf,
		"IdP state": idp.Query().Get("state"), "nonce": idp.Query().Get("nonce"), "IdP code": cb.Query().Get("code"),
		"IdP access token": g.AccessToken, "IdP refresh token": g.RefreshToken, "ID token": g.IDToken,
		"client secret": testenv.BrokerClientSecret, "session id": sess.ID,
	} {
		if secret != "" && strings.Contains(all.String(), secret) {
			t.Errorf("the log holds the %s", name)
		}
	}
}

// TestIdPLoginAsksForTheClientsGrant (SECURITY.md S1.20): the IdP is asked for the
// client's scopes, openid and offline_access, never every configured scope. At an IdP
// that ignores `scope` on refresh (the Nextcloud oidc app) refresh delegation cannot
// narrow, so a login that asked for more would put it into every delegated token. The
// delegation audience, a URL, goes to the IdP's authorize as RFC 8707 `resource`.
func TestIdPLoginAsksForTheClientsGrant(t *testing.T) {
	const audience = "https://cloud.example/mcp"
	o := testenv.StartOP(t, testenv.WithoutTokenExchangeAdvertised(), testenv.WithRefreshScopeIgnored())
	b, front := startHybridFront(t, o, "", func(c *Config) {
		c.Scopes = []string{"openid", "notes:read", "notes:write"}
		c.DelegationMode = DelegationRefresh
		c.DelegationAudience = audience
		c.ToolScopes = delegationToolScopes
	})
	br := newHybridBrowser(t)
	state := "st-" + randomToken()[:12]
	idpURL := br.toIdP(front, hybridAuthorizeQuery(testenv.NativeClientID, hybridRedirectURI, hybridVerifier, state, []string{"openid", "notes:read"}))
	q := idpURL.Query()
	if got, want := q.Get("scope"), "openid offline_access notes:read"; got != want {
		t.Errorf("the IdP is asked for scope %q, want %q", got, want)
	}
	if got := q["resource"]; !slices.Equal(got, []string{audience}) {
		t.Errorf("resource %q at the IdP's authorize, want %q", got, audience)
	}
	final := br.redirect(br.get(br.loginAtIdP(o, idpURL).String()))
	if final.Query().Get("code") == "" {
		t.Fatalf("no code: %s", final.Redacted())
	}
	s, g := onlySession(t, b)
	if slices.Contains(g.Scopes, "notes:write") || !slices.Equal(s.Scopes, []string{"openid", "notes:read"}) {
		t.Errorf("session scopes %v, IdP grant %v: want no notes:write", s.Scopes, g.Scopes)
	}

	who := &idp.Principal{Subject: s.Subject, ClientID: s.ClientID, Scopes: s.Scopes, SessionID: s.ID, Expiry: time.Now().Add(time.Hour)}
	o.ResetCounts()
	c := delegatedClaims(t, o, mustDelegate(t, b, who, "broker-token", []string{"notes:read"}))
	if n := o.Count("refresh_token"); n != 1 {
		t.Fatalf("%d refreshes, want 1", n)
	}
	if strings.Contains(c.Scope, "notes:write") || !strings.Contains(c.Scope, "notes:read") {
		t.Errorf("the delegated token carries scope %q; the client was granted openid notes:read", c.Scope)
	}
	if !slices.Equal(c.Audience, []string{audience}) {
		t.Errorf("the delegated token's aud %v, want %s", c.Audience, audience)
	}
}

// TestIdPAuthorizeResourceOnlyForAURL: `resource` goes to the IdP only when the
// delegation audience is an absolute URL (RFC 8707 §2), and never without delegation.
func TestIdPAuthorizeResourceOnlyForAURL(t *testing.T) {
	o := testenv.SharedOP(t)
	for _, tc := range []struct {
		name, mode, audience string
	}{
		{"a logical name", DelegationTokenExchange, "nextcloud"},
		{"delegation none", DelegationNone, "https://cloud.example/mcp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, front := startHybridFront(t, o, "", func(c *Config) {
				c.DelegationMode = tc.mode
				c.DelegationAudience = tc.audience
			})
			idpURL := newHybridBrowser(t).toIdP(front, hybridQuery(nil))
			if q := idpURL.Query(); q.Has("resource") || q.Get("scope") != "openid offline_access notes:read" {
				t.Errorf("resource %q scope %q", q["resource"], q.Get("scope"))
			}
		})
	}
}
