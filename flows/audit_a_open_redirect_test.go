package flows

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// RFC 9700 §4.11.2 and the MCP spec's "Open Redirection": anyone may register a client
// (or publish a metadata document) whose redirect URI is a phishing page, then hand out
// a link to the broker's /oauth/authorize with a deliberate error in it. The broker must
// not bounce the user there automatically, without the user having seen anything: it
// only redirects errors on its own to URIs it trusts (configured clients, loopback), and
// for other clients shows a page that names where the link goes.
func TestAuditAAuthorizeErrorsDoNotMakeAnOpenRedirector(t *testing.T) {
	o := verifierOP(t)
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
			body := auditAReadAll(t, resp)
			if !strings.Contains(body, "phish.example") {
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

func auditAReadAll(t *testing.T, resp *http.Response) string {
	t.Helper()
	var sb strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return sb.String()
}
