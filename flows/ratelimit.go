package flows

import (
	"container/list"
	"math"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"
)

// maxRateLimitedIPs bounds a limiter's memory: at most this many addresses are tracked.
const maxRateLimitedIPs = 10_000

// rateLimiter is a token bucket per client address, bounded in size. Each bucket holds up
// to perMinute tokens and refills perMinute tokens a minute, so a client may make a burst
// of perMinute requests and then one every 60/perMinute s.
//
// When the table is full a new address may take the place of the one seen least recently
// only if that one's bucket has refilled: forgetting a full bucket changes nothing, while
// forgetting a spent one would hand it a fresh bucket, so a flood of new addresses could
// reset everyone's limit, its own included. Otherwise the new address shares one overflow
// bucket with every other address that found the table full.
type rateLimiter struct {
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

// rateLimitKey is the bucket of a client address: the address itself for IPv4, its
// /56 for IPv6 (a subscriber commonly holds a /56 or a /64, so a /64 each would give one
// subscriber 256 buckets). Anything unparsable is bounded and used as is.
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
	p, _ := addr.WithZone("").Prefix(56) // never fails for an IPv6 address
	return p.String()
}

// setRetryAfter sets Retry-After to wait in whole seconds, rounded up, at least one.
func setRetryAfter(w http.ResponseWriter, wait time.Duration) {
	w.Header().Set("Retry-After", strconv.Itoa(max(1, int((wait+time.Second-1)/time.Second))))
}

// tooManyRequests answers 429 temporarily_unavailable with Retry-After.
func tooManyRequests(w http.ResponseWriter, wait time.Duration, description string) {
	setRetryAfter(w, wait)
	writeError(w, http.StatusTooManyRequests, "temporarily_unavailable", description)
}

// oneTimeValueRate is how many login states and provisioning links one client address may
// present per minute. A user presents one per login; a stranger presents made-up ones,
// each costing a storage read.
const oneTimeValueRate = 60

// allowOneTimeValue takes a token of the client address's oneTimeValues bucket. When there
// is none it sets Retry-After and returns false: the caller answers 429 with its page.
func (b *Broker) allowOneTimeValue(w http.ResponseWriter, r *http.Request) bool {
	ok, wait := b.oneTimeValues.allow(rateLimitKey(clientIP(r)), oneTimeValueRate, b.now())
	if !ok {
		setRetryAfter(w, wait)
	}
	return ok
}
