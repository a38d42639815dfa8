package flows

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// refusingUpstream is a FAULT: an MCP server that refuses every bearer token with 401 and
// its own challenge, as one does whose issuer or audience rules do not accept the IdP's
// tokens. It counts the requests it saw.
func refusingUpstream(t *testing.T) (*httptest.Server, *atomic.Int32) {
	var seen atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen.Add(1)
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token", error_description="bad audience", resource_metadata="http://mcp-internal:8000/.well-known/oauth-protected-resource"`)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Mcp-Session-Id", "upstream-session")
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"error":"invalid_token","error_description":"bad audience"}`))
	}))
	t.Cleanup(srv.Close)
	return srv, &seen
}

// TestUpstreamRefusalOfDelegatedToken: when the upstream refuses with 401 the token the
// broker delegated to it, the client gets 502 server_error, not the upstream's 401, whose
// challenge would send it to log in again for a session whose token would be refused the
// same way (and might name the upstream's internal address). Nothing of the upstream's
// answer reaches the client, the session's delegated tokens on this node are dropped (the
// next call asks the IdP again), and it is counted. In delegation none the upstream's own
// 401 is its business and reaches the client as it was.
func TestUpstreamRefusalOfDelegatedToken(t *testing.T) {
	o := testenv.SharedOP(t)
	up, seen := refusingUpstream(t)
	call := func(front, token string) *http.Response {
		req, _ := http.NewRequest(http.MethodPost, front+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}

	t.Run("token exchange: 502, the upstream's answer dropped, delegated tokens evicted", func(t *testing.T) {
		m := new(recordingMetrics)
		_, front := startHybridFront(t, o, up.URL, func(c *Config) {
			hybridClients(c)
			c.DelegationMode = DelegationTokenExchange
			c.DelegationAudience = "nextcloud"
			c.Metrics = m
		})
		tok := brokerTokensFor(t, front, o, []string{"openid", "notes:read"})
		for i := range 2 {
			resp := call(front.URL, tok.AccessToken)
			var e oauthError
			err := json.NewDecoder(resp.Body).Decode(&e)
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadGateway || err != nil || e.Error != "server_error" {
				t.Fatalf("call %d: %d %+v %v, want 502 server_error", i, resp.StatusCode, e, err)
			}
			for _, h := range []string{"WWW-Authenticate", "Mcp-Session-Id"} {
				if v := resp.Header.Get(h); v != "" {
					t.Errorf("call %d: the upstream's %s reached the client: %q", i, h, v)
				}
			}
			if strings.Contains(e.Description, "mcp-internal") || strings.Contains(e.Description, "bad audience") {
				t.Errorf("the upstream's words reached the client: %q", e.Description)
			}
		}
		if seen.Load() < 2 {
			t.Fatalf("the upstream saw %d requests", seen.Load())
		}
		if got := m.events[DelegationRefusedUpstream].Load(); got != 2 {
			t.Errorf("%d refusals counted, want 2", got)
		}
		if hits := m.events[DelegationCacheHit].Load(); hits != 0 {
			t.Errorf("%d delegated tokens served from the cache after the upstream refused them, want 0", hits)
		}
	})

	t.Run("delegation none: the upstream's 401 reaches the client as it was", func(t *testing.T) {
		_, front := startHybridFront(t, o, up.URL, func(c *Config) {
			hybridClients(c)
			c.DelegationMode = DelegationNone
		})
		tok := brokerTokensFor(t, front, o, []string{"openid", "notes:read"})
		resp := call(front.URL, tok.AccessToken)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), "mcp-internal") {
			t.Errorf("%d %q, want the upstream's own 401", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	})
}

func TestBearerErrorCode(t *testing.T) {
	for in, want := range map[string]string{
		`Bearer error="invalid_token", error_description="x"`:      "invalid_token",
		`Bearer error_description="x", error="insufficient_scope"`: "insufficient_scope",
		`Bearer realm="x"`: "",
		`Bearer error="` + strings.Repeat("a", 65) + `"`: "",
		"Bearer error=\"a\x01b\"":                        "",
		`Bearer error="unterminated`:                     "",
	} {
		if got := bearerErrorCode(in); got != want {
			t.Errorf("%q: %q, want %q", in, got, want)
		}
	}
}
