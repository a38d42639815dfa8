package flows

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/tokencache"
)

func TestCacheUntil(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name          string
		expiry, limit time.Time
		want          time.Time
	}{
		{"a 5-minute token stops 30 s early", now.Add(5 * time.Minute), time.Time{}, now.Add(4*time.Minute + 30*time.Second)},
		{"a 100 s token stops a tenth early", now.Add(100 * time.Second), time.Time{}, now.Add(90 * time.Second)},
		{"an hour-long token is kept 5 minutes at most", now.Add(time.Hour), time.Time{}, now.Add(5 * time.Minute)},
		{"never past the limit", now.Add(5 * time.Minute), now.Add(time.Minute), now.Add(time.Minute)},
		{"an expired token is not kept", now.Add(-time.Second), time.Time{}, now.Add(-time.Second)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := cacheUntil(now, tc.expiry, tc.limit); !got.Equal(tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestDelegationKeys(t *testing.T) {
	keys := map[delegationKey]string{}
	for name, k := range map[string]delegationKey{
		"session, no scopes":  sessionDelegationKey("s1", nil),
		"session, read":       sessionDelegationKey("s1", []string{"notes:read"}),
		"session, read+write": sessionDelegationKey("s1", []string{"notes:read", "notes:write"}),
		"other session, read": sessionDelegationKey("s2", []string{"notes:read"}),
		"token, read":         tokenDelegationKey(tokencache.Key("s1"), []string{"notes:read"}),
		"scope joined to id":  sessionDelegationKey("s1notes:read", nil),
	} {
		if other, dup := keys[k]; dup {
			t.Errorf("%q and %q share a key", name, other)
		}
		keys[k] = name
	}
}

func TestDelegatedCacheBounds(t *testing.T) {
	now := time.Now()
	nowFn := func() time.Time { return now }
	fetched := func(session string, life time.Duration) func(context.Context) (delegatedEntry, error) {
		return func(context.Context) (delegatedEntry, error) {
			return delegatedEntry{header: "Bearer " + session, expires: now.Add(life).UnixNano(), session: session}, nil
		}
	}

	t.Run("a full cache evicts and stays bounded", func(t *testing.T) {
		c := newDelegatedCache(16)
		for i := range 100 {
			key := sessionDelegationKey(fmt.Sprint(i), nil)
			if _, err := c.obtain(context.Background(), key, nowFn, time.Second, fetched(fmt.Sprint(i), time.Duration(i+1)*time.Second)); err != nil {
				t.Fatal(err)
			}
		}
		if n := c.entries.Len(); n != 16 {
			t.Errorf("%d entries, want 16", n)
		}
	})
	t.Run("an eviction during a fetch keeps its result out", func(t *testing.T) {
		c := newDelegatedCache(16)
		key := sessionDelegationKey("s", nil)
		release := make(chan struct{})
		started := make(chan struct{})
		done := make(chan error)
		go func() {
			_, err := c.obtain(context.Background(), key, nowFn, time.Second, func(ctx context.Context) (delegatedEntry, error) {
				close(started)
				<-release
				return fetched("s", time.Minute)(ctx)
			})
			done <- err
		}()
		<-started
		c.evictSession("s")
		close(release)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if _, ok := c.get(key, now.UnixNano()); ok {
			t.Error("a token obtained before the eviction was cached after it")
		}
	})
	t.Run("a failed fetch is not cached and the next caller tries again", func(t *testing.T) {
		c := newDelegatedCache(16)
		key := sessionDelegationKey("s", nil)
		fail := errors.New("idp down")
		if _, err := c.obtain(context.Background(), key, nowFn, time.Second, func(context.Context) (delegatedEntry, error) {
			return delegatedEntry{}, fail
		}); !errors.Is(err, fail) {
			t.Fatalf("err %v", err)
		}
		if h, err := c.obtain(context.Background(), key, nowFn, time.Second, fetched("s", time.Minute)); err != nil || h != "Bearer s" {
			t.Fatalf("%q %v", h, err)
		}
	})
	t.Run("a panicking fetch fails its callers instead of the process", func(t *testing.T) {
		c := newDelegatedCache(16)
		_, err := c.obtain(context.Background(), sessionDelegationKey("p", nil), nowFn, time.Second, func(context.Context) (delegatedEntry, error) {
			panic("boom")
		})
		if err == nil || c.flightCount() != 0 {
			t.Errorf("err %v, %d flights left", err, c.flightCount())
		}
	})
	t.Run("a fetch is bounded by its timeout", func(t *testing.T) {
		c := newDelegatedCache(16)
		_, err := c.obtain(context.Background(), sessionDelegationKey("slow", nil), nowFn, 20*time.Millisecond, func(ctx context.Context) (delegatedEntry, error) {
			<-ctx.Done()
			return delegatedEntry{}, ctx.Err()
		})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("err %v", err)
		}
	})
	t.Run("concurrent callers share one fetch, and one that leaves cancels it for no one", func(t *testing.T) {
		c := newDelegatedCache(16)
		key := sessionDelegationKey("shared", nil)
		var fetches atomic.Int32
		release := make(chan struct{})
		fetch := func(ctx context.Context) (delegatedEntry, error) {
			fetches.Add(1)
			select {
			case <-release:
			case <-ctx.Done():
				return delegatedEntry{}, ctx.Err()
			}
			return fetched("shared", time.Minute)(ctx)
		}
		leaving, leave := context.WithCancel(context.Background())
		left := make(chan error)
		go func() {
			_, err := c.obtain(leaving, key, nowFn, time.Minute, fetch)
			left <- err
		}()
		for c.flightCount() == 0 {
			runtime.Gosched()
		}
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				if h, err := c.obtain(context.Background(), key, nowFn, time.Minute, fetch); err != nil || h != "Bearer shared" {
					t.Errorf("waiter: %q %v", h, err)
				}
			})
		}
		leave()
		if err := <-left; !errors.Is(err, idp.ErrUnavailable) || !errors.Is(err, context.Canceled) {
			t.Errorf("the caller that left got %v", err)
		}
		close(release)
		wg.Wait()
		if n := fetches.Load(); n != 1 {
			t.Errorf("%d fetches, want 1", n)
		}
		if _, ok := c.get(key, now.UnixNano()); !ok {
			t.Error("the shared result was not cached")
		}
	})
}
