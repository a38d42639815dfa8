package flows

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// offlineAccessTest is a progressive-mode broker whose resource (and so whose issuer and offline access
// callback) is the test server it is served on, in front of an upstream.
type offlineAccessTest struct {
	logs     *observer.ObservedLogs
	o        *testenv.OP
	b        *Broker
	front    *httptest.Server
	up       *testenv.Upstream
	resource string
}

// Background client credentials of these tests.
const (
	testWorkerID     = "worker"
	testWorkerSecret = "worker-secret"
)

// startOfflineAccess builds the front server first, so that the broker's resource can be its URL:
// the IdP sends browsers back to the broker's origin.
func startOfflineAccess(t *testing.T, o *testenv.OP, change func(*Config)) *offlineAccessTest {
	t.Helper()
	return startOfflineAccessBefore(t, o, change)
}

// startOfflineAccessBefore is startOfflineAccess in front of an upstream with upstream's
// options (testenv.Stateless for 2026-07-28).
func startOfflineAccessBefore(t *testing.T, o *testenv.OP, change func(*Config), upstream ...testenv.UpstreamOption) *offlineAccessTest {
	t.Helper()
	var handler http.Handler
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { handler.ServeHTTP(w, r) }))
	t.Cleanup(front.Close)
	core, logs := observer.New(zap.DebugLevel)
	f := &offlineAccessTest{o: o, logs: logs, front: front, resource: front.URL + "/mcp", up: testenv.StartUpstream(t, testenv.TrustedSubjectHeader(), upstream...)}
	f.b = newTestBroker(t, o, func(c *Config) {
		c.Logger = zap.New(core)
		c.Resource = f.resource
		c.OfflineAccessScopes = []string{"notes:read"}
		c.OfflineAccessTools = []string{"notes_r*"}
		c.BackgroundClients = []BackgroundClient{{ID: testWorkerID, Secret: testWorkerSecret}}
		if change != nil {
			change(c)
		}
	})
	handler = startFront(t, f.b, f.up.URL).Config.Handler
	return f
}

// assertNotLogged fails the test if any of secrets appears in a log line at any level (W13).
func (f *offlineAccessTest) assertNotLogged(t *testing.T, secrets ...string) {
	t.Helper()
	for _, e := range f.logs.All() {
		line, _ := json.Marshal(map[string]any{"msg": e.Message, "fields": e.ContextMap()})
		for _, s := range secrets {
			if s != "" && strings.Contains(string(line), s) {
				t.Errorf("a secret is logged: %s", line)
			}
		}
	}
}

// userToken is an access token of u for the broker's resource, as an MCP client holds it.
func (f *offlineAccessTest) userToken(t *testing.T, u testenv.User) string {
	t.Helper()
	return f.o.LoginGrant(t, u, testenv.NativeClientID, "", []string{"openid", "notes:read"}, f.resource).AccessToken
}

// link asks the broker for an offline access link with token.
func (f *offlineAccessTest) link(t *testing.T, token string) string {
	t.Helper()
	resp := get(t, f.front.URL+pathOfflineAccessStart, bearer(token))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("start: %s", resp.Status)
	}
	var l OfflineAccessLinkResponse
	decodeJSON(t, resp, &l)
	return l.AuthorizationURL
}

// loginAt plays the browser from an offline access link to the broker's callback URL.
func (f *offlineAccessTest) loginAt(t *testing.T, link string, opts ...testenv.LoginOption) *url.URL {
	t.Helper()
	cb, err := f.o.Login(t.Context(), link, append(opts, testenv.LoginWithClient(noRedirect))...)
	if err != nil {
		t.Fatalf("logging in at the IdP: %v", err)
	}
	if !strings.HasPrefix(cb.String(), f.front.URL+f.b.cfg.OfflineAccessCallbackPath+"?") {
		t.Fatalf("the IdP sent the browser to %s", cb.Redacted())
	}
	return cb
}

// callback opens the callback URL as the browser would and returns status and page.
func (f *offlineAccessTest) callback(t *testing.T, cb *url.URL) (*http.Response, string) {
	t.Helper()
	resp, err := noRedirect.Get(cb.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	page, _ := io.ReadAll(resp.Body)
	return resp, string(page)
}

// grantOfflineAccess runs an offline access login to the end for u and fails the test unless it succeeds.
func (f *offlineAccessTest) grantOfflineAccess(t *testing.T, token string) {
	t.Helper()
	resp, page := f.callback(t, f.loginAt(t, f.link(t, token)))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("callback: %s %s", resp.Status, page)
	}
}

// grant reads subject's offline access grant and its refresh token straight from storage.
func (f *offlineAccessTest) grant(t *testing.T, subject string) (*OfflineAccessGrant, string, error) {
	t.Helper()
	g, err := f.b.loadOfflineAccessGrant(t.Context(), subject)
	if err != nil {
		return nil, "", err
	}
	rt, err := f.b.offline.refreshToken(g)
	if err != nil {
		t.Fatalf("opening the stored refresh token: %v", err)
	}
	return g, rt, nil
}

// editGrant changes the stored offline access grant of subject with edit, as a storage
// writer or the passing of time would.
func (f *offlineAccessTest) editGrant(t *testing.T, subject string, edit func(*OfflineAccessGrant)) {
	t.Helper()
	g, err := f.b.loadOfflineAccessGrant(t.Context(), subject)
	if err != nil {
		t.Fatal(err)
	}
	edit(g)
	if err := f.b.offline.putBack(t.Context(), g); err != nil {
		t.Fatal(err)
	}
}

// forgetAccessToken drops the access token the grant of subject keeps for reuse.
func (f *offlineAccessTest) forgetAccessToken(t *testing.T, subject string) {
	f.editGrant(t, subject, func(g *OfflineAccessGrant) { g.AccessToken, g.AccessTokenExpiry = "", time.Time{} })
}

// refreshAsBroker uses a refresh token at the OP directly, as the broker's client.
func refreshAsBroker(t *testing.T, o *testenv.OP, refreshToken string) (*oauth2.Token, error) {
	t.Helper()
	cfg := oauth2.Config{ClientID: testenv.BrokerClientID, ClientSecret: testenv.BrokerClientSecret, Endpoint: o.Endpoint()}
	return cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: refreshToken}).Token()
}

// redirectTarget returns the Location of a 302, parsed.
func redirectTarget(t *testing.T, resp *http.Response) *url.URL {
	t.Helper()
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("status %s, want 302", resp.Status)
	}
	u, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func getWithoutRedirect(t *testing.T, u string) *http.Response {
	t.Helper()
	resp, err := noRedirect.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func TestOfflineAccessStart(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	token := f.userToken(t, o.User)

	t.Run("without a token or a link the challenge starts discovery", func(t *testing.T) {
		resp := get(t, f.front.URL+pathOfflineAccessStart, nil)
		if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer resource_metadata=") {
			t.Errorf("%s %q", resp.Status, resp.Header.Get("WWW-Authenticate"))
		}
	})
	t.Run("an invalid bearer token is refused", func(t *testing.T) {
		resp := get(t, f.front.URL+pathOfflineAccessStart, bearer("not-a-token"))
		var e oauthError
		decodeJSON(t, resp, &e)
		if resp.StatusCode != http.StatusUnauthorized || e.Error != "invalid_token" {
			t.Errorf("%s %+v", resp.Status, e)
		}
	})
	t.Run("a token in the query string is refused", func(t *testing.T) {
		if resp := get(t, f.front.URL+pathOfflineAccessStart+"?access_token="+token, nil); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("status %s", resp.Status)
		}
	})
	t.Run("an unknown link is refused", func(t *testing.T) {
		resp := getWithoutRedirect(t, f.front.URL+pathOfflineAccessStart+"?link=guessed")
		if resp.StatusCode != http.StatusBadRequest || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
			t.Errorf("%s %s", resp.Status, resp.Header.Get("Content-Type"))
		}
	})
	t.Run("POST is not allowed", func(t *testing.T) {
		if resp := do(t, http.MethodPost, f.front.URL+pathOfflineAccessStart, bearer(token), ""); resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("status %s", resp.Status)
		}
	})

	t.Run("the link sends the browser once to the IdP with state, PKCE, nonce and consent", func(t *testing.T) {
		link := f.link(t, token)
		if !strings.HasPrefix(link, f.front.URL+pathOfflineAccessStart+"?link=") {
			t.Fatalf("link %q", link)
		}
		// A HEAD (a link preview) does not spend the link.
		if resp := do(t, http.MethodHead, link, nil, ""); resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("HEAD: %s", resp.Status)
		}
		// A caller-chosen state is not what reaches the IdP (W5).
		to := redirectTarget(t, getWithoutRedirect(t, link+"&state=attacker-state"))
		if got := to.Scheme + "://" + to.Host + to.Path; got != o.AuthorizationEndpoint {
			t.Errorf("redirect to %s, want %s", got, o.AuthorizationEndpoint)
		}
		q := to.Query()
		for k, want := range map[string]string{
			"client_id":             testenv.BrokerClientID,
			"redirect_uri":          f.front.URL + OfflineAccessCallbackLegacy,
			"response_type":         "code",
			"scope":                 "openid offline_access notes:read",
			"code_challenge_method": "S256",
			"prompt":                "consent",
		} {
			if q.Get(k) != want {
				t.Errorf("%s = %q, want %q", k, q.Get(k), want)
			}
		}
		for _, k := range []string{"state", "nonce", "code_challenge"} {
			if len(q.Get(k)) < 43 {
				t.Errorf("%s = %q, want a random value", k, q.Get(k))
			}
		}
		if q.Get("state") == "attacker-state" {
			t.Error("the caller chose the state")
		}
		if resp := getWithoutRedirect(t, link); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("second use of the link: %s", resp.Status)
		}
	})

	t.Run("the link is minted for the token's user, whatever the query says (W8)", func(t *testing.T) {
		link := f.link(t, token) + "&user_id=" + o.OtherUser.Subject + "&subject=" + o.OtherUser.Subject
		u, _ := url.Parse(link)
		var l OfflineAccessLink
		if err := f.b.cfg.Records.Get(t.Context(), recordKey(kindOfflineAccessLink, u.Query().Get("link")), &l); err != nil {
			t.Fatal(err)
		}
		if l.Subject != o.User.Subject || l.ClientID != testenv.NativeClientID {
			t.Errorf("link for %q via %q", l.Subject, l.ClientID)
		}
		to := redirectTarget(t, getWithoutRedirect(t, link))
		var p PendingOfflineAccess
		if err := f.b.cfg.Records.Get(t.Context(), recordKey(kindOfflineAccessState, to.Query().Get("state")), &p); err != nil {
			t.Fatal(err)
		}
		if p.Subject != o.User.Subject {
			t.Errorf("pending login for %q", p.Subject)
		}
		if strings.Contains(p.PKCEVerifier, to.Query().Get("code_challenge")) || len(p.PKCEVerifier) < 43 {
			t.Errorf("PKCE verifier not sealed: %q", p.PKCEVerifier)
		}
	})
}

func TestOfflineAccessCallback(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	token := f.userToken(t, o.User)

	t.Run("a login as another user is refused and nothing is stored", func(t *testing.T) {
		revokes := o.Count(testenv.CountRevoke)
		resp, page := f.callback(t, f.loginAt(t, f.link(t, token), testenv.LoginAs(o.OtherUser)))
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("status %s: %s", resp.Status, page)
		}
		for _, sub := range []string{o.User.Subject, o.OtherUser.Subject} {
			if _, _, err := f.grant(t, sub); !errors.Is(err, storage.ErrNotFound) {
				t.Errorf("grant of %s stored: %v", sub, err)
			}
		}
		if o.Count(testenv.CountRevoke) != revokes+1 {
			t.Error("the other user's refresh token was not revoked at the IdP")
		}
	})
	t.Run("a code from another login is refused by PKCE", func(t *testing.T) {
		to := redirectTarget(t, getWithoutRedirect(t, f.link(t, token)))
		other := f.loginAt(t, f.link(t, token))
		forged := *other
		forged.RawQuery = url.Values{"state": {to.Query().Get("state")}, "code": {other.Query().Get("code")}}.Encode()
		if resp, page := f.callback(t, &forged); resp.StatusCode != http.StatusBadGateway {
			t.Errorf("status %s: %s", resp.Status, page)
		}
		if _, _, err := f.grant(t, o.User.Subject); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("grant stored: %v", err)
		}
	})
	t.Run("an error from the IdP consumes the state and stores nothing", func(t *testing.T) {
		to := redirectTarget(t, getWithoutRedirect(t, f.link(t, token)))
		cb := f.front.URL + OfflineAccessCallbackLegacy + "?" + url.Values{"state": {to.Query().Get("state")}, "error": {"access_denied"}, "error_description": {"<script>x</script>"}}.Encode()
		resp := getWithoutRedirect(t, cb)
		page, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusForbidden || strings.Contains(string(page), "<script>") {
			t.Errorf("status %s: %s", resp.Status, page)
		}
		if resp := getWithoutRedirect(t, cb); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("replay: %s", resp.Status)
		}
	})
	for _, tc := range []struct {
		name  string
		query url.Values
	}{
		{"a missing state is refused", url.Values{"code": {"x"}}},
		{"a state the caller made up is refused (W5)", url.Values{"state": {"attacker-state"}, "code": {"x"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if resp := getWithoutRedirect(t, f.front.URL+OfflineAccessCallbackLegacy+"?"+tc.query.Encode()); resp.StatusCode != http.StatusBadRequest {
				t.Errorf("status %s", resp.Status)
			}
		})
	}

	t.Run("a login as the user who asked stores the sealed grant once", func(t *testing.T) {
		cb := f.loginAt(t, f.link(t, token))
		resp, page := f.callback(t, cb)
		if resp.StatusCode != http.StatusOK || !strings.Contains(page, "Offline access granted") || !strings.Contains(page, "notes:read") {
			t.Fatalf("status %s: %s", resp.Status, page)
		}
		for h, want := range map[string]string{
			"X-Frame-Options":        "DENY",
			"Cache-Control":          "no-store",
			"Referrer-Policy":        "no-referrer",
			"X-Content-Type-Options": "nosniff",
		} {
			if got := resp.Header.Get(h); got != want {
				t.Errorf("%s = %q, want %q", h, got, want)
			}
		}
		if !strings.Contains(resp.Header.Get("Content-Security-Policy"), "frame-ancestors 'none'") {
			t.Errorf("CSP %q", resp.Header.Get("Content-Security-Policy"))
		}
		g, rt, err := f.grant(t, o.User.Subject)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.assertNotLogged(t, rt, cb.Query().Get("code"), cb.Query().Get("state"), token) })
		if g.Subject != o.User.Subject || g.ClientID != testenv.NativeClientID || !slices.Contains(g.Scopes, "offline_access") || !slices.Contains(g.Scopes, "notes:read") {
			t.Errorf("grant %+v", g)
		}
		if rt == "" || strings.Contains(g.RefreshToken, rt) {
			t.Error("the refresh token is not sealed")
		}

		t.Run("the state cannot be replayed", func(t *testing.T) {
			if resp, page := f.callback(t, cb); resp.StatusCode != http.StatusBadRequest {
				t.Errorf("status %s: %s", resp.Status, page)
			}
			if _, again, _ := f.grant(t, o.User.Subject); again != rt {
				t.Error("the replay changed the grant")
			}
		})
		t.Run("granting again replaces the grant and revokes the old token", func(t *testing.T) {
			f.grantOfflineAccess(t, token)
			_, rt2, err := f.grant(t, o.User.Subject)
			if err != nil || rt2 == rt {
				t.Fatalf("grant not replaced: %v", err)
			}
			if _, err := refreshAsBroker(t, o, rt); err == nil {
				t.Error("the replaced refresh token still works at the IdP")
			}
		})
	})
}

// TestOfflineAccessPathsOfEarlierReleases: the start, status and callback endpoints
// answer under their new names and under those of earlier releases, which scripts and
// the IdP registrations of existing deployments use; links the broker hands out name the
// new start path.
func TestOfflineAccessPathsOfEarlierReleases(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	token := f.userToken(t, o.User)

	for _, start := range []string{pathOfflineAccessStart, pathOfflineAccessStartLegacy} {
		t.Run("start at "+start, func(t *testing.T) {
			resp := get(t, f.front.URL+start, bearer(token))
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("start: %s", resp.Status)
			}
			var l OfflineAccessLinkResponse
			decodeJSON(t, resp, &l)
			if !strings.HasPrefix(l.AuthorizationURL, f.front.URL+pathOfflineAccessStart+"?link=") {
				t.Errorf("link %q, want one at %s", l.AuthorizationURL, pathOfflineAccessStart)
			}
			// The link opens at either name.
			u, _ := url.Parse(l.AuthorizationURL)
			to := redirectTarget(t, getWithoutRedirect(t, f.front.URL+start+"?"+u.RawQuery))
			if got := to.Scheme + "://" + to.Host + to.Path; got != o.AuthorizationEndpoint {
				t.Errorf("link opened at %s: redirect to %s, want the IdP", start, got)
			}
		})
	}
	t.Run("the callback of earlier releases is the default redirect_uri", func(t *testing.T) {
		if got := redirectTarget(t, getWithoutRedirect(t, f.link(t, token))).Query().Get("redirect_uri"); got != f.front.URL+OfflineAccessCallbackLegacy {
			t.Errorf("redirect_uri %q, want %q", got, f.front.URL+OfflineAccessCallbackLegacy)
		}
		f.grantOfflineAccess(t, token) // ends at OfflineAccessCallbackLegacy
	})
	for _, status := range []string{pathOfflineAccessStatus, pathOfflineAccessStatusLegacy} {
		t.Run("status at "+status, func(t *testing.T) {
			resp := get(t, f.front.URL+status, bearer(token))
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status: %s", resp.Status)
			}
			var st OfflineAccessStatus
			if decodeJSON(t, resp, &st); !st.Granted {
				t.Errorf("status %+v, want the grant", st)
			}
		})
	}
	t.Run("every name is rate-limited per client IP", func(t *testing.T) {
		for _, p := range []string{pathOfflineAccessStart, pathOfflineAccessStartLegacy, OfflineAccessCallback, OfflineAccessCallbackLegacy} {
			if !NeedsClientIP(p) {
				t.Errorf("NeedsClientIP(%s) = false", p)
			}
		}
	})
}

// TestOfflineAccessCallbackPath: with callback_path set to the new name, the IdP is sent
// that redirect_uri and the login ends there.
func TestOfflineAccessCallbackPath(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, func(c *Config) { c.OfflineAccessCallbackPath = OfflineAccessCallback })
	token := f.userToken(t, o.User)
	if got := redirectTarget(t, getWithoutRedirect(t, f.link(t, token))).Query().Get("redirect_uri"); got != f.front.URL+OfflineAccessCallback {
		t.Errorf("redirect_uri %q, want %q", got, f.front.URL+OfflineAccessCallback)
	}
	f.grantOfflineAccess(t, token) // loginAt checks that the IdP sent the browser to OfflineAccessCallback
	if _, _, err := f.grant(t, o.User.Subject); err != nil {
		t.Errorf("no grant after the login ended at %s: %v", OfflineAccessCallback, err)
	}

	t.Run("any other path is refused", func(t *testing.T) {
		_, err := New(Config{Records: f.b.cfg.Records, OfflineAccessCallbackPath: "/elsewhere"})
		if err == nil || !strings.Contains(err.Error(), "offline_access: callback_path") {
			t.Errorf("New: %v, want a callback_path error", err)
		}
	})
}

func TestOfflineAccessStatusAndRevocation(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	clock := time.Now().UTC().Truncate(time.Second)
	f.b.now = func() time.Time { return clock }
	user, other := f.userToken(t, o.User), f.userToken(t, o.OtherUser)

	status := func(t *testing.T, method, token, query string) OfflineAccessStatus {
		t.Helper()
		resp := do(t, method, f.front.URL+pathOfflineAccessStatus+query, bearer(token), "")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %s", method, resp.Status)
		}
		var st OfflineAccessStatus
		decodeJSON(t, resp, &st)
		return st
	}

	for _, method := range []string{http.MethodGet, http.MethodDelete} {
		t.Run(method+" without a token gets the challenge", func(t *testing.T) {
			if resp := do(t, method, f.front.URL+pathOfflineAccessStatus, nil, ""); resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("status %s", resp.Status)
			}
		})
	}
	t.Run("before granting offline access", func(t *testing.T) {
		if st := status(t, http.MethodGet, user, ""); st.Granted {
			t.Errorf("%+v", st)
		}
	})

	f.grantOfflineAccess(t, user)
	_, refreshToken, err := f.grant(t, o.User.Subject)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("after granting offline access the user sees scopes, time and client", func(t *testing.T) {
		st := status(t, http.MethodGet, user, "")
		if !st.Granted || st.GrantedAt == nil || !st.GrantedAt.Equal(clock) || st.ClientID != testenv.NativeClientID ||
			!slices.Contains(st.Scopes, "notes:read") || !slices.Contains(st.Scopes, "offline_access") {
			t.Errorf("%+v", st)
		}
	})
	t.Run("another user sees only their own status, whatever the query says (W8)", func(t *testing.T) {
		if st := status(t, http.MethodGet, other, "?user_id="+o.User.Subject+"&subject="+o.User.Subject); st.Granted {
			t.Errorf("%+v", st)
		}
	})
	t.Run("another user cannot revoke it (W8)", func(t *testing.T) {
		revokes := o.Count(testenv.CountRevoke)
		status(t, http.MethodDelete, other, "?user_id="+o.User.Subject+"&subject="+o.User.Subject)
		if _, _, err := f.grant(t, o.User.Subject); err != nil {
			t.Errorf("grant gone: %v", err)
		}
		if o.Count(testenv.CountRevoke) != revokes {
			t.Error("the IdP was asked to revoke something")
		}
	})
	t.Run("the user revokes it here and at the IdP", func(t *testing.T) {
		revokes := o.Count(testenv.CountRevoke)
		st := status(t, http.MethodDelete, user, "")
		if st.Granted || st.RevokedAtIdP == nil || !*st.RevokedAtIdP {
			t.Errorf("%+v", st)
		}
		if o.Count(testenv.CountRevoke) != revokes+1 {
			t.Errorf("IdP revocations %d, want %d", o.Count(testenv.CountRevoke), revokes+1)
		}
		if _, _, err := f.grant(t, o.User.Subject); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("grant still stored: %v", err)
		}
		if _, err := refreshAsBroker(t, o, refreshToken); err == nil {
			t.Error("the revoked refresh token still works at the IdP")
		}
		if st := status(t, http.MethodGet, user, ""); st.Granted {
			t.Errorf("status after revocation %+v", st)
		}
	})
	t.Run("revoking twice is harmless", func(t *testing.T) {
		if st := status(t, http.MethodDelete, user, ""); st.Granted {
			t.Errorf("%+v", st)
		}
	})
}

// backgroundRequest asks for a background token with the given Authorization and form.
func (f *offlineAccessTest) backgroundRequest(t *testing.T, authorization string, form url.Values) *http.Response {
	t.Helper()
	h := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
	if authorization != "" {
		h.Set("Authorization", authorization)
	}
	return do(t, http.MethodPost, f.front.URL+pathBackgroundToken, h, form.Encode())
}

// basicCredentials is an HTTP Basic Authorization value.
func basicCredentials(id, secret string) string {
	r, _ := http.NewRequest(http.MethodGet, "/", nil)
	r.SetBasicAuth(id, secret)
	return r.Header.Get("Authorization")
}

// introspectAsBroker asks the OP about token as the broker's client.
func introspectAsBroker(t *testing.T, o *testenv.OP, token string) map[string]any {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, o.IntrospectionEndpoint, strings.NewReader(url.Values{"token": {token}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(testenv.BrokerClientID, testenv.BrokerClientSecret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestBackgroundToken(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	user := f.userToken(t, o.User)
	f.grantOfflineAccess(t, user)
	forUser := url.Values{"subject": {o.User.Subject}}
	worker := basicCredentials(testWorkerID, testWorkerSecret)
	secrets := []string{user, testWorkerSecret, strings.TrimPrefix(worker, "Basic ")}
	t.Cleanup(func() { f.assertNotLogged(t, secrets...) })

	for _, tc := range []struct {
		name          string
		authorization string
		form          url.Values
		status        int
		code          string
	}{
		{"no credentials", "", forUser, 401, "invalid_client"},
		{"a wrong secret", basicCredentials(testWorkerID, "guess"), forUser, 401, "invalid_client"},
		{"an unknown client", basicCredentials("someone", testWorkerSecret), forUser, 401, "invalid_client"},
		{"the broker's own IdP client", basicCredentials(testenv.BrokerClientID, testenv.BrokerClientSecret), forUser, 401, "invalid_client"},
		{"a user's session token", "Bearer " + user, forUser, 401, "invalid_client"},
		{"no subject", worker, url.Values{}, 400, "invalid_request"},
		{"two subjects", worker, url.Values{"subject": {o.User.Subject, o.OtherUser.Subject}}, 400, "invalid_request"},
		{"a user without offline access", worker, url.Values{"subject": {o.OtherUser.Subject}}, 400, "invalid_grant"},
	} {
		t.Run(tc.name+" is refused", func(t *testing.T) {
			refreshes := o.Count("refresh_token")
			resp := f.backgroundRequest(t, tc.authorization, tc.form)
			var e oauthError
			decodeJSON(t, resp, &e)
			if resp.StatusCode != tc.status || e.Error != tc.code {
				t.Errorf("%s %+v, want %d %s", resp.Status, e, tc.status, tc.code)
			}
			if o.Count("refresh_token") != refreshes {
				t.Error("the IdP was asked for a refresh")
			}
			if tc.code == "invalid_grant" && e.Description != "the user has not granted offline access" {
				t.Errorf("description %q", e.Description)
			}
		})
	}
	t.Run("GET is not allowed", func(t *testing.T) {
		if resp := do(t, http.MethodGet, f.front.URL+pathBackgroundToken+"?subject="+o.User.Subject, http.Header{"Authorization": {worker}}, ""); resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("status %s", resp.Status)
		}
	})
	t.Run("background credentials are no bearer token on the MCP endpoint", func(t *testing.T) {
		f.up.Reset()
		resp := do(t, http.MethodPost, f.resource, http.Header{"Authorization": {worker}}, `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`)
		if resp.StatusCode != http.StatusUnauthorized || len(f.up.Seen()) != 0 {
			t.Errorf("%s, upstream saw %d", resp.Status, len(f.up.Seen()))
		}
		resp = do(t, http.MethodPost, f.resource, bearer(testWorkerSecret), `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("secret as bearer: %s", resp.Status)
		}
	})

	t.Run("a background client gets a token for the user and the refresh token rotates", func(t *testing.T) {
		before, rt0, err := f.grant(t, o.User.Subject)
		if err != nil {
			t.Fatal(err)
		}
		refreshes := o.Count("refresh_token")
		resp := f.backgroundRequest(t, worker, forUser)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %s", resp.Status)
		}
		if resp.Header.Get("Cache-Control") != "no-store" {
			t.Error("token response may be cached")
		}
		var tr TokenResponse
		decodeJSON(t, resp, &tr)
		if tr.AccessToken == "" || tr.TokenType != "Bearer" || tr.ExpiresIn <= 0 || tr.RefreshToken != "" || !strings.Contains(tr.Scope, "notes:read") {
			t.Errorf("token response %+v", tr)
		}
		if o.Count("refresh_token") != refreshes+1 {
			t.Errorf("IdP refreshes %d, want %d", o.Count("refresh_token"), refreshes+1)
		}
		info := introspectAsBroker(t, o, tr.AccessToken)
		if info["active"] != true || info["sub"] != o.User.Subject || !strings.Contains(info["scope"].(string), "notes:read") {
			t.Errorf("introspection %v", info)
		}
		after, rt1, err := f.grant(t, o.User.Subject)
		if err != nil {
			t.Fatal(err)
		}
		secrets = append(secrets, rt0, rt1, tr.AccessToken)
		if rt1 == rt0 || after.RotatedAt.IsZero() || !after.GrantedAt.Equal(before.GrantedAt) {
			t.Errorf("not rotated: same token %v, rotated_at %s", rt1 == rt0, after.RotatedAt)
		}
		if _, err := refreshAsBroker(t, o, rt0); err == nil {
			t.Error("the rotated-away refresh token still works")
		}
	})

	t.Run("the token is handed out again while it lives; one about to expire is replaced", func(t *testing.T) {
		get := func() TokenResponse {
			t.Helper()
			resp := f.backgroundRequest(t, worker, forUser)
			var tr TokenResponse
			decodeJSON(t, resp, &tr)
			if resp.StatusCode != http.StatusOK || tr.AccessToken == "" {
				t.Fatalf("background token: %s", resp.Status)
			}
			secrets = append(secrets, tr.AccessToken)
			return tr
		}
		refreshes := o.Count("refresh_token")
		first, again := get(), get()
		if again.AccessToken != first.AccessToken || o.Count("refresh_token") != refreshes {
			t.Errorf("a second request while the token lives: same token %v, %d IdP refreshes, want the same token and none",
				again.AccessToken == first.AccessToken, o.Count("refresh_token")-refreshes)
		}
		if again.ExpiresIn <= 0 || again.ExpiresIn > first.ExpiresIn || again.Scope != first.Scope {
			t.Errorf("the token again: expires_in %d (first %d), scope %q (first %q)", again.ExpiresIn, first.ExpiresIn, again.Scope, first.Scope)
		}
		f.editGrant(t, o.User.Subject, func(g *OfflineAccessGrant) { g.AccessTokenExpiry = time.Now().Add(backgroundTokenReuse / 2) })
		if next := get(); next.AccessToken == first.AccessToken || o.Count("refresh_token") != refreshes+1 {
			t.Errorf("a token about to expire was handed out again (%v), or not refreshed once", next.AccessToken == first.AccessToken)
		}
	})

	t.Run("a refresh token swapped into the access token's field is never handed out", func(t *testing.T) {
		_, rt, err := f.grant(t, o.User.Subject)
		if err != nil {
			t.Fatal(err)
		}
		f.editGrant(t, o.User.Subject, func(g *OfflineAccessGrant) { g.AccessToken = g.RefreshToken })
		resp := f.backgroundRequest(t, worker, forUser)
		var tr TokenResponse
		decodeJSON(t, resp, &tr)
		if resp.StatusCode != http.StatusOK || tr.AccessToken == "" || tr.AccessToken == rt {
			t.Errorf("%s: the refresh token handed out %v", resp.Status, tr.AccessToken == rt)
		}
		secrets = append(secrets, tr.AccessToken)
	})

	t.Run("concurrent requests for one user cost one IdP refresh and get one token", func(t *testing.T) {
		const n = 3
		f.forgetAccessToken(t, o.User.Subject)
		refreshes := o.Count("refresh_token")
		var wg sync.WaitGroup
		tokens := make([]string, n)
		statuses := make([]int, n)
		for i := range n {
			wg.Go(func() {
				req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, f.front.URL+pathBackgroundToken, strings.NewReader(forUser.Encode()))
				req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
				req.Header.Set("Authorization", worker)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					return
				}
				defer resp.Body.Close()
				statuses[i] = resp.StatusCode
				var tr TokenResponse
				_ = json.NewDecoder(resp.Body).Decode(&tr)
				tokens[i] = tr.AccessToken
			})
		}
		wg.Wait()
		secrets = append(secrets, tokens...)
		for i := range n {
			if statuses[i] != http.StatusOK || tokens[i] == "" {
				t.Errorf("request %d: status %d", i, statuses[i])
			}
		}
		if got := o.Count("refresh_token"); got != refreshes+1 {
			t.Errorf("IdP refreshes %d, want %d (one, then its token handed out again)", got, refreshes+1)
		}
		for i := range n {
			if tokens[i] != tokens[0] {
				t.Errorf("request %d got another token than the first", i)
			}
		}
		if _, rt, err := f.grant(t, o.User.Subject); err != nil {
			t.Fatal(err)
		} else if _, err := refreshAsBroker(t, o, rt); err != nil {
			t.Errorf("the stored refresh token is not the live one: %v", err)
		}
	})

	t.Run("a grant the IdP no longer honours is deleted with a clear error", func(t *testing.T) {
		// The previous subtest spent the stored refresh token at the IdP directly, which
		// rotated it there: the stored one is dead. It is found at the next refresh.
		f.forgetAccessToken(t, o.User.Subject)
		resp := f.backgroundRequest(t, worker, forUser)
		var e oauthError
		decodeJSON(t, resp, &e)
		if resp.StatusCode != http.StatusBadRequest || e.Error != "invalid_grant" || !strings.Contains(e.Description, "no longer valid") {
			t.Errorf("%s %+v", resp.Status, e)
		}
		if _, _, err := f.grant(t, o.User.Subject); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("dead grant kept: %v", err)
		}
	})

	t.Run("after revocation the worker gets invalid_grant", func(t *testing.T) {
		f.grantOfflineAccess(t, user)
		if resp := do(t, http.MethodDelete, f.front.URL+pathOfflineAccessStatus, bearer(user), ""); resp.StatusCode != http.StatusOK {
			t.Fatalf("revoking: %s", resp.Status)
		}
		resp := f.backgroundRequest(t, worker, forUser)
		var e oauthError
		decodeJSON(t, resp, &e)
		if resp.StatusCode != http.StatusBadRequest || e.Error != "invalid_grant" {
			t.Errorf("%s %+v", resp.Status, e)
		}
	})
}

func TestBackgroundTokenIdPDown(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	f.grantOfflineAccess(t, f.userToken(t, o.User))
	_, rt, _ := f.grant(t, o.User.Subject)
	o.SetDown(true)
	resp := f.backgroundRequest(t, basicCredentials(testWorkerID, testWorkerSecret), url.Values{"subject": {o.User.Subject}})
	o.SetDown(false)
	var e oauthError
	decodeJSON(t, resp, &e)
	if resp.StatusCode != http.StatusServiceUnavailable || e.Error != "temporarily_unavailable" {
		t.Errorf("%s %+v", resp.Status, e)
	}
	if _, again, err := f.grant(t, o.User.Subject); err != nil || again != rt {
		t.Errorf("a failed refresh changed the grant: %v", err)
	}
}

// TestOfflineAccessLoginSendsResource: the offline access login sends the delegation
// audience, a URL, as RFC 8707 `resource` to the IdP's authorize, and asks for its own
// scopes, not the client's.
func TestOfflineAccessLoginSendsResource(t *testing.T) {
	o := testenv.SharedOP(t)
	const audience = "https://cloud.example/mcp"
	f := startOfflineAccess(t, o, func(c *Config) {
		c.DelegationMode = DelegationTokenExchange
		c.DelegationAudience = audience
	})
	to := redirectTarget(t, getWithoutRedirect(t, f.link(t, f.userToken(t, o.User))))
	q := to.Query()
	if !slices.Equal(q["resource"], []string{audience}) || q.Get("scope") != "openid offline_access notes:read" {
		t.Errorf("resource %q scope %q at the IdP's authorize", q["resource"], q.Get("scope"))
	}
}
