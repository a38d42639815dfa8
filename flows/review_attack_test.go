package flows

import (
	"bytes"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Attacker review (h-review): findings held as failing tests.

// An ID-JAG is accepted until exp plus assertionLeeway (go-oidc looks from the leeway
// ago), so its jti marker must stand that long too. It is stored until exp alone: a replay
// in the leeway after exp is accepted and mints a second access token. The client
// assertion path adds clockLeeway to its marker (client_assertion.go); this one does not.
func TestReviewIDJAGReplayedWithinLeewayAfterExp(t *testing.T) {
	// Storage on the test clock, so that the marker's TTL is measured on the clock the
	// verifier reads.
	var clock *testenv.Clock
	e := newEMAEnv(t, func(c *Config) {
		ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
		if err != nil {
			t.Fatal(err)
		}
		c.Records = storage.New(&certmagic.FileStorage{Path: t.TempDir()}, ring,
			storage.WithClock(func() time.Time {
				if clock == nil {
					return time.Now()
				}
				return clock.Now()
			}))
	})
	clock = e.clock
	claims := e.ent.claims(e.clock.Now(), e.client) // exp now+5 min
	assertion := e.ent.mint(claims)
	e.redeem(t, assertion, nil).wantTokens(t)

	// 5 min 10 s later: past exp, within the 30 s leeway the verifier allows.
	e.clock.Advance(5*time.Minute + 10*time.Second)
	e.redeem(t, assertion, nil).wantError(t, http.StatusBadRequest, "invalid_grant")

	// The longest-lived ID-JAG accepted (exp an hour ahead): its marker must not be cut
	// short by the store's cap on a marker's life (maxAssertionIDTTL, one hour).
	claims = e.ent.claims(e.clock.Now(), e.client)
	claims["exp"] = e.clock.Now().Add(maxAssertionLifetime).Unix()
	assertion = e.ent.mint(claims)
	e.redeem(t, assertion, nil).wantTokens(t)
	e.clock.Advance(maxAssertionLifetime + 10*time.Second)
	e.redeem(t, assertion, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
}

// Two enterprise issuers whose subject prefixes are equal, or one a prefix of the other,
// map different users to one broker subject: issuer A's "alice" and issuer B's "alice"
// under the same prefix, or A ("acme") user "-eu:bob" and B ("acme-eu:") user "bob". The
// subject is what the upstream's subject header, the app password (a Nextcloud account)
// and the admin API know the user by, so one enterprise's user acts as another's. New
// refuses an issuer without a prefix for this reason, but not prefixes that overlap.
func TestReviewEnterpriseSubjectPrefixesMustNotOverlap(t *testing.T) {
	o := testenv.SharedOP(t)
	records := newTestBroker(t, o, nil).cfg.Records
	for _, tc := range []struct {
		name string
		a, b string
	}{
		{"the same prefix", "ent:", "ent:"},
		{"one prefix a prefix of the other", "acme", "acme-eu:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(Config{
				Mode: ModeHybrid, Issuer: o.Issuer, Resource: testResource, DelegationMode: DelegationNone,
				EnterpriseIssuers: []EnterpriseIssuer{
					{Issuer: "https://idp.a.example", JWKSURI: "https://idp.a.example/jwks", SubjectPrefix: tc.a},
					{Issuer: "https://idp.b.example", JWKSURI: "https://idp.b.example/jwks", SubjectPrefix: tc.b},
				},
				Records: records,
			})
			if err == nil {
				t.Fatalf("New accepted subject prefixes %q and %q: two issuers' users share subjects", tc.a, tc.b)
			}
		})
	}
}

// S1.29 for enterprise sessions: the user's app password ends with the user's last
// session, but sessions created from ID-JAGs are never recorded among the user's sessions
// (noteAppPasswordSession is called on the IdP login only). So a client that revokes its
// own token from one ID-JAG deletes the user's app password in Nextcloud while another
// session of the same user (another ID-JAG, another client) lives: every other client of
// the user breaks until the user logs in to Nextcloud again.
func TestReviewEnterpriseSessionRevokedKeepsOthersAppPassword(t *testing.T) {
	f, ent, info := startEnterpriseAppPassword(t)
	front := f.front
	post := func(path string, form url.Values) *http.Response {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+path, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth(info.ClientID, info.ClientSecret)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	redeem := func() string {
		t.Helper()
		claims := ent.claims(time.Now(), info.ClientID)
		claims["aud"], claims["resource"] = front.URL, f.resource
		resp := post(pathToken, url.Values{"grant_type": {grantJWTBearer}, "assertion": {ent.mint(claims)}})
		var tok TokenResponse
		decodeJSON(t, resp, &tok)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("jwt-bearer: %s", resp.Status)
		}
		return tok.AccessToken
	}
	first, second := redeem(), redeem()
	if err := f.nc.Grant(f.open(t, f.elicit(t, first)), "acme.alice"); err != nil {
		t.Fatal(err)
	}
	if who := f.whoami(t, first); who != "acme.alice" {
		t.Fatalf("the tool saw %q", who)
	}
	resp := post(pathRevoke, url.Values{"token": {first}})
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revocation: %s", resp.Status)
	}
	if pws := f.nc.AppPasswords(); len(pws) != 1 || pws[0].Deleted {
		t.Fatalf("revoking one enterprise session deleted the user's app password in Nextcloud while another lives: %+v", pws)
	}
	if f.stored(t, "acme.alice") == nil {
		t.Fatal("revoking one enterprise session deleted the user's app password here while another lives")
	}
	if who := f.whoami(t, second); who != "acme.alice" {
		t.Errorf("the other session's tool saw %q", who)
	}
}

// A "private-use" scheme is whatever a native client names, and some name a browser:
// x-safari-https://host/path opens https://host/path in Safari (iOS), googlechromes://
// in Chrome. Authorization errors for private-use URIs are redirected to at once, as for
// loopback ones, so anyone (a registration, or a metadata document, needs no approval)
// makes the broker's /authorize an open redirector to a phishing page: the very thing the
// error page for https URIs exists to prevent (RFC 9700 §4.11.2).
func TestReviewPrivateUseSchemeErrorIsNoOpenRedirector(t *testing.T) {
	e := newTokenEnv(t, testenv.SharedOP(t), func(c *Config) { c.Registration = true })
	// Browsers' own schemes open a web page: never a native app's redirect URI.
	for _, redirect := range []string{"x-safari-https://evil.example/phish", "googlechromes://evil.example/phish", "microsoft-edge-https://evil.example/phish"} {
		rec := answerOwn(t, e.b, registerRequest(`{"redirect_uris":["`+redirect+`"],"token_endpoint_auth_method":"none","application_type":"native"}`, ""))
		wantRegistrationError(t, rec, http.StatusBadRequest, "invalid_redirect_uri")
	}
	// Any app may claim a private-use scheme: an error is a page, never a redirect at once.
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	redirect := "com.evil.app:/phish"
	info := registerClient(t, e.b, `{"redirect_uris":["`+redirect+`"],"token_endpoint_auth_method":"none","application_type":"native","client_name":"Agent"}`)
	q := hybridAuthorizeQuery(info.ClientID, redirect, "v", "s", []string{"openid"})
	q.Set("code_challenge_method", "plain") // any error after the redirect URI is trusted
	resp, err := noFollow.Get(e.front.URL + pathAuthorize + "?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusBadRequest || loc != "" {
		t.Errorf("%s: the broker redirected at once to %s", resp.Status, loc)
	}
}
