package flows

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// Every authorization request stores a consent ticket: one address may start at most
// authorizeRate a minute, others are not affected, and the bucket refills.
func TestAuthorizeIsRateLimitedPerClientIP(t *testing.T) {
	o := testenv.SharedOP(t)
	b := newTestBroker(t, o, func(c *Config) { c.Mode = ModeHybrid })
	clock := &testenv.Clock{Base: time.Now()} // stands still: a slow machine refills no bucket
	b.now = clock.Now
	authorize := func(ip string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodGet, "/oauth/authorize?"+hybridAuthorizeQuery(testenv.NativeClientID, "http://127.0.0.1:49152/callback", "a-verifier-that-is-long-enough-for-pkce-0123456789", "s", nil).Encode(), nil)
		req = req.WithContext(WithClientIP(req.Context(), ip))
		rec := httptest.NewRecorder()
		if pass, _ := b.Handle(rec, req); pass != nil {
			t.Fatal("authorize passed the request on")
		}
		return rec
	}
	for i := 0; i < authorizeRate; i++ {
		if rec := authorize("192.0.2.1"); rec.Code != http.StatusFound {
			t.Fatalf("request %d: %d %s", i+1, rec.Code, rec.Body)
		}
	}
	rec := authorize("192.0.2.1")
	if rec.Code != http.StatusTooManyRequests || rec.Header().Get("Retry-After") == "" {
		t.Fatalf("over the limit: %d, Retry-After %q", rec.Code, rec.Header().Get("Retry-After"))
	}
	if rec := authorize("192.0.2.2"); rec.Code != http.StatusFound {
		t.Errorf("another address was limited too: %d", rec.Code)
	}
	clock.Advance(time.Minute)
	if rec := authorize("192.0.2.1"); rec.Code != http.StatusFound {
		t.Errorf("a minute later: %d", rec.Code)
	}
}
