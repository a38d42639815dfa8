// Package ratelimit is the token buckets the broker counts requests with: a [Limiter]
// holds one bucket per key, bounded in size so that a flood of new keys can neither grow
// it nor reset a spent bucket, and [Key] groups client addresses into buckets (an IPv4
// address, an IPv6 /56). The broker's endpoints and the IdP verifier's cold-verification
// budget both draw on it.
package ratelimit

import (
	"container/list"
	"math"
	"net/netip"
	"sync"
	"time"
)

// MaxAddresses bounds a limiter of client addresses: at most this many are tracked.
const MaxAddresses = 10_000

// Limiter is a token bucket per key (a client address, a client, a grant), bounded in
// size. Each bucket holds up to perMinute tokens and refills perMinute tokens a minute, so
// a client may make a burst of perMinute requests and then one every 60/perMinute s.
//
// When the table is full a new address may take the place of the one seen least recently
// only if that one's bucket has refilled: forgetting a full bucket changes nothing, while
// forgetting a spent one would hand it a fresh bucket, so a flood of new addresses could
// reset everyone's limit, its own included. Otherwise the new address shares one overflow
// bucket with every other address that found the table full.
type Limiter struct {
	mu       sync.Mutex
	max      int
	buckets  map[string]*list.Element // of *bucket
	recent   *list.List               // most recently used first
	overflow bucket
}

type bucket struct {
	key    string
	tokens float64
	last   time.Time
}

// New returns a limiter tracking at most maxKeys keys.
func New(maxKeys int) *Limiter {
	return &Limiter{max: maxKeys, buckets: make(map[string]*list.Element), recent: list.New()}
}

// Allow takes a token from key's bucket. When there is none it says how long until
// there is one.
func (l *Limiter) Allow(key string, perMinute int, now time.Time) (ok bool, retryAfter time.Duration) {
	capacity := float64(perMinute)
	perSecond := capacity / 60

	l.mu.Lock()
	defer l.mu.Unlock()
	var bk *bucket
	if el, found := l.buckets[key]; found {
		l.recent.MoveToFront(el)
		bk = el.Value.(*bucket)
	} else if l.recent.Len() < l.max {
		bk = &bucket{key: key, tokens: capacity, last: now}
		l.buckets[key] = l.recent.PushFront(bk)
	} else if oldest := l.recent.Back(); oldest.Value.(*bucket).refilledAt(now, capacity, perSecond) {
		delete(l.buckets, oldest.Value.(*bucket).key)
		bk = oldest.Value.(*bucket)
		*bk = bucket{key: key, tokens: capacity, last: now}
		l.buckets[key] = oldest
		l.recent.MoveToFront(oldest)
	} else {
		bk = &l.overflow
		if bk.last.IsZero() {
			*bk = bucket{tokens: capacity, last: now}
		}
	}
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

// refilledAt tells whether the bucket is full again at now.
func (bk *bucket) refilledAt(now time.Time, capacity, perSecond float64) bool {
	return bk.tokens+now.Sub(bk.last).Seconds()*perSecond >= capacity
}

// Key is the bucket of a client address: the address itself for IPv4, its
// /56 for IPv6 (a subscriber commonly holds a /56 or a /64, so a /64 each would give one
// subscriber 256 buckets). Anything unparsable is bounded and used as is.
func Key(ip string) string {
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
	p, _ := addr.WithZone("").Prefix(56) // never fails for an IPv6 address
	return p.String()
}
