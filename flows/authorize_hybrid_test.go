package flows

import (
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

const (
	hybridVerifier    = "a-verifier-that-is-long-enough-for-pkce-0123456789"
	hybridRedirectURI = "http://127.0.0.1:49152/callback"
	// singleURIClient has exactly one registered redirect URI.
	singleURIClient = "single-uri-client"
	singleURI       = "https://single.example.com/cb"
	// secondClient is another registered client, for consent bound to the client id.
	secondClient      = "second-client"
	secondRedirectURI = "http://127.0.0.1:50000/cb2"
	// xssClient has markup in its name.
	xssClient     = "xss-client"
	xssClientName = `<script>alert("pwned")</script> & Co`
	// webClient has https redirect URIs, for which approvals are remembered (S1.40).
	webClient      = "web-client"
	webRedirectURI = "https://web.example.com/cb"
)

// hybridClients adds the clients of the hybrid tests to newTestBroker's native client.
func hybridClients(c *Config) {
	c.Clients = append(c.Clients,
		ClientConfig{ClientID: singleURIClient, Name: "Single URI", RedirectURIs: []string{singleURI}, Scopes: []string{"openid", "notes:read"}},
		ClientConfig{ClientID: secondClient, Name: "Second Client", RedirectURIs: []string{"http://127.0.0.1/cb2"}},
		ClientConfig{ClientID: xssClient, Name: xssClientName, RedirectURIs: []string{"https://xss.example.com/cb"}},
		ClientConfig{ClientID: webClient, Name: "Web Client", RedirectURIs: []string{webRedirectURI}},
	)
}

// webQuery is a good hybrid authorization request of the web client; change edits it.
func webQuery(change func(url.Values)) url.Values {
	q := hybridAuthorizeQuery(webClient, webRedirectURI, hybridVerifier, "client-state-123", []string{"openid", "notes:read"})
	if change != nil {
		change(q)
	}
	return q
}

// hybridQuery is a good hybrid authorization request of the native client; change edits it.
func hybridQuery(change func(url.Values)) url.Values {
	q := hybridAuthorizeQuery(testenv.NativeClientID, hybridRedirectURI, hybridVerifier, "client-state-123", []string{"openid", "notes:read"})
	if change != nil {
		change(q)
	}
	return q
}

// Before the redirect URI is trusted, nothing redirects: a JSON 400 names the problem.
func TestAuthorizeHybridRefusalsBeforeTrust(t *testing.T) {
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", hybridClients)

	redirect := func(uri string) func(url.Values) { return func(q url.Values) { q.Set("redirect_uri", uri) } }
	for _, tc := range []struct {
		name   string
		change func(url.Values)
		code   string
	}{
		{"missing client_id", func(q url.Values) { q.Del("client_id") }, "invalid_request"},
		{"unknown client", func(q url.Values) { q.Set("client_id", "stranger") }, "invalid_client"},
		{"repeated client_id", func(q url.Values) { q.Add("client_id", secondClient) }, "invalid_request"},
		{"repeated redirect_uri", func(q url.Values) { q.Add("redirect_uri", "https://evil.example/cb") }, "invalid_request"},
		{"userinfo before host", redirect("http://localhost:@evil.com/cb"), "invalid_request"},
		{"loopback name as a subdomain", redirect("http://127.0.0.1.evil.com/cb"), "invalid_request"},
		{"non-numeric port", redirect("http://localhost:abc/cb"), "invalid_request"},
		{"empty port", redirect("http://localhost:/cb"), "invalid_request"},
		{"fragment", redirect("https://app.example.com/cb#x"), "invalid_request"},
		{"plain http off loopback", redirect("http://evil.com/cb"), "invalid_request"},
		{"unregistered loopback path", redirect("http://127.0.0.1:49152/other"), "invalid_request"},
		{"unregistered https host", redirect("https://evil.example/cb"), "invalid_request"},
		{"registered https with a longer path", redirect("https://app.example.com/cb/x"), "invalid_request"},
		{"another client's redirect URI", redirect(secondRedirectURI), "invalid_request"},
		{"missing redirect_uri with two registered", func(q url.Values) { q.Del("redirect_uri") }, "invalid_request"},
		// Even a request with every later error gets no redirect while the URI is untrusted.
		{"bad redirect URI beats plain PKCE", func(q url.Values) {
			q.Set("redirect_uri", "https://evil.example/cb")
			q.Set("code_challenge_method", "plain")
		}, "invalid_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := authorize(t, front.URL, hybridQuery(tc.change))
			if loc := resp.Header.Get("Location"); loc != "" {
				t.Fatalf("redirected to %s", loc)
			}
			var e oauthError
			decodeJSON(t, resp, &e)
			if resp.StatusCode != http.StatusBadRequest || e.Error != tc.code || e.Description == "" {
				t.Errorf("got %d %+v, want 400 %s", resp.StatusCode, e, tc.code)
			}
		})
	}
}

// Once the redirect URI is trusted, errors go back to the client with error,
// error_description, its state and the broker's iss, and no consent ticket is made.
func TestAuthorizeHybridErrorsAfterTrust(t *testing.T) {
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", hybridClients)

	for _, tc := range []struct {
		name   string
		change func(url.Values)
		code   string
	}{
		{"plain PKCE", func(q url.Values) {
			q.Set("code_challenge_method", "plain")
			q.Set("code_challenge", hybridVerifier)
		}, "invalid_request"},
		{"PKCE method left out (plain by default)", func(q url.Values) { q.Del("code_challenge_method") }, "invalid_request"},
		{"missing code_challenge", func(q url.Values) { q.Del("code_challenge") }, "invalid_request"},
		{"code_challenge not S256-shaped", func(q url.Values) { q.Set("code_challenge", "short") }, "invalid_request"},
		{"missing response_type", func(q url.Values) { q.Del("response_type") }, "invalid_request"},
		{"response_type token", func(q url.Values) { q.Set("response_type", "token") }, "unsupported_response_type"},
		{"repeated scope", func(q url.Values) { q.Add("scope", "notes:write") }, "invalid_request"},
		{"another resource", func(q url.Values) { q.Set("resource", "https://other.example/mcp") }, "invalid_target"},
		{"a second resource besides ours", func(q url.Values) {
			q["resource"] = []string{front.URL + "/mcp", "https://other.example/mcp"}
		}, "invalid_target"},
		{"scope nobody configured", func(q url.Values) { q.Set("scope", "openid admin") }, "invalid_scope"},
		{"scope the client may not ask for", func(q url.Values) {
			q.Set("client_id", singleURIClient)
			q.Set("redirect_uri", singleURI)
			q.Set("scope", "openid notes:write")
		}, "invalid_scope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := hybridQuery(tc.change)
			resp := authorize(t, front.URL, q)
			if resp.StatusCode != http.StatusFound {
				t.Fatalf("status %s", resp.Status)
			}
			loc, err := url.Parse(resp.Header.Get("Location"))
			if err != nil {
				t.Fatal(err)
			}
			if got, want := loc.Scheme+"://"+loc.Host+loc.Path, q.Get("redirect_uri"); got != want {
				t.Errorf("error sent to %s, want %s", got, want)
			}
			lq := loc.Query()
			if lq.Get("error") != tc.code || lq.Get("error_description") == "" || lq.Get("state") != "client-state-123" || lq.Get("iss") != front.URL {
				t.Errorf("error redirect query %v, want error=%s with state and iss", lq, tc.code)
			}
			if lq.Has("code") {
				t.Error("a code came with the error")
			}
		})
	}

	t.Run("state too long is not echoed", func(t *testing.T) {
		resp := authorize(t, front.URL, hybridQuery(func(q url.Values) { q.Set("state", strings.Repeat("s", maxStateLen+1)) }))
		loc, _ := url.Parse(resp.Header.Get("Location"))
		if resp.StatusCode != http.StatusFound || loc.Query().Get("error") != "invalid_request" || loc.Query().Has("state") {
			t.Errorf("%s %v", resp.Status, loc)
		}
	})
}

// A good request is stored as a consent ticket, and the browser goes to the consent page.
func TestAuthorizeHybridStoresConsentTicket(t *testing.T) {
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", hybridClients)

	for _, tc := range []struct {
		name        string
		change      func(url.Values)
		redirectURI string
		scopes      []string
		resource    string
	}{
		{"scopes as asked", nil, hybridRedirectURI, []string{"openid", "notes:read"}, ""},
		{"default scopes: the client's, advertised, never offline_access", func(q url.Values) { q.Del("scope") },
			hybridRedirectURI, []string{"openid", "notes:read", "notes:write"}, ""},
		{"offline_access asked is dropped, duplicates folded", func(q url.Values) { q.Set("scope", "notes:read offline_access notes:read") },
			hybridRedirectURI, []string{"notes:read"}, ""},
		{"our resource is kept", func(q url.Values) { q.Set("resource", front.URL+"/mcp") },
			hybridRedirectURI, []string{"openid", "notes:read"}, front.URL + "/mcp"},
		{"loopback port differs from the registered one", func(q url.Values) { q.Set("redirect_uri", "http://127.0.0.1:61234/callback") },
			"http://127.0.0.1:61234/callback", []string{"openid", "notes:read"}, ""},
		{"single registered URI may be left out", func(q url.Values) {
			q.Set("client_id", singleURIClient)
			q.Del("redirect_uri")
			q.Del("scope")
		}, singleURI, []string{"openid", "notes:read"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := hybridQuery(tc.change)
			resp := authorize(t, front.URL, q)
			if resp.StatusCode != http.StatusFound {
				t.Fatalf("status %s", resp.Status)
			}
			loc, err := url.Parse(resp.Header.Get("Location"))
			if err != nil {
				t.Fatal(err)
			}
			if got := loc.Scheme + "://" + loc.Host + loc.Path; got != front.URL+pathConsent {
				t.Fatalf("sent to %s, want the consent page", got)
			}
			if resp.Header.Get("Cache-Control") != "no-store" {
				t.Errorf("Cache-Control %q", resp.Header.Get("Cache-Control"))
			}
			var ct ConsentTicket
			if err := b.cfg.Records.Get(t.Context(), recordKey(kindConsent, loc.Query().Get("ticket")), &ct); err != nil {
				t.Fatalf("no consent ticket: %v", err)
			}
			want := AuthorizationRequest{
				ClientID:            q.Get("client_id"),
				RedirectURI:         tc.redirectURI,
				State:               "client-state-123",
				CodeChallenge:       oauth2.S256ChallengeFromVerifier(hybridVerifier),
				CodeChallengeMethod: "S256",
				Scopes:              tc.scopes,
				Resource:            tc.resource,
			}
			if got := ct.Request; got.ClientID != want.ClientID || got.RedirectURI != want.RedirectURI || got.State != want.State ||
				got.CodeChallenge != want.CodeChallenge || got.CodeChallengeMethod != want.CodeChallengeMethod ||
				!slices.Equal(got.Scopes, want.Scopes) || got.Resource != want.Resource ||
				got.RedirectURIOmitted != !q.Has("redirect_uri") {
				t.Errorf("ticket request\n got %+v\nwant %+v", got, want)
			}
			if len(ct.CSRF) < 40 {
				t.Errorf("CSRF token %q is not random enough", ct.CSRF)
			}
		})
	}

	t.Run("POST works like GET", func(t *testing.T) {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+pathAuthorize, strings.NewReader(hybridQuery(nil).Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		r, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Body.Close()
		if loc := r.Header.Get("Location"); r.StatusCode != http.StatusFound || !strings.HasPrefix(loc, front.URL+pathConsent+"?ticket=") {
			t.Errorf("%s → %s", r.Status, loc)
		}
	})
}

// RFC 9700 §4.11.2 and the MCP spec's "Open Redirection": anyone may register a client
// (or publish a metadata document) whose redirect URI is a phishing page, then hand out
// a link to the broker's /oauth/authorize with a deliberate error in it. The broker must
// not bounce the user there automatically, without the user having seen anything: it
// only redirects errors on its own to URIs it trusts (configured clients, loopback), and
// for other clients shows a page that names where the link goes.
func TestAuthorizeErrorsDoNotMakeAnOpenRedirector(t *testing.T) {
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", func(c *Config) {
		hybridClients(c)
		c.Registration = true
	})
	const phishing = "https://phish.example/login"
	resp := do(t, http.MethodPost, front.URL+pathRegister, http.Header{"Content-Type": {"application/json"}},
		`{"client_name":"x","redirect_uris":["`+phishing+`","http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`)
	var reg struct {
		ClientID string `json:"client_id"`
	}
	decodeJSON(t, resp, &reg)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("registration: %s", resp.Status)
	}

	for _, tc := range []struct {
		name   string
		change func(url.Values)
	}{
		{"response_type token", func(q url.Values) { q.Set("response_type", "token") }},
		{"no PKCE", func(q url.Values) { q.Del("code_challenge") }},
		{"unknown scope", func(q url.Values) { q.Set("scope", "admin") }},
		{"another resource", func(q url.Values) { q.Set("resource", "https://other.example/mcp") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := hybridAuthorizeQuery(reg.ClientID, phishing, hybridVerifier, "s", nil)
			tc.change(q)
			resp := authorize(t, front.URL, q)
			if loc := resp.Header.Get("Location"); loc != "" {
				t.Fatalf("%s: redirected to %s without the user seeing anything", resp.Status, loc)
			}
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("status %s, want 400", resp.Status)
			}
			body, _ := io.ReadAll(resp.Body)
			if !strings.Contains(string(body), "phish.example") {
				t.Error("the page does not name where the error would go")
			}
			if !strings.Contains(resp.Header.Get("Content-Security-Policy"), "frame-ancestors 'none'") {
				t.Error("the page may be framed")
			}
		})
	}

	t.Run("a loopback redirect URI still gets the error", func(t *testing.T) {
		q := hybridAuthorizeQuery(reg.ClientID, "http://127.0.0.1:5000/cb", hybridVerifier, "s", nil)
		q.Set("response_type", "token")
		resp := authorize(t, front.URL, q)
		loc, _ := url.Parse(resp.Header.Get("Location"))
		if resp.StatusCode != http.StatusFound || loc == nil || loc.Host != "127.0.0.1:5000" || loc.Query().Get("error") != "unsupported_response_type" {
			t.Errorf("%s %v", resp.Status, loc)
		}
	})
}
