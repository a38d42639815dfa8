package redisstorage

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
	"github.com/caddy-mcp/oauth-broker/storage/storagetest"
	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
)

// TestRecordsOnRedis runs the storage package's records suite over Redis: two storages
// with clients of their own on one server are two instances.
func TestRecordsOnRedis(t *testing.T) {
	storagetest.Records(t, func(t *testing.T) func() certmagic.Storage {
		srv := testenv.Redis(t)
		return func() certmagic.Storage { return newStorage(t, srv) }
	})
}

// commandLog is a go-redis hook that records the commands a client sends.
type commandLog struct {
	mu   sync.Mutex
	sent []string
}

func (l *commandLog) DialHook(next redis.DialHook) redis.DialHook { return next }

func (l *commandLog) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		l.mu.Lock()
		l.sent = append(l.sent, cmd.Name())
		l.mu.Unlock()
		return next(ctx, cmd)
	}
}

func (l *commandLog) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		l.mu.Lock()
		for _, c := range cmds {
			l.sent = append(l.sent, c.Name())
		}
		l.mu.Unlock()
		return next(ctx, cmds)
	}
}

func (l *commandLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.sent
	l.sent = nil
	return out
}

// Records over this module take the native path: Put is one script that sets the
// server-side TTL, TakeOnce one atomic script, no lock taken; the key expires in Redis.
func TestRecordsUseTheNativePath(t *testing.T) {
	srv := testenv.Redis(t)
	st := newStorage(t, srv)
	var log commandLog
	st.conn.client.AddHook(&log)
	r := storage.New(st, nil)
	ctx := context.Background()
	key := storage.Key("codes", storage.Hash("code-1"))

	// Warm up: the connection's handshake, the server check of first use, the scripts'
	// first EVAL (then cached by the server and sent as EVALSHA).
	warm := storage.Key("codes", storage.Hash("warm-up"))
	var v string
	if err := r.Put(ctx, warm, "v", time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := r.TakeOnce(ctx, warm, &v); err != nil {
		t.Fatal(err)
	}
	<-st.conn.checked
	log.take()

	if err := r.Put(ctx, key, "v", 90*time.Second); err != nil {
		t.Fatal(err)
	}
	if sent := log.take(); len(sent) != 1 || sent[0] != "evalsha" {
		t.Errorf("Put sent %q, want one evalsha (the store script)", sent)
	}
	ttl, err := st.conn.client.PTTL(ctx, st.valueKey(key)).Result()
	if err != nil || ttl <= 80*time.Second || ttl > 90*time.Second {
		t.Errorf("the record's server-side TTL = %s, %v; want about 90s", ttl, err)
	}
	log.take()

	if err := r.TakeOnce(ctx, key, &v); err != nil || v != "v" {
		t.Fatalf("TakeOnce = %q, %v", v, err)
	}
	if sent := log.take(); len(sent) != 1 || sent[0] != "evalsha" {
		t.Errorf("TakeOnce sent %q, want one round trip (the take script), no lock", sent)
	}
	if err := r.TakeOnce(ctx, key, &v); err != storage.ErrNotFound {
		t.Errorf("second TakeOnce = %v, want ErrNotFound", err)
	}

	// A plain Store over a record clears its TTL: certmagic's files never expire.
	if err := r.Put(ctx, key, "v", time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := st.Store(ctx, key, []byte("certificate")); err != nil {
		t.Fatal(err)
	}
	if ttl, _ := st.conn.client.PTTL(ctx, st.valueKey(key)).Result(); ttl != -1 {
		t.Errorf("TTL after Store = %s, want none", ttl)
	}
}

// On Redis the janitor leaves expiry to the server: it sends nothing (no lock, no scan,
// no read of every record), and a record still disappears once its TTL has passed.
func TestJanitorLeavesExpiryToRedis(t *testing.T) {
	srv := testenv.Redis(t)
	st := newStorage(t, srv)
	r := storage.New(st, nil)
	ctx := context.Background()
	key := storage.Key("codes", storage.Hash("short-lived"))
	if err := r.Put(ctx, key, "v", 200*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	<-st.conn.checked
	var log commandLog
	st.conn.client.AddHook(&log)

	j := r.StartJanitor(ctx, 10*time.Millisecond)
	time.Sleep(400 * time.Millisecond) // rounds of a sweeping janitor would have run
	j.Stop()
	if sent := log.take(); len(sent) != 0 {
		t.Errorf("the janitor sent %q to Redis, want nothing", sent)
	}
	if n, err := st.conn.client.Exists(ctx, st.valueKey(key)).Result(); err != nil || n != 0 {
		t.Errorf("the record is still in Redis after its TTL (%d, %v)", n, err)
	}
}

// TakeOnceLeaving is one script (the move), no lock, and the trace keeps the record's
// server-side TTL: the janitor sweeps nothing on Redis, so a trace without one would stay
// for good (one key per redeemed code).
func TestTakeOnceLeavingKeepsTheServerSideTTL(t *testing.T) {
	srv := testenv.Redis(t)
	st := newStorage(t, srv)
	var log commandLog
	st.conn.client.AddHook(&log)
	r := storage.New(st, nil)
	ctx := context.Background()
	key, trace := storage.Key("codes", storage.Hash("code-1")), storage.Key("used_codes", storage.Hash("code-1"))
	var v string
	// Warm up: the handshake, the first-use check, the scripts' first EVAL.
	if err := r.Put(ctx, key, "v", 90*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := r.TakeOnceLeaving(ctx, storage.Key("codes", storage.Hash("warm")), storage.Key("used_codes", storage.Hash("warm")), &v); err != storage.ErrNotFound {
		t.Fatalf("TakeOnceLeaving of a missing record = %v, want ErrNotFound", err)
	}
	<-st.conn.checked
	log.take()

	if err := r.TakeOnceLeaving(ctx, key, trace, &v); err != nil || v != "v" {
		t.Fatalf("TakeOnceLeaving = %q, %v", v, err)
	}
	if sent := log.take(); len(sent) != 1 || sent[0] != "evalsha" {
		t.Errorf("TakeOnceLeaving sent %q, want one round trip (the move script), no lock", sent)
	}
	if n, err := st.conn.client.Exists(ctx, st.valueKey(key)).Result(); err != nil || n != 0 {
		t.Errorf("the taken key exists (%d, %v)", n, err)
	}
	ttl, err := st.conn.client.PTTL(ctx, st.valueKey(trace)).Result()
	if err != nil || ttl <= 80*time.Second || ttl > 90*time.Second {
		t.Errorf("the trace's server-side TTL = %s, %v; want the record's, about 90s", ttl, err)
	}
	if err := r.TakeOnceLeaving(ctx, key, trace, &v); err != storage.ErrNotFound {
		t.Errorf("second TakeOnceLeaving = %v, want ErrNotFound", err)
	}
	if err := r.Get(ctx, trace, &v); err != nil || v != "v" {
		t.Errorf("Get of the trace = %q, %v", v, err)
	}
}
