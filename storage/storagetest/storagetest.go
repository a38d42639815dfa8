// Package storagetest holds storage.Records to the same assertions over any
// certmagic.Storage backend: the storage package runs them over file_system, redisstorage
// over Redis. Only tests import it.
package storagetest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
	"github.com/caddyserver/certmagic"
)

// Backend opens a storage of the test's own; each call of the func it returns is one more
// instance (a Caddy process) on that same storage.
type Backend func(t *testing.T) (instance func() certmagic.Storage)

// clock is a clock the suite moves by hand, so that expiry needs no sleeping.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// Records runs the records suite over backend: Put, Get and Delete; expiry by the
// records' clock; List of live records only; the janitor's Sweep; TakeOnce once; and one
// winner among concurrent TakeOnce calls spread over two instances; TakeOnceLeaving's
// one winner and its trace for the others.
func Records(t *testing.T, backend Backend) {
	setup := func(t *testing.T) (*clock, func() *storage.Records) {
		instance := backend(t)
		c := &clock{t: time.Now().UTC().Truncate(time.Second)}
		return c, func() *storage.Records { return storage.New(instance(), nil, storage.WithClock(c.Now)) }
	}
	ctx := context.Background()

	t.Run("put get delete", func(t *testing.T) {
		_, open := setup(t)
		r := open()
		key := storage.Key("codes", storage.Hash("code-1"))
		if err := r.Put(ctx, key, map[string]string{"client_id": "c1"}, time.Minute); err != nil {
			t.Fatal(err)
		}
		var got map[string]string
		if err := r.Get(ctx, key, &got); err != nil || got["client_id"] != "c1" {
			t.Fatalf("Get = %v, %v", got, err)
		}
		if err := r.Delete(ctx, key); err != nil {
			t.Fatal(err)
		}
		if err := r.Get(ctx, key, &got); err != storage.ErrNotFound {
			t.Fatalf("Get after Delete = %v, want ErrNotFound", err)
		}
		if err := r.Delete(ctx, key); err != nil {
			t.Errorf("Delete of a missing record = %v, want nil", err)
		}
	})

	t.Run("records expire by the clock", func(t *testing.T) {
		c, open := setup(t)
		r := open()
		key := storage.Key("codes", storage.Hash("code-1"))
		if err := r.Put(ctx, key, "v", time.Minute); err != nil {
			t.Fatal(err)
		}
		var v string
		c.Advance(time.Minute - time.Nanosecond)
		if err := r.Get(ctx, key, &v); err != nil {
			t.Fatalf("Get just before expiry = %v", err)
		}
		c.Advance(time.Nanosecond)
		if err := r.Get(ctx, key, &v); err != storage.ErrNotFound {
			t.Fatalf("Get at expiry = %v, want ErrNotFound", err)
		}
		if err := r.TakeOnce(ctx, key, &v); err != storage.ErrNotFound {
			t.Fatalf("TakeOnce at expiry = %v, want ErrNotFound", err)
		}
	})

	t.Run("list returns live records under a prefix", func(t *testing.T) {
		c, open := setup(t)
		r := open()
		put := func(ttl time.Duration, parts ...string) string {
			k := storage.Key(parts...)
			if err := r.Put(ctx, k, 1, ttl); err != nil {
				t.Fatal(err)
			}
			return k
		}
		liveA := put(time.Hour, "grants", "u1", "a")
		liveB := put(time.Hour, "grants", "u2", "b")
		put(time.Minute, "grants", "u2", "short")
		put(time.Hour, "codes", "c")
		c.Advance(2 * time.Minute)
		got, err := r.List(ctx, storage.Key("grants"))
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(got)
		if want := []string{liveA, liveB}; !slices.Equal(got, want) {
			t.Errorf("List(grants) = %q, want %q", got, want)
		}
		if got, err := r.List(ctx, storage.Key("nothing", "here")); err != nil || len(got) != 0 {
			t.Errorf("List of a missing prefix = %q, %v; want empty, nil", got, err)
		}
	})

	t.Run("sweep deletes expired records and keeps live ones", func(t *testing.T) {
		c, open := setup(t)
		r := open()
		expired := []string{storage.Key("codes", "a"), storage.Key("grants", "u1", "old")}
		live := []string{storage.Key("codes", "c"), storage.Key("grants", "u1", "new")}
		for _, k := range expired {
			if err := r.Put(ctx, k, 1, time.Minute); err != nil {
				t.Fatal(err)
			}
		}
		for _, k := range live {
			if err := r.Put(ctx, k, 1, time.Hour); err != nil {
				t.Fatal(err)
			}
		}
		c.Advance(2 * time.Minute)
		if deleted, err := r.Sweep(ctx); err != nil || deleted != len(expired) {
			t.Errorf("Sweep = %d, %v; want %d, nil", deleted, err, len(expired))
		}
		for _, k := range live {
			var v int
			if err := r.Get(ctx, k, &v); err != nil {
				t.Errorf("live %s after Sweep: %v", k, err)
			}
		}
		if deleted, err := r.Sweep(ctx); err != nil || deleted != 0 {
			t.Errorf("second Sweep = %d, %v; want 0, nil", deleted, err)
		}
	})

	t.Run("take once", func(t *testing.T) {
		_, open := setup(t)
		r := open()
		key := storage.Key("codes", storage.Hash("code-1"))
		if err := r.Put(ctx, key, "v", time.Minute); err != nil {
			t.Fatal(err)
		}
		var v string
		if err := r.TakeOnce(ctx, key, &v); err != nil || v != "v" {
			t.Fatalf("first TakeOnce = %q, %v", v, err)
		}
		if err := r.TakeOnce(ctx, key, &v); err != storage.ErrNotFound {
			t.Fatalf("second TakeOnce = %v, want ErrNotFound", err)
		}
		if err := r.Get(ctx, key, &v); err != storage.ErrNotFound {
			t.Fatalf("Get after TakeOnce = %v, want ErrNotFound", err)
		}
	})

	t.Run("take once has one winner across instances", func(t *testing.T) {
		_, open := setup(t)
		nodes := []*storage.Records{open(), open()}
		key := storage.Key("codes", storage.Hash("code-1"))
		if err := nodes[0].Put(ctx, key, "v", time.Minute); err != nil {
			t.Fatal(err)
		}
		if w := race(t, 50, func(i int) error {
			var v string
			return nodes[i%2].TakeOnce(ctx, key, &v)
		}); w != 1 {
			t.Fatalf("%d winners, want 1", w)
		}
	})

	t.Run("take once leaving has one winner across instances, and a trace for the others", func(t *testing.T) {
		c, open := setup(t)
		nodes := []*storage.Records{open(), open()}
		key, trace := storage.Key("codes", storage.Hash("code-1")), storage.Key("usedcodes", storage.Hash("code-1"))
		if err := nodes[0].Put(ctx, key, "v", time.Minute); err != nil {
			t.Fatal(err)
		}
		var missed atomic.Int32
		if w := race(t, 50, func(i int) error {
			var v string
			err := nodes[i%2].TakeOnceLeaving(ctx, key, trace, &v)
			if errors.Is(err, storage.ErrNotFound) {
				var seen string
				if nodes[(i+1)%2].Get(ctx, trace, &seen) != nil || seen != "v" {
					missed.Add(1)
				}
			}
			return err
		}); w != 1 {
			t.Fatalf("%d winners, want 1", w)
		}
		if m := missed.Load(); m != 0 {
			t.Errorf("%d losers found no trace after their ErrNotFound", m)
		}
		var v string
		if err := nodes[0].Get(ctx, key, &v); err != storage.ErrNotFound {
			t.Errorf("Get of the taken key = %v, want ErrNotFound", err)
		}
		c.Advance(time.Minute)
		if err := nodes[0].Get(ctx, trace, &v); err != storage.ErrNotFound {
			t.Errorf("Get of the trace past the record's expiry = %v, want ErrNotFound", err)
		}
	})
}

// race runs take in n goroutines released together and counts the winners; an error
// other than ErrNotFound fails the test.
func race(t *testing.T, n int, take func(i int) error) int {
	t.Helper()
	var (
		wg      sync.WaitGroup
		winners atomic.Int32
		start   = make(chan struct{})
		errs    = make(chan error, n)
	)
	for i := range n {
		wg.Go(func() {
			<-start
			switch err := take(i); {
			case err == nil:
				winners.Add(1)
			case !errors.Is(err, storage.ErrNotFound):
				errs <- fmt.Errorf("taker %d: %w", i, err)
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	return int(winners.Load())
}
