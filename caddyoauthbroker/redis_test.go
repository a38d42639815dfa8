package caddyoauthbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/redisstorage"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// TestTimedRedisStorageKeepsTheNativePath: timing the records' storage (timeStorage) keeps
// a Redis storage's native TTL and atomic take, without which every TakeOnce would take a
// storage lock, and its TryLock; the take is timed as `take`.
func TestTimedRedisStorageKeepsTheNativePath(t *testing.T) {
	srv := testenv.Redis(t)
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	m, err := ctx.LoadModuleByID("caddy.storage.mcp_oauth_redis", json.RawMessage(`{"addresses": ["`+srv.Addr+`"]}`))
	if err != nil {
		t.Fatal(err)
	}
	redis := m.(*redisstorage.Storage)

	reg := prometheus.NewPedanticRegistry()
	metrics, err := newSiteMetrics(reg, "https://mcp.example.com/mcp")
	if err != nil {
		t.Fatal(err)
	}
	st := timeStorage(redis, metrics.storage)
	native, ok := st.(storage.Native)
	if !ok {
		t.Fatal("the timed Redis storage lost storage.Native")
	}
	if _, ok := st.(certmagic.TryLocker); !ok {
		t.Fatal("the timed Redis storage lost TryLock")
	}
	if err := native.StoreTTL(t.Context(), "k", []byte("v"), time.Minute); err != nil {
		t.Fatal(err)
	}
	if v, err := native.LoadAndDelete(t.Context(), "k"); err != nil || string(v) != "v" {
		t.Fatalf("LoadAndDelete = %q, %v", v, err)
	}
	if _, err := native.LoadAndDelete(t.Context(), "k"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("second LoadAndDelete = %v, want fs.ErrNotExist", err)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]uint64{}
	for _, f := range families {
		if f.GetName() != "caddy_mcp_oauth_storage_operation_duration_seconds" {
			continue
		}
		for _, s := range f.GetMetric() {
			l := map[string]string{}
			for _, p := range s.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			if n := s.GetHistogram().GetSampleCount(); n > 0 {
				got[l["operation"]+" "+l["result"]] = n
			}
		}
	}
	want := map[string]uint64{"store ok": 1, "take ok": 1, "take not_found": 1}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("storage observations %v, want %v", got, want)
	}
}
