package ratelimit

import (
	"fmt"
	"testing"
	"time"
)

func TestKey(t *testing.T) {
	for _, tc := range []struct{ name, ip, want string }{
		{"an IPv4 address is its own bucket", "203.0.113.7", "203.0.113.7"},
		{"an IPv4-mapped IPv6 address is the IPv4 address", "::ffff:203.0.113.7", "203.0.113.7"},
		{"an IPv6 address counts by its /56", "2001:db8:1:2ff:1:2:3:4", "2001:db8:1:200::/56"},
		{"another /64 of the same /56 is the same bucket", "2001:db8:1:2aa::1", "2001:db8:1:200::/56"},
		{"a zone does not make a new bucket", "fe80::1%eth0", "fe80::/56"},
		{"an unparsable address is bounded", string(make([]byte, 100)), string(make([]byte, 64))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Key(tc.ip); got != tc.want {
				t.Errorf("Key(%q) = %q, want %q", tc.ip, got, tc.want)
			}
		})
	}
}

// With its address table full, the limiter forgets only addresses whose bucket has
// refilled (forgetting them changes nothing); it never lets a flood of new addresses
// evict, and so reset, the bucket of an address still limited, and never grows.
func TestLimiterFullTableResetsNoBucket(t *testing.T) {
	l := New(3)
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for _, ip := range []string{"a", "b", "c"} {
		if ok, _ := l.Allow(ip, 1, now); !ok {
			t.Fatalf("%s: first request refused", ip)
		}
	}
	newcomers := 0
	for i := range 1000 {
		if ok, _ := l.Allow(fmt.Sprint("new-", i), 1, now); ok {
			newcomers++
		}
	}
	if newcomers != 1 {
		t.Errorf("1000 new addresses with the table full got %d requests through, want 1 (one shared bucket)", newcomers)
	}
	for _, ip := range []string{"a", "b", "c"} {
		if ok, _ := l.Allow(ip, 1, now); ok {
			t.Errorf("%s got a fresh bucket after a flood of new addresses", ip)
		}
	}
	if len(l.buckets) != 3 || l.recent.Len() != 3 {
		t.Fatalf("%d buckets, %d in order; want 3", len(l.buckets), l.recent.Len())
	}

	// A minute later every bucket has refilled: the least recently seen is forgotten.
	now = now.Add(time.Minute)
	if ok, _ := l.Allow("d", 1, now); !ok {
		t.Error("a new address was refused once the table had a refilled bucket to forget")
	}
	if _, tracked := l.buckets["d"]; !tracked || len(l.buckets) != 3 {
		t.Errorf("d tracked %v, %d buckets; want d tracked among 3", tracked, len(l.buckets))
	}
	if ok, _ := l.Allow("d", 1, now); ok {
		t.Error("d got a second token")
	}
}
