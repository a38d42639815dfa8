package flows

import (
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// authorizeQuery is a good progressive authorization request of the native client; change edits it.
func authorizeQuery(change func(url.Values)) url.Values {
	q := url.Values{
		"response_type":         {"code"},
		"client_id":             {testenv.NativeClientID},
		"redirect_uri":          {"http://127.0.0.1:49152/callback"},
		"state":                 {"client-state-123"},
		"code_challenge":        {oauth2.S256ChallengeFromVerifier("a-verifier-that-is-long-enough-for-pkce-0123456789")},
		"code_challenge_method": {"S256"},
		"scope":                 {"openid notes:read"},
	}
	if change != nil {
		change(q)
	}
	return q
}

// noRedirect is an HTTP client that reports redirects instead of following them. It
// keeps cookies, as a browser does: a login at the IdP is bound to the browser that
// started it by a cookie.
var noRedirect = &http.Client{
	Jar:           mustCookieJar(),
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

func mustCookieJar() http.CookieJar {
	jar, err := cookiejar.New(nil)
	if err != nil {
		panic(err)
	}
	return jar
}

func authorize(t *testing.T, front string, q url.Values) *http.Response {
	t.Helper()
	resp, err := noRedirect.Get(front + "/oauth/authorize?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// The Python original's validations in its order, with its codes; SECURITY.md W1's
// redirect URIs; none redirects.
func TestAuthorizeProgressiveRefusals(t *testing.T) {
	o := testenv.SharedOP(t)
	front := startFront(t, newTestBroker(t, o, nil), testenv.StartUpstream(t, testenv.TrustedSubjectHeader()).URL)

	redirect := func(uri string) func(url.Values) { return func(q url.Values) { q.Set("redirect_uri", uri) } }
	for _, tc := range []struct {
		name   string
		change func(url.Values)
		status int
		code   string
	}{
		{"response_type token", func(q url.Values) { q.Set("response_type", "token") }, 400, "unsupported_response_type"},
		{"missing redirect_uri", func(q url.Values) { q.Del("redirect_uri") }, 400, "invalid_request"},
		{"userinfo before host", redirect("http://localhost:@evil.com/cb"), 400, "invalid_request"},
		{"loopback name as a subdomain", redirect("http://127.0.0.1.evil.com/cb"), 400, "invalid_request"},
		{"non-numeric port", redirect("http://localhost:abc/cb"), 400, "invalid_request"},
		{"empty port", redirect("http://localhost:/cb"), 400, "invalid_request"},
		{"fragment", redirect("https://app.example.com/cb#x"), 400, "invalid_request"},
		{"plain http off loopback", redirect("http://evil.com/cb"), 400, "invalid_request"},
		{"missing state", func(q url.Values) { q.Del("state") }, 400, "invalid_request"},
		{"missing code_challenge", func(q url.Values) { q.Del("code_challenge") }, 400, "invalid_request"},
		{"plain PKCE", func(q url.Values) { q.Set("code_challenge_method", "plain") }, 400, "invalid_request"},
		{"missing client_id", func(q url.Values) { q.Del("client_id") }, 400, "invalid_request"},
		{"unknown client", func(q url.Values) { q.Set("client_id", "stranger") }, 401, "unauthorized_client"},
		{"unregistered loopback path", redirect("http://127.0.0.1:49152/other"), 401, "unauthorized_client"},
		{"unregistered https host", redirect("https://evil.example/cb"), 401, "unauthorized_client"},
		{"registered https with a longer path", redirect("https://app.example.com/cb/x"), 401, "unauthorized_client"},
		{"scope the client may not ask for", func(q url.Values) { q.Set("scope", "openid admin") }, 401, "unauthorized_client"},
		{"another resource", func(q url.Values) { q.Set("resource", "https://other.example/mcp") }, 400, "invalid_target"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := authorize(t, front.URL, authorizeQuery(tc.change))
			if loc := resp.Header.Get("Location"); loc != "" {
				t.Fatalf("redirected to %s", loc)
			}
			var e oauthError
			decodeJSON(t, resp, &e)
			if resp.StatusCode != tc.status || e.Error != tc.code || e.Description == "" {
				t.Errorf("got %d %+v, want %d %s", resp.StatusCode, e, tc.status, tc.code)
			}
		})
	}
}

// The progressive login end to end: the broker sends the browser to the IdP with the client's own state
// and PKCE; the client redeems the code at the IdP itself, and its token passes the broker.
func TestAuthorizeProgressiveFlow1(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)

	verifier := oauth2.GenerateVerifier()
	q := authorizeQuery(func(q url.Values) { q.Set("code_challenge", oauth2.S256ChallengeFromVerifier(verifier)) })
	resp := authorize(t, front.URL, q)
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("status %s", resp.Status)
	}
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	if got := loc.Scheme + "://" + loc.Host + loc.Path; got != o.AuthorizationEndpoint {
		t.Errorf("sent to %s, want the IdP's %s", got, o.AuthorizationEndpoint)
	}
	lq := loc.Query()
	for k, want := range map[string]string{
		"client_id": testenv.NativeClientID, "redirect_uri": q.Get("redirect_uri"), "state": q.Get("state"),
		"code_challenge": q.Get("code_challenge"), "code_challenge_method": "S256", "resource": testResource,
		"response_type": "code", "scope": "openid notes:read",
	} {
		if lq.Get(k) != want {
			t.Errorf("%s = %q, want %q", k, lq.Get(k), want)
		}
	}

	callback, err := o.Login(t.Context(), loc.String())
	if err != nil {
		t.Fatalf("login: %v", err)
	}
	if callback.Query().Get("state") != q.Get("state") {
		t.Errorf("state %q came back", callback.Query().Get("state"))
	}
	cfg := oauth2.Config{ClientID: testenv.NativeClientID, Endpoint: o.Endpoint(), RedirectURL: q.Get("redirect_uri")}
	tok, err := cfg.Exchange(t.Context(), callback.Query().Get("code"), oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatalf("redeeming the code with the client's verifier: %v", err)
	}
	s := connect(t, front.URL, tok.AccessToken)
	if _, err := s.ListTools(t.Context(), nil); err != nil {
		t.Fatalf("tools/list with the progressive login's token: %v", err)
	}
}

// public_issuer: browsers go to the IdP's public address; discovery is fetched once.
func TestAuthorizeProgressivePublicIssuer(t *testing.T) {
	o := testenv.SharedOP(t)
	var discoveries atomic.Int32
	counting := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if strings.HasSuffix(r.URL.Path, "/.well-known/openid-configuration") {
			discoveries.Add(1)
		}
		return http.DefaultTransport.RoundTrip(r)
	})}
	b := newTestBroker(t, o, func(c *Config) {
		c.PublicIssuer = "https://cloud.example.com/nc"
		c.HTTPClient = counting
	})
	for i := 0; i < 3; i++ {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodGet, "/oauth/authorize?"+authorizeQuery(nil).Encode(), nil)
		if pass, _ := b.Handle(rec, req); pass != nil {
			t.Fatal("authorize passed the request on")
		}
		loc := rec.Header().Get("Location")
		want := "https://cloud.example.com/nc" + strings.TrimPrefix(o.AuthorizationEndpoint, o.Issuer) + "?"
		if rec.Code != http.StatusFound || !strings.HasPrefix(loc, want) {
			t.Fatalf("%d %s", rec.Code, loc)
		}
	}
	if n := discoveries.Load(); n != 1 {
		t.Errorf("discovery fetched %d times, want 1", n)
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
