package storage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// fakeClock is an injectable clock; tests move it instead of sleeping.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newFileRecords(t *testing.T, dir string, clock *fakeClock) *Records {
	t.Helper()
	return New(&certmagic.FileStorage{Path: dir}, nil, WithClock(clock.Now))
}

type authCode struct {
	ClientID string `json:"client_id"`
	Scope    string `json:"scope"`
}

func TestPutGetDelete(t *testing.T) {
	ctx := context.Background()
	r := newFileRecords(t, t.TempDir(), newClock())
	key := Key("codes", Hash("code-1"))
	want := authCode{ClientID: "c1", Scope: "read"}
	if err := r.Put(ctx, key, want, time.Minute); err != nil {
		t.Fatal(err)
	}
	var got authCode
	if err := r.Get(ctx, key, &got); err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("Get = %+v, want %+v", got, want)
	}
	if err := r.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	err := r.Get(ctx, key, &got)
	if err != ErrNotFound || !errors.Is(err, ErrNotFound) || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Get after Delete = %v, want ErrNotFound matching fs.ErrNotExist", err)
	}
	if err := r.Delete(ctx, key); err != nil {
		t.Errorf("Delete of a missing record = %v, want nil", err)
	}
}

func TestPutRejectsNonPositiveTTL(t *testing.T) {
	r := newFileRecords(t, t.TempDir(), newClock())
	for _, ttl := range []time.Duration{0, -time.Second} {
		if err := r.Put(context.Background(), Key("codes", "x"), 1, ttl); err == nil {
			t.Errorf("Put with ttl %s succeeded", ttl)
		}
	}
}

func TestRecordsExpireWithTheInjectedClock(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	r := newFileRecords(t, t.TempDir(), clock)
	key := Key("codes", Hash("code-1"))
	if err := r.Put(ctx, key, "v", time.Minute); err != nil {
		t.Fatal(err)
	}
	var v string
	clock.Advance(time.Minute - time.Nanosecond)
	if err := r.Get(ctx, key, &v); err != nil {
		t.Fatalf("Get just before expiry = %v", err)
	}
	clock.Advance(time.Nanosecond)
	if err := r.Get(ctx, key, &v); err != ErrNotFound {
		t.Fatalf("Get at expiry = %v, want ErrNotFound", err)
	}
	if err := r.TakeOnce(ctx, key, &v); err != ErrNotFound {
		t.Fatalf("TakeOnce at expiry = %v, want ErrNotFound", err)
	}
	if live, err := r.List(ctx, Key("codes")); err != nil || len(live) != 0 {
		t.Fatalf("List after expiry = %v, %v; want empty", live, err)
	}
}

// GetExpiring returns the expiry Put gave the record, for callers that keep it in memory.
func TestGetExpiringReturnsTheRecordsExpiry(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	r := newFileRecords(t, t.TempDir(), clock)
	key := Key("clients", Hash("c1"))
	if err := r.Put(ctx, key, "v", time.Hour); err != nil {
		t.Fatal(err)
	}
	var v string
	exp, err := r.GetExpiring(ctx, key, &v)
	if err != nil || v != "v" || !exp.Equal(clock.Now().Add(time.Hour)) {
		t.Fatalf("GetExpiring = %v, %q, %v; want %v", exp, v, err, clock.Now().Add(time.Hour))
	}
	clock.Advance(time.Hour)
	if _, err := r.GetExpiring(ctx, key, &v); err != ErrNotFound {
		t.Fatalf("GetExpiring at expiry = %v, want ErrNotFound", err)
	}
}

func TestList(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	dir := t.TempDir()
	r := newFileRecords(t, dir, clock)
	put := func(ttl time.Duration, parts ...string) string {
		k := Key(parts...)
		if err := r.Put(ctx, k, 1, ttl); err != nil {
			t.Fatal(err)
		}
		return k
	}
	liveA := put(time.Hour, "grants", "u1", "a")
	liveB := put(time.Hour, "grants", "u2", "b")
	put(time.Minute, "grants", "u2", "short")
	put(time.Hour, "codes", "c")
	clock.Advance(2 * time.Minute)

	got, err := r.List(ctx, Key("grants"))
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	if want := []string{liveA, liveB}; !slices.Equal(got, want) {
		t.Errorf("List(grants) = %q, want %q (recursive, live only, no directories)", got, want)
	}

	got, err = r.List(ctx, Key("nothing", "here"))
	if err != nil || len(got) != 0 {
		t.Errorf("List of a missing prefix = %q, %v; want empty, nil", got, err)
	}
}

func TestTakeOnce(t *testing.T) {
	ctx := context.Background()
	r := newFileRecords(t, t.TempDir(), newClock())
	key := Key("codes", Hash("code-1"))
	if err := r.Put(ctx, key, authCode{ClientID: "c1"}, time.Minute); err != nil {
		t.Fatal(err)
	}
	var got authCode
	if err := r.TakeOnce(ctx, key, &got); err != nil || got.ClientID != "c1" {
		t.Fatalf("first TakeOnce = %+v, %v", got, err)
	}
	if err := r.TakeOnce(ctx, key, &got); err != ErrNotFound {
		t.Fatalf("second TakeOnce = %v, want ErrNotFound", err)
	}
	if err := r.Get(ctx, key, &got); err != ErrNotFound {
		t.Fatalf("Get after TakeOnce = %v, want ErrNotFound", err)
	}
}

// race runs take in n goroutines released together and counts the winners.
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
			case !errors.Is(err, ErrNotFound):
				errs <- err
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("unexpected error: %v", err)
	}
	return int(winners.Load())
}

func TestTakeOnceHasOneWinnerAmongGoroutines(t *testing.T) {
	ctx := context.Background()
	r := newFileRecords(t, t.TempDir(), newClock())
	key := Key("codes", Hash("code-1"))
	if err := r.Put(ctx, key, "v", time.Minute); err != nil {
		t.Fatal(err)
	}
	if w := race(t, 50, func(int) error {
		var v string
		return r.TakeOnce(ctx, key, &v)
	}); w != 1 {
		t.Fatalf("%d winners, want 1", w)
	}
	r.local.mu.Lock()
	defer r.local.mu.Unlock()
	if len(r.local.m) != 0 {
		t.Errorf("in-process lock table kept %d entries after use", len(r.local.m))
	}
}

func TestTakeOnceHasOneWinnerAcrossProcesses(t *testing.T) {
	// Two Records over two FileStorage values sharing one directory stand in
	// for two Caddy processes: they share nothing but the files.
	ctx := context.Background()
	dir := t.TempDir()
	clock := newClock()
	// Slow loads widen the window between load and delete, as a network
	// storage would; without the storage lock both nodes then win.
	nodes := []*Records{
		New(slowLoads{&certmagic.FileStorage{Path: dir}}, nil, WithClock(clock.Now)),
		New(slowLoads{&certmagic.FileStorage{Path: dir}}, nil, WithClock(clock.Now)),
	}
	key := Key("codes", Hash("code-1"))
	if err := nodes[0].Put(ctx, key, "v", time.Minute); err != nil {
		t.Fatal(err)
	}
	if w := race(t, 20, func(i int) error {
		var v string
		return nodes[i%2].TakeOnce(ctx, key, &v)
	}); w != 1 {
		t.Fatalf("%d winners, want 1", w)
	}
}

// slowLoads is a FileStorage whose loads take 10ms.
type slowLoads struct{ *certmagic.FileStorage }

func (s slowLoads) Load(ctx context.Context, key string) ([]byte, error) {
	time.Sleep(10 * time.Millisecond)
	return s.FileStorage.Load(ctx, key)
}

func TestLockExcludesAcrossGoroutinesAndProcesses(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	clock := newClock()
	nodes := []*Records{newFileRecords(t, dir, clock), newFileRecords(t, dir, clock)}
	var holders, maxHolders atomic.Int32
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Go(func() {
			unlock, err := nodes[i%2].Lock(ctx, "refresh/"+Hash("family"))
			if err != nil {
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
			time.Sleep(time.Millisecond)
			holders.Add(-1)
			unlock()
			unlock() // a second call is harmless
		})
	}
	wg.Wait()
	if m := maxHolders.Load(); m != 1 {
		t.Fatalf("%d holders at once, want 1", m)
	}
}

func TestLockGivesUpWhenContextEnds(t *testing.T) {
	dir := t.TempDir()
	clock := newClock()
	a, b := newFileRecords(t, dir, clock), newFileRecords(t, dir, clock)
	unlock, err := a.Lock(context.Background(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	for name, r := range map[string]*Records{"same process": a, "other process": b} {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		_, err := r.Lock(ctx, "x")
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("%s: Lock on a held lock = %v, want deadline exceeded", name, err)
		}
	}
}

// nativeFake is an in-memory certmagic.Storage that also implements Native,
// counting calls so tests can see which path Records took.
type nativeFake struct {
	mu    sync.Mutex
	data  map[string][]byte
	ttls  map[string]time.Duration
	calls map[string]int
	locks keyedLocks
	held  sync.Map // lock name -> release func
}

func newNativeFake() *nativeFake {
	return &nativeFake{data: map[string][]byte{}, ttls: map[string]time.Duration{}, calls: map[string]int{}}
}

func (f *nativeFake) count(op string) {
	f.mu.Lock()
	f.calls[op]++
	f.mu.Unlock()
}

func (f *nativeFake) Calls(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

func (f *nativeFake) Lock(ctx context.Context, name string) error {
	f.count("Lock")
	release, err := f.locks.lock(ctx, name)
	if err == nil {
		f.held.Store(name, release)
	}
	return err
}

func (f *nativeFake) Unlock(_ context.Context, name string) error {
	f.count("Unlock")
	release, ok := f.held.LoadAndDelete(name)
	if !ok {
		return fmt.Errorf("unlock of %s, which is not locked", name)
	}
	release.(func())()
	return nil
}

func (f *nativeFake) Store(_ context.Context, key string, value []byte) error {
	f.count("Store")
	f.mu.Lock()
	defer f.mu.Unlock()
	f.data[key] = value
	return nil
}

func (f *nativeFake) StoreTTL(_ context.Context, key string, value []byte, ttl time.Duration) error {
	f.count("StoreTTL")
	f.mu.Lock()
	defer f.mu.Unlock()
	f.data[key] = value
	f.ttls[key] = ttl
	return nil
}

func (f *nativeFake) Load(_ context.Context, key string) ([]byte, error) {
	f.count("Load")
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.data[key]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return v, nil
}

// ExpiresRecords is true, as for Redis: the fake's StoreTTL records the ttl.
func (f *nativeFake) ExpiresRecords() bool { return true }

func (f *nativeFake) LoadAndDelete(_ context.Context, key string) ([]byte, error) {
	f.count("LoadAndDelete")
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.data[key]
	if !ok {
		return nil, fs.ErrNotExist
	}
	delete(f.data, key)
	return v, nil
}

func (f *nativeFake) LoadAndMove(_ context.Context, from, to string) ([]byte, error) {
	f.count("LoadAndMove")
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.data[from]
	if !ok {
		return nil, fs.ErrNotExist
	}
	delete(f.data, from)
	f.data[to], f.ttls[to] = v, f.ttls[from]
	return v, nil
}

func (f *nativeFake) Delete(_ context.Context, key string) error {
	f.count("Delete")
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.data, key)
	return nil
}

func (f *nativeFake) Exists(_ context.Context, key string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.data[key]
	return ok
}

func (f *nativeFake) List(_ context.Context, prefix string, _ bool) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var keys []string
	for k := range f.data {
		if strings.HasPrefix(k, prefix+"/") {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil, fs.ErrNotExist
	}
	return keys, nil
}

func (f *nativeFake) Stat(_ context.Context, key string) (certmagic.KeyInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.data[key]
	if !ok {
		return certmagic.KeyInfo{}, fs.ErrNotExist
	}
	return certmagic.KeyInfo{Key: key, Size: int64(len(v)), IsTerminal: true}, nil
}

var (
	_ certmagic.Storage = (*nativeFake)(nil)
	_ Native            = (*nativeFake)(nil)
)

func TestNativeFastPath(t *testing.T) {
	ctx := context.Background()
	fake := newNativeFake()
	r := New(fake, nil, WithClock(newClock().Now))
	key := Key("codes", Hash("code-1"))
	if err := r.Put(ctx, key, "v", 90*time.Second); err != nil {
		t.Fatal(err)
	}
	if fake.Calls("StoreTTL") != 1 || fake.Calls("Store") != 0 {
		t.Fatalf("Put called StoreTTL %d and Store %d times; want the native path only", fake.Calls("StoreTTL"), fake.Calls("Store"))
	}
	if ttl := fake.ttls[key]; ttl != 90*time.Second {
		t.Errorf("StoreTTL got ttl %s, want 90s", ttl)
	}
	var v string
	if err := r.Get(ctx, key, &v); err != nil || v != "v" {
		t.Fatalf("Get = %q, %v", v, err)
	}

	if w := race(t, 50, func(int) error {
		var v string
		return r.TakeOnce(ctx, key, &v)
	}); w != 1 {
		t.Fatalf("%d winners, want 1", w)
	}
	if got := fake.Calls("LoadAndDelete"); got != 50 {
		t.Errorf("LoadAndDelete called %d times, want 50", got)
	}
	if fake.Calls("Lock") != 0 || fake.Calls("Delete") != 0 {
		t.Errorf("TakeOnce took %d locks and made %d deletes; want none on the native path", fake.Calls("Lock"), fake.Calls("Delete"))
	}
}

// takeLeavingRace races n TakeOnceLeaving calls of one record over nodes and checks the
// guarantee the code's replay detection rests on: one winner, and every loser, once it
// has its ErrNotFound, reads the record at the trace.
func takeLeavingRace(t *testing.T, nodes []*Records, n int) {
	t.Helper()
	ctx := context.Background()
	key, trace := Key("codes", Hash("code-1")), Key("usedcodes", Hash("code-1"))
	if err := nodes[0].Put(ctx, key, authCode{ClientID: "c1"}, time.Minute); err != nil {
		t.Fatal(err)
	}
	var traceMissed atomic.Int32
	if w := race(t, n, func(i int) error {
		var got authCode
		err := nodes[i%len(nodes)].TakeOnceLeaving(ctx, key, trace, &got)
		if errors.Is(err, ErrNotFound) {
			var seen authCode
			if nodes[(i+1)%len(nodes)].Get(ctx, trace, &seen) != nil || seen.ClientID != "c1" {
				traceMissed.Add(1)
			}
		} else if err == nil && got.ClientID != "c1" {
			t.Errorf("the winner got %+v", got)
		}
		return err
	}); w != 1 {
		t.Fatalf("%d winners, want 1", w)
	}
	if m := traceMissed.Load(); m != 0 {
		t.Errorf("%d losers found no trace after their ErrNotFound", m)
	}
	var v authCode
	if err := nodes[0].Get(ctx, key, &v); err != ErrNotFound {
		t.Errorf("Get of the taken key = %v, want ErrNotFound", err)
	}
}

func TestTakeOnceLeavingOnAFolder(t *testing.T) {
	dir, clock := t.TempDir(), newClock()
	// Two FileStorage values on one folder are two nodes; a folder's is the rename.
	takeLeavingRace(t, []*Records{newFileRecords(t, dir, clock), newFileRecords(t, dir, clock)}, 50)

	// The trace keeps the record's expiry, then is gone as any record.
	r := newFileRecords(t, dir, clock)
	trace := Key("usedcodes", Hash("code-1"))
	clock.Advance(time.Minute)
	var v authCode
	if err := r.Get(context.Background(), trace, &v); err != ErrNotFound {
		t.Errorf("Get of the trace after the record's expiry = %v, want ErrNotFound", err)
	}
	// A key nobody stored: ErrNotFound, and no trace made for it.
	missing, missingTrace := Key("codes", Hash("junk")), Key("usedcodes", Hash("junk"))
	if err := r.TakeOnceLeaving(context.Background(), missing, missingTrace, &v); err != ErrNotFound {
		t.Fatalf("TakeOnceLeaving of a missing record = %v, want ErrNotFound", err)
	}
	if err := r.Get(context.Background(), missingTrace, &v); err != ErrNotFound {
		t.Errorf("Get of the trace of a missing record = %v, want ErrNotFound", err)
	}
}

// The first moves into a trace folder make it: a move that finds it missing must not take
// another's mkdir for its record gone (each record here is taken once, by one caller).
func TestTakeOnceLeavingIntoANewFolderConcurrently(t *testing.T) {
	ctx := context.Background()
	for round := range 20 {
		dir, clock := t.TempDir(), newClock()
		r := newFileRecords(t, dir, clock)
		const n = 16
		for i := range n {
			if err := r.Put(ctx, Key("codes", Hash(fmt.Sprint(i))), i, time.Minute); err != nil {
				t.Fatal(err)
			}
		}
		if w := race(t, n, func(i int) error {
			var v int
			return r.TakeOnceLeaving(ctx, Key("codes", Hash(fmt.Sprint(i))), Key("usedcodes", Hash(fmt.Sprint(i))), &v)
		}); w != n {
			t.Fatalf("round %d: %d of %d records taken, want all", round, w, n)
		}
	}
}

func TestTakeOnceLeavingUnderTheLock(t *testing.T) {
	// Without Native (slowLoads hides the folder's fast path), the storage lock: slow
	// loads widen the window in which a loser could find neither key nor trace.
	dir, clock := t.TempDir(), newClock()
	nodes := []*Records{
		New(slowLoads{&certmagic.FileStorage{Path: dir}}, nil, WithClock(clock.Now)),
		New(slowLoads{&certmagic.FileStorage{Path: dir}}, nil, WithClock(clock.Now)),
	}
	takeLeavingRace(t, nodes, 10)
}

func TestTakeOnceLeavingOnNative(t *testing.T) {
	fake := newNativeFake()
	r := New(fake, nil, WithClock(newClock().Now))
	takeLeavingRace(t, []*Records{r}, 50)
	if got := fake.Calls("LoadAndMove"); got != 50 {
		t.Errorf("LoadAndMove called %d times, want 50", got)
	}
	if fake.Calls("Lock") != 0 || fake.Calls("Delete") != 0 || fake.Calls("StoreTTL") != 1 {
		t.Errorf("TakeOnceLeaving took %d locks, made %d deletes and %d stores; want the move only",
			fake.Calls("Lock"), fake.Calls("Delete"), fake.Calls("StoreTTL")-1)
	}
	if ttl := fake.ttls[Key("usedcodes", Hash("code-1"))]; ttl != time.Minute {
		t.Errorf("the trace's ttl = %s, want the record's (1m)", ttl)
	}
}

// lockCounter is a FileStorage that counts Lock calls, to see which takes lock.
type lockCounter struct {
	*certmagic.FileStorage
	locks atomic.Int32
}

func (s *lockCounter) Lock(ctx context.Context, name string) error {
	s.locks.Add(1)
	return s.FileStorage.Lock(ctx, name)
}

// A stranger can make the broker TakeOnce any key it likes (a random state or code):
// a key that holds no live record must cost a read, never a storage lock, which
// FileStorage makes a lock file and a goroutine kept alive for seconds (SECURITY.md).
func TestTakeOnceOfAMissingOrExpiredRecordTakesNoLock(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	clock := newClock()
	s := &lockCounter{FileStorage: &certmagic.FileStorage{Path: dir}}
	r := New(s, nil, WithClock(clock.Now))

	expired := Key("codes", Hash("expired"))
	if err := r.Put(ctx, expired, "v", time.Minute); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Minute)
	var v string
	for i := range 20 {
		if err := r.TakeOnce(ctx, Key("codes", Hash(fmt.Sprint("junk-", i))), &v); err != ErrNotFound {
			t.Fatalf("TakeOnce of a missing record = %v, want ErrNotFound", err)
		}
	}
	if err := r.TakeOnce(ctx, expired, &v); err != ErrNotFound {
		t.Fatalf("TakeOnce of an expired record = %v, want ErrNotFound", err)
	}
	if n := s.locks.Load(); n != 0 {
		t.Errorf("TakeOnce of missing and expired records took %d storage locks, want 0", n)
	}

	live := Key("codes", Hash("live"))
	if err := r.Put(ctx, live, "v", time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := r.TakeOnce(ctx, live, &v); err != nil || v != "v" {
		t.Fatalf("TakeOnce of a live record = %q, %v", v, err)
	}
	if n := s.locks.Load(); n != 1 {
		t.Errorf("TakeOnce of a live record took %d storage locks, want 1", n)
	}
}

// TestEncodeEnvelopeIsJSONMarshal holds the hand-built envelope to json.Marshal's bytes,
// which earlier releases wrote and every release reads.
func TestEncodeEnvelopeIsJSONMarshal(t *testing.T) {
	at := time.Date(2026, 12, 2, 12, 0, 0, 123456789, time.UTC)
	for _, v := range []any{
		map[string]any{"a": "<script>&amp;</script>", "b": []int{1, 2}, "c": "é\u2028"},
		struct {
			S string    `json:"s"`
			T time.Time `json:"t"`
		}{"x", at},
		"plain", 42, nil,
	} {
		value, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		for _, exp := range []time.Time{at, at.Truncate(time.Second), time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)} {
			want, err := json.Marshal(envelope{ExpiresAt: exp, Value: value})
			if err != nil {
				t.Fatal(err)
			}
			got, err := encodeEnvelope(exp, value)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("encodeEnvelope(%v, %s) = %s, %v; json.Marshal gives %s", exp, value, got, err, want)
			}
		}
	}
}
