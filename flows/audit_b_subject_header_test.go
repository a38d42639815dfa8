package flows

import (
	"io"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestAuditSubjectHeaderUnderscoreSpoof: with delegation none the upstream trusts the
// subject header. CGI, PHP (FastCGI) and WSGI hosts read headers as HTTP_* variables,
// where X_Auth_Subject and X-Auth-Subject are one name; a client must not be able to
// name itself someone else through the underscore spelling.
func TestAuditSubjectHeaderUnderscoreSpoof(t *testing.T) {
	o := verifierOP(t)
	tok := loginAccessToken(t, o, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
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
