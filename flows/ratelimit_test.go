package flows

import (
	"fmt"
	"testing"
	"time"
)

func TestRateLimitKey(t *testing.T) {
	for _, tc := range []struct{ name, ip, want string }{
		{"an IPv4 address is its own bucket", "203.0.113.7", "203.0.113.7"},
		{"an IPv4-mapped IPv6 address is the IPv4 address", "::ffff:203.0.113.7", "203.0.113.7"},
		{"an IPv6 address counts by its /56", "2001:db8:1:2ff:1:2:3:4", "2001:db8:1:200::/56"},
		{"another /64 of the same /56 is the same bucket", "2001:db8:1:2aa::1", "2001:db8:1:200::/56"},
		{"a zone does not make a new bucket", "fe80::1%eth0", "fe80::/56"},
		{"an unparsable address is bounded", string(make([]byte, 100)), string(make([]byte, 64))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := rateLimitKey(tc.ip); got != tc.want {
				t.Errorf("rateLimitKey(%q) = %q, want %q", tc.ip, got, tc.want)
			}
		})
	}
}

// With its address table full, the limiter forgets only addresses whose bucket has
// refilled (forgetting them changes nothing); it never lets a flood of new addresses
// evict, and so reset, the bucket of an address still limited, and never grows.
func TestRateLimiterFullTableResetsNoBucket(t *testing.T) {
	l := newRateLimiter(3)
	now := newRegistrationClock().now()
	for _, ip := range []string{"a", "b", "c"} {
		if ok, _ := l.allow(ip, 1, now); !ok {
			t.Fatalf("%s: first request refused", ip)
		}
	}
	newcomers := 0
	for i := range 1000 {
		if ok, _ := l.allow(fmt.Sprint("new-", i), 1, now); ok {
			newcomers++
		}
	}
	if newcomers != 1 {
		t.Errorf("1000 new addresses with the table full got %d requests through, want 1 (one shared bucket)", newcomers)
	}
	for _, ip := range []string{"a", "b", "c"} {
		if ok, _ := l.allow(ip, 1, now); ok {
			t.Errorf("%s got a fresh bucket after a flood of new addresses", ip)
		}
	}
	if len(l.buckets) != 3 || l.recent.Len() != 3 {
		t.Fatalf("%d buckets, %d in order; want 3", len(l.buckets), l.recent.Len())
	}

	// A minute later every bucket has refilled: the least recently seen is forgotten.
	now = now.Add(time.Minute)
	if ok, _ := l.allow("d", 1, now); !ok {
		t.Error("a new address was refused once the table had a refilled bucket to forget")
	}
	if _, tracked := l.buckets["d"]; !tracked || len(l.buckets) != 3 {
		t.Errorf("d tracked %v, %d buckets; want d tracked among 3", tracked, len(l.buckets))
	}
	if ok, _ := l.allow("d", 1, now); ok {
		t.Error("d got a second token")
	}
}

// Many addresses together may register RegistrationRateTotal clients a minute, however
// few each of them makes.
func TestRegistrationRateTotal(t *testing.T) {
	b := newRegistrationBroker(t, func(c *Config) { c.RegistrationRate = 2; c.RegistrationRateTotal = 5 })
	clock := newRegistrationClock()
	b.now = clock.now
	body := `{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`
	for i := range 5 {
		if rec := answerOwn(t, b, registerRequest(body, fmt.Sprintf("203.0.113.%d", i))); rec.Code != 201 {
			t.Fatalf("registration %d: %d %s", i, rec.Code, rec.Body)
		}
	}
	rec := answerOwn(t, b, registerRequest(body, "198.51.100.1"))
	wantRegistrationError(t, rec, 429, "temporarily_unavailable")
	if got := rec.Header().Get("Retry-After"); got != "12" { // one token per 60/5 s
		t.Errorf("Retry-After %q, want 12", got)
	}
	clock.advance(12 * time.Second)
	if rec := answerOwn(t, b, registerRequest(body, "198.51.100.1")); rec.Code != 201 {
		t.Errorf("after 12 s: %d", rec.Code)
	}
}

func TestRegistrationRateTotalDefault(t *testing.T) {
	b := newRegistrationBroker(t, nil)
	if b.cfg.RegistrationRateTotal != 30 {
		t.Errorf("default RegistrationRateTotal %d, want 30", b.cfg.RegistrationRateTotal)
	}
}
