// Package tokencache is the bounded, expiring map that remembers what checking a token
// found: the IdP verifier's verdicts, the broker's own access tokens, delegated tokens.
// A [Cache] is keyed by the token's SHA-256 ([Key]) or, where the value holds what tells
// one token from another, by a keyed hash of it ([Index]); never by the token itself.
// Each entry is good until its own expiry; a full cache evicts refusals before valid
// entries; and a warm [Cache.Get] is a read lock and a map read, without allocation.
// [Cache.DeleteFunc] (a revocation) bumps an epoch that [Cache.PutSince] checks, so a
// value computed before a removal is never cached after it.
package tokencache

import (
	"crypto/sha256"
	"hash/maphash"
	"math"
	"sync"
)

// DefaultEntries bounds a Cache built without a size.
const DefaultEntries = 10000

// evictionSample is how many entries a full cache looks at to choose a victim.
const evictionSample = 8

// Cache remembers what checking a token found, keyed by K: the token's SHA-256 (never the
// token), or an Index whose every hit the caller checks against the token; each entry is
// good until its own expiry. It is bounded: a full cache evicts one entry among a few
// taken from the map's randomized iteration order — the first that has expired or is
// disposable (a refusal), else the one expiring soonest — so a flood of bad tokens evicts
// its own refusals before any valid entry. The zero value is an empty cache
// of DefaultEntries entries. It is safe for concurrent use.
type Cache[K comparable, V any] struct {
	max int // entries; <= 0 means DefaultEntries

	mu      sync.RWMutex
	entries map[K]entry[V]
	// removals counts DeleteFunc and Clear calls: a value computed before one may be
	// stale (a revocation raced the check), and PutSince drops it.
	removals uint64
}

// entry is one cached value, good until expires (Unix ns).
type entry[V any] struct {
	value      V
	expires    int64
	disposable bool
}

// New returns an empty cache of at most max entries (DefaultEntries when max <= 0).
func New[K comparable, V any](max int) *Cache[K, V] {
	return &Cache[K, V]{max: max, entries: make(map[K]entry[V])}
}

// Key is the cache key of a token: its SHA-256, never the token itself. A token that fits
// is hashed from a copy on the stack, which spares the warm path a heap allocation.
func Key(raw string) [sha256.Size]byte {
	if len(raw) <= 4096 {
		var buf [4096]byte
		return sha256.Sum256(buf[:copy(buf[:], raw)])
	}
	return sha256.Sum256([]byte(raw))
}

// Index is a token's index in a cache: a 64-bit hash keyed with seed, a secret of the
// process (maphash.MakeSeed), about 20 times cheaper than Key on a 750-byte JWT. It tells
// tokens apart only by chance, and a stranger cannot aim at another token's index
// without the seed: a cache keyed by it must keep in each value what tells the tokens
// apart (the token, or its Key) and check it on every hit.
func Index(seed maphash.Seed, raw string) uint64 { return maphash.String(seed, raw) }

// Get returns the value cached for key, if it is still good at now (Unix ns).
func (c *Cache[K, V]) Get(key K, now int64) (V, bool) {
	c.mu.RLock()
	e, ok := c.entries[key]
	c.mu.RUnlock()
	if !ok || now >= e.expires {
		var zero V
		return zero, false
	}
	return e.value, true
}

// Put caches v under key until expires, evicting an entry when the cache is full.
// Disposable entries (refusals) are the first to go.
func (c *Cache[K, V]) Put(key K, v V, expires int64, disposable bool, now int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.putLocked(key, v, expires, disposable, now)
}

// Epoch names the cache's state of removals, for PutSince.
func (c *Cache[K, V]) Epoch() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.removals
}

// PutSince is Put, unless DeleteFunc or Clear ran since epoch was read: then v may have
// been computed from a state a removal has since declared void, and it is dropped. It
// tells whether v was cached.
func (c *Cache[K, V]) PutSince(epoch uint64, key K, v V, expires int64, disposable bool, now int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.removals != epoch {
		return false
	}
	c.putLocked(key, v, expires, disposable, now)
	return true
}

func (c *Cache[K, V]) putLocked(key K, v V, expires int64, disposable bool, now int64) {
	if c.entries == nil {
		c.entries = make(map[K]entry[V])
	}
	limit := c.max
	if limit <= 0 {
		limit = DefaultEntries
	}
	if _, ok := c.entries[key]; !ok && len(c.entries) >= limit {
		c.evictLocked(now)
	}
	c.entries[key] = entry[V]{value: v, expires: expires, disposable: disposable}
}

// evictLocked removes one entry among evictionSample taken from the map's randomized
// iteration order: the first expired or disposable one, else the one expiring soonest.
func (c *Cache[K, V]) evictLocked(now int64) {
	var victim K
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

// DeleteFunc removes every entry whose value drop says so, and returns how many. It
// walks the whole cache: meant for rare events such as a revocation.
func (c *Cache[K, V]) DeleteFunc(drop func(V) bool) int {
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

// DeleteExpired removes every entry expired at now (Unix ns) and returns how many. A full
// cache evicts expired entries on its own; this gives their memory back when it is not
// full, for a periodic sweep. It walks the whole cache under the write lock, so it is
// meant to run rarely; it voids nothing computed before it (no PutSince is refused).
func (c *Cache[K, V]) DeleteExpired(now int64) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for k, e := range c.entries {
		if now >= e.expires {
			delete(c.entries, k)
			n++
		}
	}
	return n
}

// Len is the number of entries, expired ones included.
func (c *Cache[K, V]) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.entries)
}

// Clear empties the cache; like DeleteFunc, it voids values computed before it.
func (c *Cache[K, V]) Clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.removals++
	clear(c.entries)
}

// Count is the number of entries, expired ones included, whose value match says so. It
// walks the whole cache.
func (c *Cache[K, V]) Count(match func(V) bool) int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	n := 0
	for _, e := range c.entries {
		if match(e.value) {
			n++
		}
	}
	return n
}
