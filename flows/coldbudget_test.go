package flows

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// callMCP sends one MCP request with token from ip through b and returns the answer; a
// request passed on to the upstream reads as 200.
func callMCP(b *Broker, token, ip string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(http.MethodPost, testResource, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	req = req.WithContext(WithClientIP(req.Context(), ip))
	rec := httptest.NewRecorder()
	if pass, _ := b.Handle(rec, req); pass != nil {
		rec.WriteHeader(http.StatusOK)
	}
	return rec
}

// Junk opaque tokens from one address cost at most the per-address budget of
// introspections (60 a minute by default); past it the answer is 429 with Retry-After,
// even for a valid token, which a 401 would make its client throw away. Warm tokens never
// count, and another address has its own budget (SECURITY.md: strangers can make the
// broker call out).
func TestColdVerificationBudgetBoundsIntrospection(t *testing.T) {
	o := testenv.StartOP(t)
	valid := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, testResource)
	warm := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, testResource)
	b := newTestBroker(t, o, nil)
	clock := &testenv.Clock{Base: time.Now()}
	b.useIdPClocks(nil, clock.Now) // frozen: no bucket refills during the test

	const attacker, other = "198.51.100.7", "203.0.113.9"
	if rec := callMCP(b, warm, attacker); rec.Code != http.StatusOK {
		t.Fatalf("a valid token before the burst: %d %s", rec.Code, rec.Body)
	}
	o.ResetCounts()
	statuses := map[int]int{}
	for i := range 70 {
		rec := callMCP(b, "junk-opaque-token-"+testenv.RandomKID()+"-"+string(rune('a'+i%26)), attacker)
		statuses[rec.Code]++
		if rec.Code == http.StatusTooManyRequests && rec.Header().Get("Retry-After") == "" {
			t.Error("429 without Retry-After")
		}
	}
	if n := o.Count(testenv.CountIntrospect); n > idp.DefaultColdVerifyRate-1 {
		t.Errorf("70 junk tokens from one address cost %d introspections, want at most %d", n, idp.DefaultColdVerifyRate-1)
	}
	if statuses[http.StatusTooManyRequests] == 0 {
		t.Errorf("statuses %v, want 429 once the budget is spent", statuses)
	}

	o.ResetCounts()
	if rec := callMCP(b, valid, attacker); rec.Code != http.StatusTooManyRequests || rec.Header().Get("Retry-After") == "" {
		t.Errorf("a new valid token from the spent address: %d (Retry-After %q), want 429 with Retry-After, never 401",
			rec.Code, rec.Header().Get("Retry-After"))
	}
	if rec := callMCP(b, warm, attacker); rec.Code != http.StatusOK {
		t.Errorf("a warm token from the spent address: %d, want 200", rec.Code)
	}
	if rec := callMCP(b, valid, other); rec.Code != http.StatusOK {
		t.Errorf("the valid token from another address: %d, want 200", rec.Code)
	}
	if n := o.Count(testenv.CountIntrospect); n != 1 {
		t.Errorf("%d introspections after the burst, want 1 (the other address's)", n)
	}
}

// TestColdVerificationFollowsIdPTimeout: a cold verification at the MCP endpoint is bounded
// by idp_timeout (three IdP requests' worth), not by a constant of its own: an IdP that
// answers introspection slower than that gets 503, never a wait without end.
func TestColdVerificationFollowsIdPTimeout(t *testing.T) {
	o := testenv.StartOP(t)
	raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, testResource)
	// Introspection (the only POST the verifier makes) is slow; discovery is not.
	slow := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.Method == http.MethodPost {
			select {
			case <-time.After(time.Second):
			case <-r.Context().Done():
				return nil, r.Context().Err()
			}
		}
		return http.DefaultTransport.RoundTrip(r)
	})}
	b := newTestBroker(t, o, func(c *Config) {
		c.HTTPClient = slow
		c.IdPTimeout = 100 * time.Millisecond
	})
	req := httptest.NewRequest(http.MethodPost, testResource, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
	req.Header.Set("Authorization", "Bearer "+raw)
	req.Header.Set("Content-Type", "application/json")
	w := httptest.NewRecorder()
	start := time.Now()
	if pass, _ := b.Handle(w, req); pass != nil || w.Code != http.StatusServiceUnavailable {
		t.Fatalf("slow introspection: passed %v, %d %s; want 503", pass != nil, w.Code, w.Body)
	}
	if took := time.Since(start); took > 900*time.Millisecond {
		t.Errorf("answered after %v: the verification was not bounded by idp_timeout", took)
	}
}
