package flows

import (
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// A client's RFC 8707 resource names this server however it spells the scheme and host
// case or the default port (RFC 3986 §6.2.2.1, §6.2.3), at the token endpoint's code and
// refresh grants and at both authorization endpoints; anything else about it must match
// exactly. The tokens are bound to the configured spelling.
func TestResourceComparedNormalised(t *testing.T) {
	o := testenv.SharedOP(t)
	same := []string{"HTTPS://MCP.EXAMPLE.TEST/mcp", "https://Mcp.Example.Test:443/mcp", "hTTps://mcp.example.test:443/mcp"}
	other := []string{"https://mcp.example.test/MCP", "https://mcp.example.test:8443/mcp", "http://mcp.example.test/mcp",
		"https://mcp.example.test/mcp#x", "https://user@mcp.example.test/mcp", "https://mcp.example.test/mcp/", "https://mcp.example.test/mcp?x=1", "mcp.example.test/mcp"}

	e := newTokenEnv(t, o, nil)
	t.Run("code grant", func(t *testing.T) {
		for _, res := range same {
			code, verifier := e.code(t, testenv.NativeClientID)
			tok := e.exchange(t, testenv.NativeClientID, code, verifier, func(f url.Values) { f.Set("resource", res) }).wantTokens(t)
			if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
				t.Errorf("%s: the token gets %d at the MCP endpoint", res, st)
			}
		}
		for _, res := range other {
			code, verifier := e.code(t, testenv.NativeClientID)
			e.exchange(t, testenv.NativeClientID, code, verifier, func(f url.Values) { f.Set("resource", res) }).
				wantError(t, http.StatusBadRequest, "invalid_target")
		}
	})
	t.Run("refresh grant", func(t *testing.T) {
		first := e.login(t)
		refresh := first.RefreshToken
		for _, res := range same {
			refresh = e.refresh(t, testenv.NativeClientID, refresh, func(f url.Values) { f.Set("resource", res) }).wantTokens(t).RefreshToken
		}
		for _, res := range other {
			e.refresh(t, testenv.NativeClientID, refresh, func(f url.Values) { f.Set("resource", res) }).
				wantError(t, http.StatusBadRequest, "invalid_target")
		}
	})

	t.Run("progressive authorize", func(t *testing.T) {
		front := startFront(t, newTestBroker(t, o, nil), testenv.StartUpstream(t, testenv.TrustedSubjectHeader()).URL)
		for _, res := range same {
			resp := authorize(t, front.URL, authorizeQuery(func(q url.Values) { q.Set("resource", res) }))
			loc, _ := url.Parse(resp.Header.Get("Location"))
			if resp.StatusCode != http.StatusFound || loc == nil || loc.Query().Get("resource") != testResource {
				t.Errorf("%s: %s to %v, want the IdP asked for %s", res, resp.Status, loc, testResource)
			}
		}
		for _, res := range other {
			if resp := authorize(t, front.URL, authorizeQuery(func(q url.Values) { q.Set("resource", res) })); resp.StatusCode != http.StatusBadRequest {
				t.Errorf("%s: %s, want 400 invalid_target", res, resp.Status)
			}
		}
	})

	t.Run("hybrid authorize", func(t *testing.T) {
		b, front := startHybridFront(t, o, "", hybridClients)
		resource := front.URL + "/mcp"
		for _, res := range []string{strings.Replace(resource, "http://", "HTTP://", 1), resource} {
			resp := authorize(t, front.URL, hybridQuery(func(q url.Values) { q.Set("resource", res) }))
			loc, _ := url.Parse(resp.Header.Get("Location"))
			if resp.StatusCode != http.StatusFound || loc == nil || loc.Path != pathConsent {
				t.Fatalf("%s: %s to %v, want the consent page", res, resp.Status, loc)
			}
			var ct ConsentTicket
			if err := b.cfg.Records.Get(t.Context(), recordKey(kindConsent, loc.Query().Get("ticket")), &ct); err != nil {
				t.Fatal(err)
			}
			if ct.Request.Resource != resource {
				t.Errorf("%s: bound to %q, want the configured %q", res, ct.Request.Resource, resource)
			}
		}
		resp := authorize(t, front.URL, hybridQuery(func(q url.Values) { q.Set("resource", resource+"/") }))
		if loc, _ := url.Parse(resp.Header.Get("Location")); loc == nil || loc.Query().Get("error") != "invalid_target" {
			t.Errorf("a trailing slash: %s to %v, want invalid_target", resp.Status, loc)
		}
	})
}

func TestSameResource(t *testing.T) {
	for _, tc := range []struct {
		got, want string
		same      bool
	}{
		{"https://mcp.example.com/mcp", "https://mcp.example.com/mcp", true},
		{"HTTPS://MCP.EXAMPLE.COM/mcp", "https://mcp.example.com/mcp", true},
		{"https://mcp.example.com:443/mcp", "https://mcp.example.com/mcp", true},
		{"https://mcp.example.com/mcp", "https://MCP.example.com:443/mcp", true},
		{"http://mcp.example.com:80/mcp", "http://mcp.example.com/mcp", true},
		{"http://mcp.example.com:443/mcp", "http://mcp.example.com/mcp", false},
		{"https://mcp.example.com:80/mcp", "https://mcp.example.com/mcp", false},
		{"https://mcp.example.com", "https://mcp.example.com/", true},
		{"https://[::1]:443/mcp", "https://[::1]/mcp", true},
		{"https://mcp.example.com/MCP", "https://mcp.example.com/mcp", false},
		{"https://mcp.example.com/mcp?a", "https://mcp.example.com/mcp", false},
		{"https://mcp.example.com/mcp#f", "https://mcp.example.com/mcp", false},
		{"https://u@mcp.example.com/mcp", "https://mcp.example.com/mcp", false},
		{"https://mcp.example.com/m%63p", "https://mcp.example.com/mcp", false},
		{"//mcp.example.com/mcp", "https://mcp.example.com/mcp", false},
		{"", "https://mcp.example.com/mcp", false},
		{"https://mcp.example.com:/mcp", "https://mcp.example.com/mcp", true},
	} {
		if got := sameResource(tc.got, tc.want); got != tc.same {
			t.Errorf("sameResource(%q, %q) = %v, want %v", tc.got, tc.want, got, tc.same)
		}
	}
}
