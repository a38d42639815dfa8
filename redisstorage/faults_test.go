package redisstorage

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// shortTimeouts makes a Redis that is gone or hung fail an operation within a second or two.
func shortTimeouts(s *Storage) {
	s.DialTimeout = caddy.Duration(500 * time.Millisecond)
	s.ReadTimeout = caddy.Duration(500 * time.Millisecond)
	s.WriteTimeout = caddy.Duration(500 * time.Millisecond)
}

// operations are the storage's operations that need the server, each returning its error.
func operations(st *Storage) map[string]func(ctx context.Context) error {
	return map[string]func(ctx context.Context) error{
		"Store":         func(ctx context.Context) error { return st.Store(ctx, "k", []byte("v")) },
		"StoreTTL":      func(ctx context.Context) error { return st.StoreTTL(ctx, "k", []byte("v"), time.Minute) },
		"Load":          func(ctx context.Context) error { _, err := st.Load(ctx, "k"); return err },
		"LoadAndDelete": func(ctx context.Context) error { _, err := st.LoadAndDelete(ctx, "k"); return err },
		"Delete":        func(ctx context.Context) error { return st.Delete(ctx, "k") },
		"Stat":          func(ctx context.Context) error { _, err := st.Stat(ctx, "k"); return err },
		"List":          func(ctx context.Context) error { _, err := st.List(ctx, "", true); return err },
		"Lock":          func(ctx context.Context) error { return st.Lock(ctx, "l") },
	}
}

// With Redis stopped (killed) or hung (SIGSTOP), every operation fails within its
// timeouts instead of hanging, and with Redis back the same client works again.
func TestRedisDownFailsFastAndRecovers(t *testing.T) {
	srv := testenv.Redis(t)
	st := newStorage(t, srv, shortTimeouts)
	ctx := context.Background()
	if err := st.Store(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}

	for _, fault := range []struct {
		name        string
		start, stop func()
	}{
		{"stopped", srv.Stop, srv.Start},
		{"hung", srv.Pause, srv.Resume},
	} {
		t.Run(fault.name, func(t *testing.T) {
			fault.start()
			for name, op := range operations(st) {
				// The ctx would let a hang last; the client's timeouts must end it.
				ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				start := time.Now()
				err := op(ctx)
				cancel()
				took := time.Since(start)
				t.Logf("%s with Redis %s: %v after %s", name, fault.name, err, took)
				if err == nil {
					t.Errorf("%s with Redis %s succeeded", name, fault.name)
				}
				// One attempt's timeouts (dial + write + read: 1.5 s), and scheduling slack.
				if took > 2*time.Second {
					t.Errorf("%s with Redis %s took %s to fail, want within dial + write + read timeouts (1.5 s)", name, fault.name, took)
				}
			}
			if st.Exists(ctx, "k") {
				t.Errorf("Exists with Redis %s = true", fault.name)
			}
			fault.stop()
			deadline := time.Now().Add(5 * time.Second)
			for {
				err := st.Store(ctx, "k", []byte("back"))
				if err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("Store with Redis back = %v, want the same client to recover", err)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if v, err := st.Load(ctx, "k"); err != nil || string(v) != "back" {
				t.Errorf("Load with Redis back = %q, %v", v, err)
			}
			if err := st.Lock(ctx, "l"); err != nil {
				t.Errorf("Lock with Redis back = %v", err)
			} else if err := st.Unlock(ctx, "l"); err != nil {
				t.Errorf("Unlock with Redis back = %v", err)
			}
		})
	}
}

// The first use checks the server: a policy that evicts, or no persistence, is warned about
// saying why; a server that neither evicts nor forgets is not.
func TestWarnsWhenRedisMayLoseKeys(t *testing.T) {
	for _, c := range []struct {
		name string
		args []string
		want []string // the warnings' messages, by their start
	}{
		{"evicting and not persisting", []string{"--maxmemory-policy", "allkeys-lru"},
			[]string{"the Redis server evicts keys", "the Redis server does not persist"}},
		{"noeviction with AOF", []string{"--maxmemory-policy", "noeviction", "--appendonly", "yes"}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv := testenv.Redis(t, c.args...)
			st := newStorage(t, srv)
			core, logs := observer.New(zapcore.WarnLevel)
			st.conn.logger = zap.New(core)
			if _, err := st.Load(context.Background(), "k"); err == nil {
				t.Fatal("Load of a missing key succeeded")
			}
			<-st.conn.checked
			var got []string
			for _, e := range logs.All() {
				got = append(got, e.Message)
			}
			if len(got) != len(c.want) {
				t.Fatalf("warnings %q, want %d starting %q", got, len(c.want), c.want)
			}
			for i, w := range c.want {
				if !strings.HasPrefix(got[i], w) {
					t.Errorf("warning %q, want one starting %q", got[i], w)
				}
				if !strings.Contains(got[i], "certificates") || !strings.Contains(got[i], "sessions") {
					t.Errorf("warning %q does not say why (certificates and sessions)", got[i])
				}
			}
			if len(c.want) > 0 {
				if p := logs.All()[0].ContextMap()["maxmemory_policy"]; p != "allkeys-lru" {
					t.Errorf("the eviction warning names policy %v, want allkeys-lru", p)
				}
			}
		})
	}
}
