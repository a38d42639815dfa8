package flows

import (
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// Helpers for hybrid-mode tests: a front server whose URL is the broker's issuer, a
// browser with a cookie jar, and hybridLogin, which runs a whole login and returns the
// broker's authorization code.

// startHybridFront starts a hybrid-mode broker for o behind a front server (startFront's
// broker + reverse proxy to upstream) whose resource is the front's own URL + "/mcp": the
// broker's issuer is the resource's origin, and the OP must redirect back to it. change
// edits the configuration after the hybrid defaults. upstream may be "" when no request
// passes on.
func startHybridFront(t testing.TB, o *testenv.OP, upstream string, change func(*Config)) (*Broker, *httptest.Server) {
	t.Helper()
	return startHybridFrontWith(t, o, upstream, change, nil)
}

// startHybridFrontWith is startHybridFront with prepare run on the broker before the
// front serves (to set fields such as b.now without a data race).
func startHybridFrontWith(t testing.TB, o *testenv.OP, upstream string, change func(*Config), prepare func(*Broker)) (*Broker, *httptest.Server) {
	t.Helper()
	var inner http.Handler
	front := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inner.ServeHTTP(w, r)
	}))
	base := "http://" + front.Listener.Addr().String()
	b := newTestBroker(t, o, func(c *Config) {
		c.Mode = ModeHybrid
		c.Resource = base + "/mcp"
		if change != nil {
			change(c)
		}
	})
	if prepare != nil {
		prepare(b)
	}
	// startFront's handler, served on the address the broker was built for.
	inner = startFront(t, b, upstream).Config.Handler
	front.Start()
	t.Cleanup(front.Close)
	return b, front
}

// hybridBrowser is a user's browser: it keeps cookies and reports redirects instead of
// following them.
type hybridBrowser struct {
	t      testing.TB
	client *http.Client
}

func newHybridBrowser(t testing.TB) *hybridBrowser {
	t.Helper()
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &hybridBrowser{t: t, client: &http.Client{
		Jar:           jar,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

// get requests u and returns the response with its body read.
func (br *hybridBrowser) get(u string) (*http.Response, string) {
	br.t.Helper()
	return br.do(http.MethodGet, u, nil, nil)
}

// post sends form to u.
func (br *hybridBrowser) post(u string, form url.Values, header http.Header) (*http.Response, string) {
	br.t.Helper()
	return br.do(http.MethodPost, u, form, header)
}

func (br *hybridBrowser) do(method, u string, form url.Values, header http.Header) (*http.Response, string) {
	br.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(br.t.Context(), method, u, body)
	if err != nil {
		br.t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := br.client.Do(req)
	if err != nil {
		br.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		br.t.Fatal(err)
	}
	return resp, string(b)
}

// redirect returns where a 302 points, failing the test for anything else.
func (br *hybridBrowser) redirect(resp *http.Response, body string) *url.URL {
	br.t.Helper()
	if resp.StatusCode != http.StatusFound {
		br.t.Fatalf("%s %s: want 302, got %s: %.300s", resp.Request.Method, resp.Request.URL.Path, resp.Status, body)
	}
	loc, err := resp.Request.URL.Parse(resp.Header.Get("Location"))
	if err != nil {
		br.t.Fatal(err)
	}
	return loc
}

var (
	hybridTicketField = regexp.MustCompile(`name="ticket" value="([^"]*)"`)
	hybridCSRFField   = regexp.MustCompile(`name="csrf" value="([^"]*)"`)
)

// consentForm reads the ticket and CSRF token from a consent page.
func consentForm(t testing.TB, page string) (ticket, csrf string) {
	t.Helper()
	m1, m2 := hybridTicketField.FindStringSubmatch(page), hybridCSRFField.FindStringSubmatch(page)
	if m1 == nil || m2 == nil {
		t.Fatalf("no consent form on the page: %.500s", page)
	}
	return m1[1], m2[1]
}

// hybridAuthorizeQuery is an authorization request of clientID with PKCE S256 for
// verifier; empty scopes leave scope out, an empty redirectURI leaves it out.
func hybridAuthorizeQuery(clientID, redirectURI, verifier, state string, scopes []string) url.Values {
	q := url.Values{
		"response_type":         {"code"},
		"client_id":             {clientID},
		"code_challenge":        {oauth2.S256ChallengeFromVerifier(verifier)},
		"code_challenge_method": {"S256"},
		"state":                 {state},
	}
	if redirectURI != "" {
		q.Set("redirect_uri", redirectURI)
	}
	if len(scopes) > 0 {
		q.Set("scope", strings.Join(scopes, " "))
	}
	return q
}

// authorize sends an authorization request and returns where the broker sends the
// browser: the consent page, or the IdP when this browser's consent is remembered.
func (br *hybridBrowser) authorize(front *httptest.Server, q url.Values) *url.URL {
	br.t.Helper()
	return br.redirect(br.get(front.URL + pathAuthorize + "?" + q.Encode()))
}

// approve answers the consent page at consentURL with decision ("approve" or "deny")
// and returns where the broker sends the browser.
func (br *hybridBrowser) decide(consentURL *url.URL, decision string) *url.URL {
	br.t.Helper()
	resp, page := br.get(consentURL.String())
	if resp.StatusCode != http.StatusOK {
		br.t.Fatalf("consent page: %s: %.300s", resp.Status, page)
	}
	ticket, csrf := consentForm(br.t, page)
	form := url.Values{"ticket": {ticket}, "csrf": {csrf}, "decision": {decision}}
	return br.redirect(br.post(consentURL.Scheme+"://"+consentURL.Host+pathConsent, form, nil))
}

// toIdP runs authorize and, unless consent is remembered, approves: it returns the URL
// of the IdP's authorization endpoint the broker sends the browser to.
func (br *hybridBrowser) toIdP(front *httptest.Server, q url.Values) *url.URL {
	br.t.Helper()
	next := br.authorize(front, q)
	if next.Path == pathConsent && strings.HasPrefix(next.String(), front.URL) {
		next = br.decide(next, "approve")
	}
	return next
}

// loginAtIdP signs in at the OP from idpURL and returns the broker callback URL the OP
// redirects to, without requesting it.
func (br *hybridBrowser) loginAtIdP(o *testenv.OP, idpURL *url.URL, opts ...testenv.LoginOption) *url.URL {
	br.t.Helper()
	cb, err := o.Login(br.t.Context(), idpURL.String(), append(opts, testenv.LoginWithClient(br.client))...)
	if err != nil {
		br.t.Fatalf("logging in at the OP: %v", err)
	}
	return cb
}

// login runs a whole hybrid login in this browser and returns the broker's code; it
// checks that the client's redirect URI gets the code with the client's state and the
// broker's iss.
func (br *hybridBrowser) login(front *httptest.Server, o *testenv.OP, clientID, redirectURI, verifier string, scopes []string, opts ...testenv.LoginOption) string {
	br.t.Helper()
	state := "st-" + randomToken()[:12]
	idp := br.toIdP(front, hybridAuthorizeQuery(clientID, redirectURI, verifier, state, scopes))
	cb := br.loginAtIdP(o, idp, opts...)
	if !strings.HasPrefix(cb.String(), front.URL+pathCallback+"?") {
		br.t.Fatalf("the OP redirected to %s, want the broker's callback", cb.Redacted())
	}
	final := br.redirect(br.get(cb.String()))
	q := final.Query()
	if e := q.Get("error"); e != "" {
		br.t.Fatalf("the client got error=%s (%s)", e, q.Get("error_description"))
	}
	if redirectURI != "" && !strings.HasPrefix(final.String(), redirectURI+"?") {
		br.t.Fatalf("the code went to %s, want %s", final.Redacted(), redirectURI)
	}
	if q.Get("state") != state || q.Get("iss") != front.URL || q.Get("code") == "" {
		br.t.Fatalf("client redirect: state %q (want %q), iss %q (want %q), code set %v",
			q.Get("state"), state, q.Get("iss"), front.URL, q.Get("code") != "")
	}
	return q.Get("code")
}

// hybridLogin runs a whole hybrid login in a fresh browser: authorize → consent page →
// approve → the OP's login form (as o.User unless opts say testenv.LoginAs) → the
// broker's callback. It returns the authorization code the broker sent to redirectURI
// (with the right state and iss). verifier is the PKCE verifier the code is bound to;
// empty scopes ask for the client's defaults; an empty redirectURI uses the client's only
// registered one.
func hybridLogin(t *testing.T, front *httptest.Server, o *testenv.OP, clientID, redirectURI, verifier string, scopes []string, opts ...testenv.LoginOption) string {
	t.Helper()
	return newHybridBrowser(t).login(front, o, clientID, redirectURI, verifier, scopes, opts...)
}
