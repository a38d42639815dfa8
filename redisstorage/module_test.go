package redisstorage

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// provision loads the module from its JSON as Caddy does (Provision, then Validate) in a
// context of its own, cancelled (running Cleanup) at the test's end.
func provision(t *testing.T, config string) (*Storage, error) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	m, err := ctx.LoadModuleByID("caddy.storage.mcp_oauth_redis", json.RawMessage(config))
	if err != nil {
		return nil, err
	}
	return m.(*Storage), nil
}

// Provision, which also runs for `caddy validate`, opens no connection: the client dials
// on first use.
func TestProvisionNeedsNoNetwork(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	if _, err := provision(t, `{"addresses": ["`+ln.Addr().String()+`"]}`); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if n := accepted.Load(); n != 0 {
		t.Errorf("Provision connected %d times, want none", n)
	}
}

// The defaults are the ones the fields' doc comments state.
func TestProvisionDefaults(t *testing.T) {
	s, err := provision(t, `{}`)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Addresses) != 1 || s.Addresses[0] != "127.0.0.1:6379" || s.KeyPrefix != "caddy" || s.DB != 0 ||
		time.Duration(s.DialTimeout) != 5*time.Second || time.Duration(s.ReadTimeout) != 3*time.Second ||
		time.Duration(s.WriteTimeout) != 3*time.Second || s.TLS || s.SentinelMaster != "" {
		t.Errorf("defaults = %+v", s)
	}
}

// A password from an {env.*} or {file.*} placeholder authenticates to a server that
// requires it; Caddy's context gives the module as its storage.
func TestProvisionResolvesPasswordPlaceholders(t *testing.T) {
	srv := testenv.Redis(t, "--requirepass", "s3cret-pw")
	t.Setenv("MCP_OAUTH_TEST_REDIS_PASSWORD", "s3cret-pw")
	file := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(file, []byte("s3cret-pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, placeholder := range []string{"{env.MCP_OAUTH_TEST_REDIS_PASSWORD}", "{file." + file + "}"} {
		s, err := provision(t, `{"addresses": ["`+srv.Addr+`"], "password": "`+placeholder+`"}`)
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		if err := s.Store(ctx, "k", []byte("v")); err != nil {
			t.Errorf("Store with the password from %s = %v", placeholder, err)
		}
	}
	s, err := provision(t, `{"addresses": ["`+srv.Addr+`"], "password": "not-the-pw-7f3a"}`)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Store(context.Background(), "k", []byte("v"))
	if err == nil {
		t.Fatal("Store with a wrong password succeeded")
	}
	if strings.Contains(err.Error(), "not-the-pw-7f3a") {
		t.Errorf("the error %q shows the password", err)
	}
}

// Two loaded configurations with the same storage (a config reload) share one client: the
// old one's Cleanup leaves the new one working, and the last Cleanup closes it.
func TestReloadKeepsTheClient(t *testing.T) {
	srv := testenv.Redis(t)
	config := `{"addresses": ["` + srv.Addr + `"]}`
	ctx := context.Background()
	oldCtx, cancelOld := caddy.NewContext(caddy.Context{Context: ctx})
	old, err := oldCtx.LoadModuleByID("caddy.storage.mcp_oauth_redis", json.RawMessage(config))
	if err != nil {
		t.Fatal(err)
	}
	newer, err := provision(t, config)
	if err != nil {
		t.Fatal(err)
	}
	if old.(*Storage).conn != newer.conn {
		t.Error("a reload with the same storage built a second client")
	}
	cancelOld() // the old configuration's Cleanup
	if err := newer.Store(ctx, "k", []byte("v")); err != nil {
		t.Errorf("Store after the old configuration's Cleanup = %v", err)
	}
}

func TestValidate(t *testing.T) {
	for _, c := range []struct {
		name, config, want string
	}{
		{"several addresses are a cluster", `{"addresses": ["a:6379", "b:6379"]}`, "Redis Cluster, which this module does not support"},
		{"an address without a port", `{"addresses": ["redis.internal"]}`, `addresses[0]: want host:port, got "redis.internal"`},
		{"a negative db", `{"db": -1}`, "db: want 0 or more, got -1"},
		{"a prefix ending in a slash", `{"key_prefix": "caddy/"}`, `key_prefix: "caddy/" ends with "/"`},
		{"a negative timeout", `{"read_timeout": -1}`, "read_timeout"},
		{"tls settings without tls", `{"tls_server_name": "redis"}`, "need tls"},
		{"sentinel auth without sentinel_master", `{"sentinel_password": "x"}`, "need sentinel_master"},
		{"an unreadable CA file", `{"tls": true, "tls_ca_file": "/nonexistent/ca.pem"}`, "tls_ca_file:"},
		{"a password placeholder that is empty", `{"password": "{env.MCP_OAUTH_TEST_UNSET_VARIABLE}"}`,
			"password: {env.MCP_OAUTH_TEST_UNSET_VARIABLE} is empty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := provision(t, c.config)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error = %v, want one containing %q", err, c.want)
			}
		})
	}
	for _, ok := range []string{
		`{"addresses": ["sentinel-1:26379", "sentinel-2:26379"], "sentinel_master": "mymaster"}`,
		`{"addresses": ["[::1]:6379"], "tls": true, "tls_server_name": "redis.internal"}`,
	} {
		if _, err := provision(t, ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

// Caddy and certmagic log their storage with zap.Any (when cleaning storage, when a lock
// cannot be released) and print it with %s: neither shows a password (SECURITY.md S2.24).
func TestLogsShowNoSecret(t *testing.T) {
	s, err := provision(t, `{"addresses": ["sentinel:26379"], "sentinel_master": "m", "username": "u",
		"password": "redis-pw-4b1d", "sentinel_username": "su", "sentinel_password": "sentinel-pw-9c2e"}`)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	zap.New(core).Info("cleaning storage unit", zap.Any("storage", s))
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	buf, err := enc.EncodeEntry(zapcore.Entry{Message: "m"}, logs.All()[0].Context)
	if err != nil {
		t.Fatal(err)
	}
	for _, out := range []string{buf.String(), fmt.Sprintf("%v %+v", s, s)} {
		if strings.Contains(out, "pw-") {
			t.Errorf("a secret is in %s", out)
		}
		if !strings.Contains(out, "sentinel:26379") {
			t.Errorf("the storage's address is not in %s", out)
		}
	}
}

// With sentinel_master, the module asks the Sentinels at addresses for the master and
// stores there.
func TestSentinel(t *testing.T) {
	master := testenv.Redis(t)
	sentinel := testenv.RedisSentinel(t, master, "mymaster")
	s, err := provision(t, `{"addresses": ["`+sentinel.Addr+`"], "sentinel_master": "mymaster", "key_prefix": "s"}`)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := s.Store(ctx, "k", []byte("v")); err != nil {
		t.Fatalf("Store through the Sentinel = %v", err)
	}
	if v, err := s.Load(ctx, "k"); err != nil || string(v) != "v" {
		t.Fatalf("Load through the Sentinel = %q, %v", v, err)
	}
	if reply, err := master.Do("EXISTS s/k"); err != nil || reply != ":1" {
		t.Errorf("EXISTS s/k on the master = %q, %v; want the value stored there", reply, err)
	}
}
