package storage

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestSweepDeletesExpiredAndKeepsLive(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	r := newFileRecords(t, t.TempDir(), clock)
	expired := []string{Key("codes", "a"), Key("codes", "b"), Key("grants", "u1", "old")}
	live := []string{Key("codes", "c"), Key("grants", "u1", "new")}
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
	clock.Advance(2 * time.Minute)

	deleted, err := r.Sweep(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if deleted != len(expired) {
		t.Errorf("Sweep deleted %d, want %d", deleted, len(expired))
	}
	for _, k := range expired {
		if r.store.Exists(ctx, k) {
			t.Errorf("expired %s still stored", k)
		}
	}
	for _, k := range live {
		var v int
		if err := r.Get(ctx, k, &v); err != nil {
			t.Errorf("live %s: %v", k, err)
		}
	}
	if deleted, err := r.Sweep(ctx); err != nil || deleted != 0 {
		t.Errorf("second Sweep = %d, %v; want 0, nil", deleted, err)
	}
}

func TestSweepOfEmptyStorage(t *testing.T) {
	r := newFileRecords(t, t.TempDir(), newClock())
	if deleted, err := r.Sweep(context.Background()); err != nil || deleted != 0 {
		t.Errorf("Sweep = %d, %v; want 0, nil", deleted, err)
	}
}

func TestJanitorSkipsWhenAnotherNodeSweptRecently(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	clock := newClock()
	nodeA, nodeB := newFileRecords(t, dir, clock), newFileRecords(t, dir, clock)
	const interval = 10 * time.Minute

	if err := nodeA.Put(ctx, Key("codes", "a"), 1, time.Second); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Minute)
	if ran, deleted, err := nodeA.janitorRound(ctx, interval); err != nil || !ran || deleted != 1 {
		t.Fatalf("node A round = %v, %d, %v; want a sweep deleting 1", ran, deleted, err)
	}

	if err := nodeA.Put(ctx, Key("codes", "b"), 1, time.Second); err != nil {
		t.Fatal(err)
	}
	clock.Advance(interval / 2)
	if ran, _, err := nodeB.janitorRound(ctx, interval); err != nil || ran {
		t.Fatalf("node B round half an interval later = %v, %v; want skipped", ran, err)
	}
	if !nodeB.store.Exists(ctx, Key("codes", "b")) {
		t.Fatal("skipped round deleted a record")
	}

	clock.Advance(interval / 2)
	if ran, deleted, err := nodeB.janitorRound(ctx, interval); err != nil || !ran || deleted != 1 {
		t.Fatalf("node B round a full interval later = %v, %d, %v; want a sweep deleting 1", ran, deleted, err)
	}
}

func TestJanitorSkipsWhileAnotherNodeHoldsTheLock(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	clock := newClock()
	nodeA, nodeB := newFileRecords(t, dir, clock), newFileRecords(t, dir, clock)
	if err := nodeA.store.Lock(ctx, janitorLock); err != nil {
		t.Fatal(err)
	}
	defer nodeA.store.Unlock(ctx, janitorLock)
	if ran, _, err := nodeB.janitorRound(ctx, time.Minute); err != nil || ran {
		t.Fatalf("round while locked = %v, %v; want skipped", ran, err)
	}
}

func waitDone(t *testing.T, j *Janitor) {
	t.Helper()
	select {
	case <-j.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("janitor goroutine did not exit")
	}
}

func TestJanitorRunsAndStops(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	r := newFileRecords(t, t.TempDir(), clock)
	expiredKey, liveKey := Key("codes", "old"), Key("codes", "new")
	if err := r.Put(ctx, expiredKey, 1, time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := r.Put(ctx, liveKey, 1, time.Hour); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Minute)

	j := r.StartJanitor(ctx, 20*time.Millisecond)
	deadline := time.Now().Add(5 * time.Second)
	for r.store.Exists(ctx, expiredKey) {
		if time.Now().After(deadline) {
			t.Fatal("janitor did not delete the expired record")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !r.store.Exists(ctx, liveKey) {
		t.Error("janitor deleted a live record")
	}

	stopped := make(chan struct{})
	go func() { j.Stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("Stop did not return")
	}
	waitDone(t, j)
	j.Stop() // a second Stop returns at once
}

func TestJanitorStopsWhenContextIsCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	r := newFileRecords(t, t.TempDir(), newClock())
	j := r.StartJanitor(ctx, time.Hour)
	cancel()
	waitDone(t, j)
	j.Stop()
}

func TestJanitorWritesMarker(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	r := newFileRecords(t, t.TempDir(), clock)
	if _, _, err := r.janitorRound(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	var m janitorMarker
	if err := r.Get(ctx, Key("janitor", "last_run"), &m); err != nil {
		t.Fatal(err)
	}
	if !m.RanAt.Equal(clock.Now()) {
		t.Errorf("marker ran_at = %s, want %s", m.RanAt, clock.Now())
	}
	// Once the cluster stops, the marker expires and is swept like any record.
	clock.Advance(3 * time.Minute)
	if err := r.Get(ctx, janitorMarkerKey, &m); !errors.Is(err, ErrNotFound) {
		t.Errorf("marker after 3 intervals: %v, want ErrNotFound", err)
	}
}
