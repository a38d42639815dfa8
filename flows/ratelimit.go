package flows

import (
	"container/list"
	"math"
	"net/netip"
	"sync"
	"time"
)

// maxRateLimitedIPs bounds the registration limiter's memory: past it, the address
// seen least recently is forgotten (it gets a full bucket when it comes back).
const maxRateLimitedIPs = 10_000

// rateLimiter is a token bucket per client address, bounded in size with LRU eviction.
// Each bucket holds up to perMinute tokens and refills perMinute tokens a minute, so a
// client may register a burst of perMinute clients and then one every 60/perMinute s.
type rateLimiter struct {
	mu      sync.Mutex
	max     int
	buckets map[string]*list.Element // of *bucket
	recent  *list.List               // most recently used first
}

type bucket struct {
	key    string
	tokens float64
	last   time.Time
}

func newRateLimiter(maxKeys int) *rateLimiter {
	return &rateLimiter{max: maxKeys, buckets: make(map[string]*list.Element), recent: list.New()}
}

// allow takes a token from key's bucket. When there is none it says how long until
// there is one.
func (l *rateLimiter) allow(key string, perMinute int, now time.Time) (ok bool, retryAfter time.Duration) {
	capacity := float64(perMinute)
	perSecond := capacity / 60

	l.mu.Lock()
	defer l.mu.Unlock()
	el, found := l.buckets[key]
	if !found {
		if l.recent.Len() >= l.max {
			oldest := l.recent.Back()
			delete(l.buckets, oldest.Value.(*bucket).key)
			l.recent.Remove(oldest)
		}
		el = l.recent.PushFront(&bucket{key: key, tokens: capacity, last: now})
		l.buckets[key] = el
	} else {
		l.recent.MoveToFront(el)
	}
	bk := el.Value.(*bucket)
	if elapsed := now.Sub(bk.last).Seconds(); elapsed > 0 {
		bk.tokens = math.Min(capacity, bk.tokens+elapsed*perSecond)
		bk.last = now
	}
	if bk.tokens >= 1 {
		bk.tokens--
		return true, 0
	}
	wait := (1 - bk.tokens) / perSecond
	return false, time.Duration(math.Ceil(wait)) * time.Second
}

// rateLimitKey is the bucket of a client address: the address itself for IPv4, its
// /64 for IPv6 (one subscriber commonly holds a whole /64). Anything unparsable is
// bounded and used as is.
func rateLimitKey(ip string) string {
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		if len(ip) > 64 {
			ip = ip[:64]
		}
		return ip
	}
	addr = addr.Unmap()
	if addr.Is4() {
		return addr.String()
	}
	p, _ := addr.WithZone("").Prefix(64) // never fails for an IPv6 address
	return p.String()
}
