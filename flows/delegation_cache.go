package flows

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/tokencache"
)

// Delegated tokens live only in memory: the delegatedCache below. Bounds, for the README:
//
//   - Entries: at most delegationCacheEntries (10000); a full cache evicts an expired
//     entry, else the one expiring soonest among a few sampled.
//   - Life of an entry: until its token's expiry less a safety margin (30 s or a tenth of
//     the token's lifetime, whichever is smaller), and never more than
//     delegationCacheMaxAge (5 min) after it was obtained. In progressive mode also never
//     past the expiry of the client's token it was exchanged for.
//   - Revocation: evictDelegated drops a session's entries on this node at once. Another
//     node of a cluster keeps serving its entry for that session until the entry
//     expires: at most 5 minutes, and never past the delegated token's expiry less the
//     margin.
//
// Steady state: a request whose (session or client token, scope set) is cached costs
// one SHA-256 sum of the session id or the client token's SHA-256 (which the token's
// cached verdict holds) and the scopes, and a map read; no IdP call, no storage read.

const (
	delegationCacheEntries = 10000
	delegationCacheMaxAge  = 5 * time.Minute
	delegationMaxMargin    = 30 * time.Second
)

// delegationKey names a cache entry: the SHA-256 of who the token is for (the session
// id in hybrid mode, the hash of the client's token in progressive mode) and of the
// sorted scope set. Never the token itself.
type delegationKey [sha256.Size]byte

// delegatedEntry is a delegated token ready to send upstream. It is not an IdPGrant: the
// warm path sends the header as it is, built once when the token was obtained, so a
// cache hit allocates nothing.
type delegatedEntry struct {
	header  string // "Bearer <token>", built once
	expires int64  // Unix ns after which the entry is not used
	session string // the session it was obtained for ("" in progressive mode)
}

// delegatedCache holds delegated tokens by key, with single flight. The entries live in
// a tokencache.Cache (bounds and eviction shared with the token verifiers); its removal
// epoch keeps a revoked session's token out when a fetch finishes after the eviction. Safe
// for concurrent use.
type delegatedCache struct {
	entries *tokencache.Cache[delegationKey, delegatedEntry]
	// flight shares one fetch per key among concurrent callers; flying counts the
	// fetches under way.
	flight singleflight.Group
	flying atomic.Int64
}

func newDelegatedCache(max int) *delegatedCache {
	return &delegatedCache{entries: tokencache.New[delegationKey, delegatedEntry](max)}
}

// get returns the Authorization header value cached under key, if still good at now.
func (c *delegatedCache) get(key delegationKey, now int64) (string, bool) {
	e, ok := c.entries.Get(key, now)
	return e.header, ok
}

// generation is the eviction count a flight starts with; put refuses its result if a
// session was evicted meanwhile, so a revoked session's token cannot slip back in.
func (c *delegatedCache) generation() uint64 { return c.entries.Epoch() }

// put caches e under key unless an eviction happened since gen.
func (c *delegatedCache) put(key delegationKey, e delegatedEntry, gen uint64, now int64) {
	if e.expires <= now {
		return
	}
	c.entries.PutSince(gen, key, e, e.expires, false, now)
}

// evictSession drops every entry obtained for session. It walks the whole cache: it runs
// on revocation, rarely, and spares the hot path a second index.
func (c *delegatedCache) evictSession(session string) {
	c.entries.DeleteFunc(func(e delegatedEntry) bool { return e.session == session })
}

// obtain returns the header for key from the cache or from one fetch shared by every
// concurrent caller. The fetch runs detached from any caller's context (bounded by its
// own timeout), so a caller that goes away neither cancels it nor fails the others;
// each caller stops waiting when its own context ends. A failed fetch is not cached:
// the next caller tries again.
func (c *delegatedCache) obtain(ctx context.Context, key delegationKey, now func() time.Time, timeout time.Duration,
	fetch func(ctx context.Context) (delegatedEntry, error)) (string, error) {
	if h, ok := c.get(key, now().UnixNano()); ok {
		return h, nil
	}
	detached := context.WithoutCancel(ctx)
	flight := c.flight.DoChan(string(key[:]), func() (any, error) {
		// A flight that ended between the lookup above and this one has filled the cache.
		if h, ok := c.get(key, now().UnixNano()); ok {
			return h, nil
		}
		return c.run(detached, key, now, timeout, fetch)
	})
	select {
	case res := <-flight:
		h, _ := res.Val.(string)
		return h, res.Err
	case <-ctx.Done():
		return "", fmt.Errorf("%w: waiting for a delegated token: %w", idp.ErrUnavailable, ctx.Err())
	}
}

// run performs one fetch for key and caches its result unless a session was evicted
// meanwhile. The entry is in the cache before the flight ends: a new caller finds one or
// the other. A panic fails the flight's callers, not the process (singleflight would
// re-panic it where no one recovers).
func (c *delegatedCache) run(ctx context.Context, key delegationKey, now func() time.Time, timeout time.Duration,
	fetch func(ctx context.Context) (delegatedEntry, error)) (header string, err error) {
	c.flying.Add(1)
	defer c.flying.Add(-1)
	gen := c.generation()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	defer func() {
		if p := recover(); p != nil {
			header, err = "", fmt.Errorf("obtaining a delegated token: panic: %v", p)
		}
	}()
	e, err := fetch(ctx)
	if err != nil {
		return "", err
	}
	c.put(key, e, gen, now().UnixNano())
	return e.header, nil
}

// cacheUntil is when a token expiring at expiry, obtained at now, stops being served:
// a margin before expiry (30 s or a tenth of its lifetime, the smaller), at most
// delegationCacheMaxAge after now, and never after limit (when set).
func cacheUntil(now, expiry, limit time.Time) time.Time {
	life := expiry.Sub(now)
	until := expiry.Add(-min(delegationMaxMargin, max(life/10, 0)))
	if ceiling := now.Add(delegationCacheMaxAge); until.After(ceiling) {
		until = ceiling
	}
	if !limit.IsZero() && until.After(limit) {
		until = limit
	}
	return until
}

// sessionDelegationKey is the cache key of a session's token for scopes (sorted).
func sessionDelegationKey(session string, scopes []string) delegationKey {
	var buf [1024]byte
	b := append(buf[:0], 's')
	b = append(b, session...)
	return scopeKey(b, scopes)
}

// tokenDelegationKey is the cache key of the token exchanged for a client's token whose
// SHA-256 is digest (tokencache.Key), for scopes (sorted). Only the token's hash enters
// the key.
func tokenDelegationKey(digest [sha256.Size]byte, scopes []string) delegationKey {
	h := digest
	var buf [1024]byte
	b := append(buf[:0], 'p')
	b = append(b, h[:]...)
	return scopeKey(b, scopes)
}

// scopeKey hashes prefix and the scopes. A scope token holds no space (RFC 6749 §3.3)
// and a session id no NUL, so the encoding is unambiguous.
func scopeKey(b []byte, scopes []string) delegationKey {
	b = append(b, 0)
	for i, s := range scopes {
		if i > 0 {
			b = append(b, ' ')
		}
		b = append(b, s...)
	}
	return sha256.Sum256(b)
}
