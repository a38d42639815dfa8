package redisstorage

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// Two storages on one server with clients of their own are two Caddy instances: one holds
// a lock at a time.
func TestLockExcludesAcrossInstances(t *testing.T) {
	srv := testenv.Redis(t)
	nodes := []*Storage{newStorage(t, srv), newStorage(t, srv)}
	var holders, maxHolders atomic.Int32
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			st := nodes[i%2]
			if err := st.Lock(ctx, "issue/example.com"); err != nil {
				t.Error(err)
				return
			}
			n := holders.Add(1)
			for {
				m := maxHolders.Load()
				if n <= m || maxHolders.CompareAndSwap(m, n) {
					break
				}
			}
			time.Sleep(2 * time.Millisecond)
			holders.Add(-1)
			if err := st.Unlock(ctx, "issue/example.com"); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if m := maxHolders.Load(); m != 1 {
		t.Fatalf("%d holders at once, want 1", m)
	}
}

// A holder that dies without Unlock (its client gone, its renewals with it) frees the
// lock once the lease runs out, and not before (SECURITY.md S2.25).
func TestLockExpiresWhenItsHolderDies(t *testing.T) {
	srv := testenv.Redis(t)
	const lease = 600 * time.Millisecond
	holder := withLease(newStorage(t, srv), lease)
	other := newStorage(t, srv)
	ctx := context.Background()
	if err := holder.Lock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	died := time.Now()
	// The process is gone: no Unlock, no renewal, no release at close.
	holder.conn.closeOnce.Do(func() {
		close(holder.conn.done)
		_ = holder.conn.client.Close()
	})

	if got, err := other.TryLock(ctx, "x"); err != nil || got {
		t.Fatalf("TryLock right after the holder died = %v, %v; want false until the lease runs out", got, err)
	}
	wait, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := other.Lock(wait, "x"); err != nil {
		t.Fatalf("Lock after the holder died = %v, want it within the lease", err)
	}
	if took := time.Since(died); took > lease+time.Second {
		t.Errorf("the lock came free %s after its holder died, want about the lease (%s)", took, lease)
	}
	if err := other.Unlock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
}

// A holder that keeps a lock for several leases keeps it: renewal extends it.
func TestLockIsRenewedWhileHeld(t *testing.T) {
	srv := testenv.Redis(t)
	const lease = 300 * time.Millisecond
	holder := withLease(newStorage(t, srv), lease)
	other := newStorage(t, srv)
	ctx := context.Background()
	if err := holder.Lock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * lease)
	if got, err := other.TryLock(ctx, "x"); err != nil || got {
		t.Fatalf("TryLock of a lock held for 4 leases = %v, %v; want false (renewed)", got, err)
	}
	if err := holder.Unlock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if got, err := other.TryLock(ctx, "x"); err != nil || !got {
		t.Fatalf("TryLock after Unlock = %v, %v; want true", got, err)
	}
}

// Unlock releases only the caller's own lock: another instance's Unlock, or a holder's
// whose lease ran out and whose lock another took since, leaves it held (SECURITY.md S2.25).
func TestUnlockLeavesOthersLocksAlone(t *testing.T) {
	srv := testenv.Redis(t)
	a, b, c := newStorage(t, srv), newStorage(t, srv), newStorage(t, srv)
	ctx := context.Background()
	if err := a.Lock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if err := b.Unlock(ctx, "x"); err == nil {
		t.Error("Unlock of a lock another instance holds succeeded")
	}
	if got, _ := c.TryLock(ctx, "x"); got {
		t.Fatal("the lock came free after another instance's Unlock")
	}

	// a's lease runs out (its key goes as if it had expired) and b takes the lock.
	if reply, err := srv.Do("DEL test:lock:x"); err != nil || reply != ":1" {
		t.Fatalf("DEL of the lock key = %q, %v", reply, err)
	}
	if got, err := b.TryLock(ctx, "x"); err != nil || !got {
		t.Fatalf("b's TryLock after a's lease ran out = %v, %v", got, err)
	}
	if err := a.Unlock(ctx, "x"); err == nil {
		t.Error("a's Unlock after its lease ran out succeeded")
	}
	if got, _ := c.TryLock(ctx, "x"); got {
		t.Fatal("a's late Unlock released b's lock")
	}
	if err := b.Unlock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
}

// Lock waits for a held lock only as long as its ctx lets it.
func TestLockHonoursItsContext(t *testing.T) {
	srv := testenv.Redis(t)
	a, b := newStorage(t, srv), newStorage(t, srv)
	if err := a.Lock(context.Background(), "x"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	err := b.Lock(ctx, "x")
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Lock cancelled while waiting = %v, want context.Canceled", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("Lock returned %s after its ctx was cancelled", took)
	}
}

// When the last configuration using a client unloads (Caddy exiting, or a reload to other
// storage), the locks held through it are released at once rather than left to expire, and
// an Unlock after that (Caddy unlocks what it holds after unloading) is no error.
func TestCloseReleasesHeldLocks(t *testing.T) {
	srv := testenv.Redis(t)
	a, b := newStorage(t, srv), newStorage(t, srv)
	ctx := context.Background()
	if err := a.Lock(ctx, "issue_cert_example.com"); err != nil {
		t.Fatal(err)
	}
	if err := a.conn.Destruct(); err != nil {
		t.Fatal(err)
	}
	if got, err := b.TryLock(ctx, "issue_cert_example.com"); err != nil || !got {
		t.Fatalf("TryLock after the holder's client closed = %v, %v; want the lock free", got, err)
	}
	if err := a.Unlock(ctx, "issue_cert_example.com"); err != nil {
		t.Errorf("Unlock after close = %v, want nil", err)
	}
}

// A holder that cannot renew (Redis hung for longer than the lease) loses the lock: it
// says so in the log, and its late Unlock fails without touching whoever holds it next.
func TestLockLostWhileRedisHungIsReported(t *testing.T) {
	srv := testenv.Redis(t)
	const lease = 300 * time.Millisecond
	holder := withLease(newStorage(t, srv, shortTimeouts), lease)
	core, logs := observer.New(zapcore.WarnLevel)
	holder.conn.logger = zap.New(core)
	ctx := context.Background()
	if err := holder.Lock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	srv.Pause()
	time.Sleep(2 * lease)
	srv.Resume() // the lock's key expires as Redis sees its time has passed
	deadline := time.Now().Add(5 * time.Second)
	for logs.FilterMessageSnippet("expired while held").Len() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no error logged for the lost lock; logs: %v", logs.All())
		}
		time.Sleep(20 * time.Millisecond)
	}
	other := newStorage(t, srv)
	if got, err := other.TryLock(ctx, "x"); err != nil || !got {
		t.Fatalf("TryLock of the lost lock = %v, %v; want it free", got, err)
	}
	if err := holder.Unlock(ctx, "x"); err == nil {
		t.Error("the former holder's Unlock succeeded")
	}
	if got, _ := newStorage(t, srv).TryLock(ctx, "x"); got {
		t.Error("the former holder's Unlock released the new holder's lock")
	}
}
