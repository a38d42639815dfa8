package flows

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// toolCallBody is a tools/call the read-only token of the framing tests may not make.
const toolCallBody = `{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`

// TestFramingDodgesAreRefused: with tool rules configured, a tools/call must not reach the
// upstream past the check by its framing: a method other than POST that a framework
// treats as POST, a method override, a charset other than UTF-8 (Node reads `ascii` by
// dropping high bits, iconv-lite decodes UTF-7), a media type other than JSON, or bytes a
// lenient decoder reads outside JSON strings. Requests the MCP transport sends pass.
func TestFramingDodgesAreRefused(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)
	readOnly := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
	const appJSON = "application/json"

	for _, tc := range []struct {
		name        string
		method      string
		contentType []string
		header      map[string]string
		query       string
		body        string
		want        int
	}{
		{"PUT with a tools/call body", http.MethodPut, []string{appJSON}, nil, "", toolCallBody, http.StatusMethodNotAllowed},
		{"PATCH with a tools/call body", http.MethodPatch, []string{appJSON}, nil, "", toolCallBody, http.StatusMethodNotAllowed},
		{"lower-case post", "post", []string{appJSON}, nil, "", toolCallBody, http.StatusMethodNotAllowed},
		{"GET with a body", http.MethodGet, []string{appJSON}, nil, "", toolCallBody, http.StatusBadRequest},
		{"DELETE with a body", http.MethodDelete, []string{appJSON}, nil, "", toolCallBody, http.StatusBadRequest},
		{"X-HTTP-Method-Override", http.MethodPost, []string{appJSON}, map[string]string{"X-HTTP-Method-Override": "PUT"}, "", `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`, http.StatusBadRequest},
		{"X-HTTP-Method", http.MethodPost, []string{appJSON}, map[string]string{"X-HTTP-Method": "PATCH"}, "", `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`, http.StatusBadRequest},
		{"X-Method-Override with underscores", http.MethodPost, []string{appJSON}, map[string]string{"X_Method_Override": "PUT"}, "", `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`, http.StatusBadRequest},
		{"_method in the query", http.MethodPost, []string{appJSON}, nil, "_method=PUT", `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`, http.StatusBadRequest},
		{"charset utf-7", http.MethodPost, []string{appJSON + "; charset=utf-7"}, nil, "", "{+ACI-method+ACI-:+ACI-tools/call+ACI-}", http.StatusUnsupportedMediaType},
		{"charset ascii", http.MethodPost, []string{appJSON + ";charset=ascii"}, nil, "", "{\"method\":\"\xf4ools/call\",\"params\":{\"name\":\"notes_write\"}}", http.StatusUnsupportedMediaType},
		{"a second charset", http.MethodPost, []string{appJSON + "; charset=utf-8; charset=utf-7"}, nil, "", toolCallBody, http.StatusUnsupportedMediaType},
		{"text/plain", http.MethodPost, []string{"text/plain"}, nil, "", toolCallBody, http.StatusUnsupportedMediaType},
		{"no content type", http.MethodPost, nil, nil, "", toolCallBody, http.StatusUnsupportedMediaType},
		{"two content types", http.MethodPost, []string{appJSON, "text/plain"}, nil, "", toolCallBody, http.StatusUnsupportedMediaType},
		{"non-breaking space outside strings", http.MethodPost, []string{appJSON}, nil, "", "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}\xc2\xa0", http.StatusBadRequest},
		{"latin-1 byte outside strings", http.MethodPost, []string{appJSON}, nil, "", "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\"\xa0:\"tools/list\"}", http.StatusBadRequest},

		{"POST application/json passes", http.MethodPost, []string{appJSON}, nil, "", `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`, 0},
		{"POST with charset UTF-8 passes", http.MethodPost, []string{`Application/JSON; charset="UTF-8"`}, nil, "", `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"q":"é"}}`, 0},
		{"GET without a body passes", http.MethodGet, nil, nil, "", "", 0},
		{"DELETE without a body passes", http.MethodDelete, nil, nil, "", "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.Reset()
			var body io.Reader
			if tc.body != "" {
				body = strings.NewReader(tc.body)
			}
			u := front.URL + "/mcp"
			if tc.query != "" {
				u += "?" + tc.query
			}
			req, err := http.NewRequestWithContext(t.Context(), tc.method, u, body)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Authorization", "Bearer "+readOnly)
			req.Header.Set("Accept", "application/json, text/event-stream")
			req.Header["Content-Type"] = tc.contentType
			for k, v := range tc.header {
				req.Header[k] = []string{v}
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			seen := len(up.Seen())
			if tc.want == 0 {
				if seen != 1 {
					t.Errorf("%s: upstream saw %d requests, want it to receive this one", resp.Status, seen)
				}
				return
			}
			if resp.StatusCode != tc.want || seen != 0 {
				t.Errorf("%s: upstream saw %d requests; want %d and nothing forwarded", resp.Status, seen, tc.want)
			}
			if e := readOAuthError(t, resp); e.Error != "invalid_request" || e.Description == "" {
				t.Errorf("error body %+v, want invalid_request with a description", e)
			}
			if tc.want == http.StatusMethodNotAllowed && resp.Header.Get("Allow") == "" {
				t.Error("405 without Allow")
			}
		})
	}

	t.Run("without tool rules nothing is refused", func(t *testing.T) {
		up.Reset()
		open := startFront(t, newTestBroker(t, o, func(c *Config) { c.ToolScopes = nil }), up.URL)
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, open.URL+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
		req.Header.Set("Authorization", "Bearer "+readOnly)
		req.Header.Set("Content-Type", "text/plain")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if len(up.Seen()) != 1 {
			t.Errorf("%s: upstream saw %d requests", resp.Status, len(up.Seen()))
		}
	})
}

// TestConnectionCannotDropBrokerHeaders: a client naming the subject header (or
// Authorization) in Connection must not make the proxy drop, as hop-by-hop, the headers
// the broker set after approving the request, and identity headers a client sent never
// reach the upstream.
func TestConnectionCannotDropBrokerHeaders(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)
	tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)

	for _, conn := range []string{"X-Auth-Subject", "x_auth_subject", "keep-alive, X-Auth-Subject", "Authorization"} {
		t.Run("Connection: "+conn, func(t *testing.T) {
			up.Reset()
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
			req.Header.Set("Authorization", "Bearer "+tok)
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Connection", conn)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			seen := up.Seen()
			if len(seen) != 1 || seen[0].SubjectHeader != o.User.Subject {
				t.Fatalf("%s: upstream saw %d requests, subject %q; want %q", resp.Status, len(seen), firstSubject(seen), o.User.Subject)
			}
		})
	}

	t.Run("client identity headers are stripped", func(t *testing.T) {
		up.Reset()
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/json")
		spoofed := []string{"Remote-User", "Remote_User", "X-Forwarded-User", "X-Forwarded-Email", "X-Remote-User",
			"X-Auth-Request-User", "X-Auth-Request-Email", "X_Auth_Request_Preferred_Username", "X-AUTH-SUBJECT"}
		for _, h := range spoofed {
			req.Header[h] = []string{"admin"}
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		seen := up.Seen()
		if len(seen) != 1 {
			t.Fatalf("%s: upstream saw %d requests", resp.Status, len(seen))
		}
		for name, v := range seen[0].Header {
			if strings.Contains(strings.Join(v, ","), "admin") {
				t.Errorf("upstream received %s: %v", name, v)
			}
		}
	})
}

// TestClientTrailersAreNotForwarded: trailers a client sends after the body never reach
// the upstream, since Caddy's reverse_proxy forwards request trailers, and an upstream that
// merges them into its headers (Apache's MergeTrailers, old Tomcat) would read the
// identity and subject headers stripped from the header section.
func TestClientTrailersAreNotForwarded(t *testing.T) {
	o := testenv.SharedOP(t)
	b := newTestBroker(t, o, nil)
	tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
	req := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	req.Trailer = http.Header{"X-Auth-Subject": {"admin"}, "X-Forwarded-User": {"admin"}}
	pass, _ := b.Handle(httptest.NewRecorder(), req)
	if pass == nil {
		t.Fatal("the request was refused")
	}
	if pass.Trailer != nil {
		t.Errorf("trailers forwarded: %v", pass.Trailer)
	}
}

func firstSubject(seen []testenv.SeenRequest) string {
	if len(seen) == 0 {
		return ""
	}
	return seen[0].SubjectHeader
}

// TestUpstreamCannotSetBrokerCookies: an upstream's Set-Cookie for a name under the
// broker's cookie prefixes (plain, __Host- or __Secure-, any case) never reaches the
// client; the upstream's own cookies do.
func TestUpstreamCannotSetBrokerCookies(t *testing.T) {
	o := testenv.SharedOP(t)
	tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for _, c := range []string{
			"mcp_oauth_consent=forged; Path=/oauth",
			"__Host-mcp_oauth_consent=forged; Path=/; Secure",
			"__secure-MCP_OAUTH_csrf_0123456789abcdef=forged",
			" mcp_oauth_login=forged",
			"mcp_oauth_consent",
			"app_session=kept; Path=/",
		} {
			w.Header().Add("Set-Cookie", c)
		}
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "{}")
	}))
	t.Cleanup(upstream.Close)
	front := startFront(t, newTestBroker(t, o, nil), upstream.URL)

	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	got := resp.Header.Values("Set-Cookie")
	if len(got) != 1 || got[0] != "app_session=kept; Path=/" {
		t.Errorf("client received Set-Cookie %q; want only the upstream's own app_session", got)
	}
}

// TestBrokerCookieName: the prefix rule, which covers the broker's present cookies and
// any later one named under the mcp_oauth_ prefix.
func TestBrokerCookieName(t *testing.T) {
	for _, tc := range []struct {
		setCookie string
		broker    bool
	}{
		{"mcp_oauth_consent=x", true},
		{"__Host-mcp_oauth_consent=x; Path=/", true},
		{"__HOST-MCP_OAUTH_CONSENT=x", true},
		{"__Secure-mcp_oauth_login=x", true},
		{"\tmcp_oauth_csrf_abc =x", true},
		{"mcp_oauth_consent", true},
		{"mcp_oauth_", true},
		{"mcp_oauth=x", false},
		{"app=mcp_oauth_consent", false},
		{"__Host-app=x", false},
		{"", false},
	} {
		if got := isBrokerCookie(tc.setCookie); got != tc.broker {
			t.Errorf("isBrokerCookie(%q) = %v, want %v", tc.setCookie, got, tc.broker)
		}
	}
}

// readOAuthError decodes an OAuth error body.
func readOAuthError(t *testing.T, resp *http.Response) oauthError {
	t.Helper()
	var e oauthError
	body, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("error body %q: %v", body, err)
	}
	return e
}

// TestSubjectHeaderUnderscoreSpoof: with delegation none the upstream trusts the
// subject header. CGI, PHP (FastCGI) and WSGI hosts read headers as HTTP_* variables
// (RFC 3875 §4.1.18), where X_Auth_Subject and X-Auth-Subject are one name; a client must
// not be able to name itself someone else through the underscore spelling (SECURITY.md
// S1.11: identity headers are stripped in every spelling).
func TestSubjectHeaderUnderscoreSpoof(t *testing.T) {
	o := testenv.SharedOP(t)
	tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
	spoof := func(t *testing.T, url string) *http.Response {
		t.Helper()
		req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, url, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/json")
		req.Header["X_Auth_Subject"] = []string{"admin"}
		req.Header["X_auth-subject"] = []string{"admin"}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}

	t.Run("no spelling of the subject header but the broker's reaches the upstream", func(t *testing.T) {
		up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
		front := startFront(t, newTestBroker(t, o, nil), up.URL)
		spoof(t, front.URL+"/mcp")
		seen := up.Seen()
		if len(seen) != 1 {
			t.Fatalf("upstream saw %d requests", len(seen))
		}
		for name, values := range seen[0].Header {
			if strings.EqualFold(strings.ReplaceAll(name, "_", "-"), testenv.SubjectHeader) && name != testenv.SubjectHeader {
				t.Errorf("upstream received %s: %v", name, values)
			}
		}
	})

	t.Run("a CGI upstream reads the broker's subject", func(t *testing.T) {
		// A real CGI host (net/http/cgi, as PHP-CGI and WSGI hosts map headers).
		up := httptest.NewServer(&cgi.Handler{
			Path: "/bin/sh",
			Args: []string{"-c", `printf 'Content-Type: text/plain\r\n\r\n%s' "$HTTP_X_AUTH_SUBJECT"`},
		})
		t.Cleanup(up.Close)
		front := startFront(t, newTestBroker(t, o, nil), up.URL)
		for range 16 { // the CGI host's header order is Go's map order: random
			resp := spoof(t, front.URL+"/mcp")
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK || string(body) != o.User.Subject {
				t.Fatalf("%s: the CGI upstream took the subject to be %q, want %q", resp.Status, body, o.User.Subject)
			}
		}
	})
}

// stripClientIdentity removes every broker-managed header in any spelling a CGI-style
// upstream folds together (the first-byte filter of brokerManagedHeader included), and
// keeps the others.
func TestStripClientIdentitySpellings(t *testing.T) {
	managed := []string{"Authorization", "authorization", "AUTHORIZATION", "My-Subject", "my_subject", "MY_SUBJECT",
		"X-Auth-Request-Email", "x_auth_request_user", "X-AUTH-REQUEST-GROUPS"}
	for _, id := range identityHeaders {
		managed = append(managed, id, strings.ToLower(id), strings.ReplaceAll(strings.ToUpper(id), "-", "_"))
	}
	kept := []string{"Accept", "Content-Type", "Mcp-Session-Id", "X-Request-Id", "Remote-Addr", "Authorisation", "My-Subjects", "_x-user"}
	h := http.Header{}
	for _, n := range append(slices.Clone(managed), kept...) {
		h[n] = []string{"v"}
	}
	stripClientIdentity(h, "My-Subject")
	for _, n := range managed {
		if _, ok := h[n]; ok {
			t.Errorf("%s was forwarded", n)
		}
	}
	for _, n := range kept {
		if _, ok := h[n]; !ok {
			t.Errorf("%s was removed", n)
		}
	}
}
