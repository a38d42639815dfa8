package flows

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// The fuzz targets of the endpoints a stranger reaches first. `go test` runs their seeds;
// scripts/fuzz.sh runs each with -fuzz for as long as it is told. Seeds come from
// SECURITY.md's attack rows (W1, S1.4, S1.17, S2.1, S2.4).

// fuzzPeer gives each fuzzed request an address of its own, so that the per-address rate
// limits (which have their own tests) do not turn every later input into a 429.
var fuzzPeer atomic.Uint32

func fuzzRequest(req *http.Request) *http.Request {
	n := fuzzPeer.Add(1)
	return req.WithContext(WithClientIP(req.Context(), fmt.Sprintf("10.%d.%d.%d", n>>16&255, n>>8&255, n&255)))
}

// oauthErrorCodes are the `error` values the broker answers its OAuth endpoints with
// (RFC 6749 §4.1.2.1, §5.2; RFC 7591 §3.2.2; RFC 6750 §3.1).
var oauthErrorCodes = map[string]bool{
	"invalid_request": true, "invalid_client": true, "invalid_grant": true, "unauthorized_client": true,
	"unsupported_grant_type": true, "invalid_scope": true, "access_denied": true,
	"unsupported_response_type": true, "server_error": true, "temporarily_unavailable": true,
	"invalid_redirect_uri": true, "invalid_client_metadata": true, "invalid_target": true,
}

// checkOAuthError fails unless rec is a refusal as RFC 6749 writes it: a 4xx (never a 5xx
// for a stranger's input) whose JSON body, if any, names a known `error`.
func checkOAuthError(t *testing.T, what string, rec *httptest.ResponseRecorder) {
	t.Helper()
	if rec.Code >= 500 {
		t.Fatalf("%s: %d for a stranger's input: %s", what, rec.Code, rec.Body.String())
	}
	if !strings.HasPrefix(rec.Header().Get("Content-Type"), "application/json") {
		return
	}
	var e struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil {
		t.Fatalf("%s: %d with a body that is not JSON: %q", what, rec.Code, rec.Body.String())
	}
	if rec.Code >= 400 && !oauthErrorCodes[e.Error] {
		t.Fatalf("%s: %d with error %q, not an OAuth error code", what, rec.Code, e.Error)
	}
}

// FuzzRedirectURI: an accepted redirect URI is https, or http on a loopback host, with no
// userinfo or fragment (W1); one that matches a registered URI is accepted itself and
// equals it but for a loopback port.
func FuzzRedirectURI(f *testing.F) {
	for _, s := range []string{
		"https://app.example.com/cb", "http://127.0.0.1/callback", "http://127.0.0.1:8765/callback",
		"http://localhost:@evil.com/cb", "http://localhost.evil.com/cb", "http://127.0.0.1.evil.com/cb",
		"https://app.example.com/cb#frag", "https://user@app.example.com/cb", "http://[::1]:0/cb",
		"http://localhost:/cb", "https://xn--80ak6aa92e.com/cb", "https://аррӏе.com/cb", "https://a.com/\u202ecb",
		"javascript:alert(1)", "HTTPS://APP.EXAMPLE.COM/cb", "http://127.0.0.1:65536/cb", "https://%61pp.example.com/cb",
	} {
		f.Add(s, "http://127.0.0.1/callback")
	}
	f.Add("com.example.app:/cb", "com.example.app:/cb")
	f.Add("com.example.app:/cb?x=1", "com.example.app:/cb")
	f.Add("javascript:/alert(1)", "javascript:/alert(1)")
	f.Fuzz(func(t *testing.T, requested, registered string) {
		err := CheckRedirectURI(requested)
		if err == nil {
			u, perr := url.Parse(requested)
			if perr != nil {
				t.Fatalf("accepted %q, which url.Parse refuses: %v", requested, perr)
			}
			if u.User != nil || u.Fragment != "" || strings.Contains(requested, "#") {
				t.Fatalf("accepted %q with userinfo or a fragment", requested)
			}
			if u.Scheme != "https" && (u.Scheme != "http" || !IsLoopbackHost(u.Hostname())) {
				t.Fatalf("accepted %q: neither https nor http on a loopback host", requested)
			}
		}
		if !MatchRedirectURI([]string{registered}, requested) {
			return
		}
		if err != nil && requested == registered && isPrivateUseRedirectURI(requested) {
			return // a native app's scheme: registered only by native clients, matched only exactly
		}
		if err != nil {
			t.Fatalf("%q matched %q but is not an acceptable redirect URI: %v", requested, registered, err)
		}
		if requested == registered {
			return
		}
		req, _ := url.Parse(requested)
		reg, rerr := url.Parse(registered)
		if rerr != nil || reg.Scheme != "http" || !IsLoopbackHost(reg.Hostname()) || !IsLoopbackHost(req.Hostname()) {
			t.Fatalf("%q matched %q without being equal, and not as a loopback URI with another port", requested, registered)
		}
	})
}

// FuzzAuthorizeQuery: whatever the query, the hybrid authorization endpoint never answers
// 5xx, and never redirects anywhere but its own consent page or a redirect URI registered
// for a configured client (S1.17: no open redirector).
func FuzzAuthorizeQuery(f *testing.F) {
	good := hybridQuery(nil)
	f.Add(good.Encode())
	for _, change := range []func(url.Values){
		func(q url.Values) { q.Set("redirect_uri", "http://localhost:@evil.com/cb") },
		func(q url.Values) { q.Set("redirect_uri", "https://evil.example/cb"); q.Set("response_type", "token") },
		func(q url.Values) { q.Set("scope", strings.Repeat("notes:read ", 100)) },
		func(q url.Values) { q.Set("state", strings.Repeat("s", 5000)) },
		func(q url.Values) { q.Set("code_challenge_method", "plain") },
		func(q url.Values) { q.Add("redirect_uri", "http://127.0.0.1/cb2") },
		func(q url.Values) { q.Set("client_id", "https://evil.example/client.json") },
		func(q url.Values) { q.Set("resource", "https://other.example/mcp") },
		func(q url.Values) { q.Del("code_challenge") },
	} {
		q := hybridQuery(nil)
		change(q)
		f.Add(q.Encode())
	}
	f.Add("client_id=%zz&redirect_uri=%")
	f.Add(";;;&&&=")

	b := newTestBroker(f, testenv.SharedOP(f), func(c *Config) {
		c.Mode = ModeHybrid
		c.Registration = true
		hybridClients(c)
	})
	registered := map[string]bool{}
	for _, c := range b.cfg.Clients {
		for _, u := range c.RedirectURIs {
			registered[u] = true
		}
	}
	f.Fuzz(func(t *testing.T, query string) {
		req := httptest.NewRequest(http.MethodGet, "https://mcp.example.test"+pathAuthorize, nil)
		req.URL.RawQuery = query
		req = fuzzRequest(req)
		rec := httptest.NewRecorder()
		if pass, _ := b.Handle(rec, req); pass != nil {
			t.Fatal("the authorization endpoint passed a request on")
		}
		if rec.Code >= 500 {
			t.Fatalf("%d for query %q: %s", rec.Code, query, rec.Body.String())
		}
		loc := rec.Header().Get("Location")
		if loc == "" {
			return
		}
		u, err := url.Parse(loc)
		if err != nil {
			t.Fatalf("unparsable Location %q", loc)
		}
		if (u.Host == "" || u.Host == req.Host) && u.Path == pathConsent {
			return
		}
		target := *u
		target.RawQuery = ""
		if u.Scheme == "http" && IsLoopbackHost(u.Hostname()) {
			target.Host = u.Hostname() // any loopback port matches (RFC 8252 §7.3)
		}
		if !registered[target.String()] {
			t.Fatalf("query %q redirected to %q, which no configured client registered", query, loc)
		}
	})
}

// FuzzTokenRequest: no form a stranger posts to the token endpoint gets a token (there is
// no code or refresh token to redeem) or a 5xx; every refusal is an OAuth error.
func FuzzTokenRequest(f *testing.F) {
	for _, s := range []string{
		"grant_type=authorization_code&code=x&code_verifier=y&client_id=native-client&redirect_uri=http%3A%2F%2F127.0.0.1%2Fcallback",
		"grant_type=refresh_token&refresh_token=mcprt_x&client_id=native-client",
		"grant_type=client_credentials",
		"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=x",
		"grant_type=authorization_code&grant_type=refresh_token",
		"grant_type=refresh_token&refresh_token=x&resource=https%3A%2F%2Fa&resource=https%3A%2F%2Fb",
		"%zz=%zz", "",
	} {
		f.Add(s, "application/x-www-form-urlencoded", "")
	}
	f.Add("grant_type=refresh_token&refresh_token=x&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion=eyJhbGciOiJub25lIn0.eyJzdWIiOiJuYXRpdmUtY2xpZW50In0.", "application/x-www-form-urlencoded", "")
	f.Add("grant_type=authorization_code&client_id=native-client&client_assertion_type=x&client_assertion=a.b.c", "application/x-www-form-urlencoded", "")
	f.Add("grant_type=refresh_token&refresh_token=x", "application/json", "Basic bmF0aXZlLWNsaWVudDo=")
	f.Add("grant_type=authorization_code", "application/x-www-form-urlencoded; charset=latin1", "Basic !!!")

	b := newTestBroker(f, testenv.SharedOP(f), func(c *Config) { c.Mode = ModeHybrid })
	f.Fuzz(func(t *testing.T, body, contentType, authorization string) {
		req := httptest.NewRequest(http.MethodPost, "https://mcp.example.test"+pathToken, strings.NewReader(body))
		req.Header.Set("Content-Type", contentType)
		if authorization != "" {
			req.Header.Set("Authorization", authorization)
		}
		req = fuzzRequest(req)
		rec := httptest.NewRecorder()
		if pass, _ := b.Handle(rec, req); pass != nil {
			t.Fatal("the token endpoint passed a request on")
		}
		if rec.Code < 400 {
			t.Fatalf("%d for a stranger's form %q: %s", rec.Code, body, rec.Body.String())
		}
		checkOAuthError(t, "token "+body, rec)
	})
}

// FuzzRegistration: no registration body gets a 5xx; one that is accepted stores only
// acceptable redirect URIs, within the caps of S2.1.
func FuzzRegistration(f *testing.F) {
	f.Add(registrationJSON([]string{"https://app.example.com/cb"}, "App", ""))
	f.Add(registrationJSON([]string{"http://localhost:@evil.com/cb"}, "x", ""))
	f.Add(registrationJSON(repeatURI(6, "https://app.example.com/cb0"), "x", ""))
	f.Add(registrationJSON([]string{longURI(513, "a")}, strings.Repeat("名", 101), ""))
	f.Add(registrationJSON([]string{"https://a.example/cb"}, "\u202eevil", `"token_endpoint_auth_method":"client_secret_basic","grant_types":["implicit"]`))
	f.Add(registrationJSON([]string{"com.example.app:/cb"}, "x", `"application_type":"native"`))
	f.Add(registrationJSON([]string{"javascript:/alert(1)"}, "x", `"application_type":"native"`))
	f.Add(registrationJSON([]string{"com.example.app:/cb"}, "x", `"application_type":"web"`))
	f.Add(`{"redirect_uris":"https://a.example/cb"}`)
	f.Add(`{"redirect_uris":[1,2,3]}`)
	f.Add(`[`)

	b := newTestBroker(f, testenv.SharedOP(f), func(c *Config) {
		c.Mode = ModeHybrid
		c.Registration = true
		c.RegistrationRate, c.RegistrationRateTotal = 1<<30, 1<<30
	})
	f.Fuzz(func(t *testing.T, body string) {
		rec := httptest.NewRecorder()
		if pass, _ := b.Handle(rec, fuzzRequest(registerRequest(body, ""))); pass != nil {
			t.Fatal("the registration endpoint passed a request on")
		}
		checkOAuthError(t, "register", rec)
		if rec.Code != http.StatusCreated {
			return
		}
		var info struct {
			RedirectURIs    []string `json:"redirect_uris"`
			ClientName      string   `json:"client_name"`
			ApplicationType string   `json:"application_type"`
		}
		if err := json.Unmarshal(rec.Body.Bytes(), &info); err != nil {
			t.Fatalf("201 with a body that is not client information: %v", err)
		}
		if len(info.RedirectURIs) == 0 || len(info.RedirectURIs) > 5 {
			t.Fatalf("registered %d redirect URIs", len(info.RedirectURIs))
		}
		for _, u := range info.RedirectURIs {
			err := CheckRedirectURI(u)
			if err != nil && info.ApplicationType == ApplicationTypeNative && isPrivateUseRedirectURI(u) {
				err = nil // a native app's private-use scheme
			}
			if err != nil || len(u) > 512 {
				t.Fatalf("registered redirect URI %q (application_type %q): %v", u, info.ApplicationType, err)
			}
		}
		if info.ApplicationType != "" && info.ApplicationType != ApplicationTypeWeb && info.ApplicationType != ApplicationTypeNative {
			t.Fatalf("registered application_type %q", info.ApplicationType)
		}
		if n := len([]rune(info.ClientName)); n > 100 {
			t.Fatalf("registered a client_name of %d characters", n)
		}
	})
}
