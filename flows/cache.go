package flows

import (
	"crypto/sha256"
	"math"
	"sync"
)

// defaultTokenCacheEntries bounds a tokenCache built without a size.
const defaultTokenCacheEntries = 10000

// tokenCache remembers what checking a token found, keyed by the token's SHA-256 (never
// the token), each entry good until its own expiry. It is bounded: a full cache evicts one
// entry among a few taken from the map's randomized iteration order — the first that has
// expired or is disposable (a refusal), else the one expiring soonest — so a flood of bad
// tokens evicts its own refusals before any valid entry. A warm lookup is a read lock and
// a map read, without allocation. The zero value is an empty cache of
// defaultTokenCacheEntries entries. It is safe for concurrent use.
type tokenCache[V any] struct {
	max int // entries; <= 0 means defaultTokenCacheEntries

	mu      sync.RWMutex
	entries map[[sha256.Size]byte]cacheEntry[V]
	// removals counts deleteFunc calls: a value computed before one may be stale (a
	// revocation raced the check), and putSince drops it.
	removals uint64
}

// cacheEntry is one cached value, good until expires (Unix ns).
type cacheEntry[V any] struct {
	value      V
	expires    int64
	disposable bool
}

func newTokenCache[V any](max int) *tokenCache[V] {
	return &tokenCache[V]{max: max, entries: make(map[[sha256.Size]byte]cacheEntry[V])}
}

// get returns the value cached for key, if it is still good at now (Unix ns).
func (c *tokenCache[V]) get(key [sha256.Size]byte, now int64) (V, bool) {
	c.mu.RLock()
	e, ok := c.entries[key]
	c.mu.RUnlock()
	if !ok || now >= e.expires {
		var zero V
		return zero, false
	}
	return e.value, true
}

// put caches v under key until expires, evicting an entry when the cache is full.
// Disposable entries (refusals) are the first to go.
func (c *tokenCache[V]) put(key [sha256.Size]byte, v V, expires int64, disposable bool, now int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.putLocked(key, v, expires, disposable, now)
}

// epoch names the cache's state of removals, for putSince.
func (c *tokenCache[V]) epoch() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.removals
}

// putSince is put, unless deleteFunc ran since epoch was read: then v may have been
// computed from a state a removal has since declared void, and it is dropped. It tells
// whether v was cached.
func (c *tokenCache[V]) putSince(epoch uint64, key [sha256.Size]byte, v V, expires int64, disposable bool, now int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.removals != epoch {
		return false
	}
	c.putLocked(key, v, expires, disposable, now)
	return true
}

func (c *tokenCache[V]) putLocked(key [sha256.Size]byte, v V, expires int64, disposable bool, now int64) {
	if c.entries == nil {
		c.entries = make(map[[sha256.Size]byte]cacheEntry[V])
	}
	limit := c.max
	if limit <= 0 {
		limit = defaultTokenCacheEntries
	}
	if _, ok := c.entries[key]; !ok && len(c.entries) >= limit {
		c.evictLocked(now)
	}
	c.entries[key] = cacheEntry[V]{value: v, expires: expires, disposable: disposable}
}

// evictLocked removes one entry among evictionSample taken from the map's randomized
// iteration order: the first expired or disposable one, else the one expiring soonest.
func (c *tokenCache[V]) evictLocked(now int64) {
	var victim [sha256.Size]byte
	soonest, n := int64(math.MaxInt64), 0
	for k, e := range c.entries {
		if now >= e.expires || e.disposable {
			victim = k
			break
		}
		if e.expires < soonest {
			victim, soonest = k, e.expires
		}
		if n++; n >= evictionSample {
			break
		}
	}
	delete(c.entries, victim)
}

// deleteFunc removes every entry whose value drop says so, and returns how many. It
// walks the whole cache: meant for rare events such as a revocation.
func (c *tokenCache[V]) deleteFunc(drop func(V) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.removals++
	n := 0
	for k, e := range c.entries {
		if drop(e.value) {
			delete(c.entries, k)
			n++
		}
	}
	return n
}
