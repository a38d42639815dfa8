package caddyoauthbroker

import (
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/flows"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// The gauges of live sessions and offline access grants: two sites on one storage, each
// counting its own records and those of earlier releases (a session without a site), and
// the count's time beside them, zero until the first count.
func TestRecordGauges(t *testing.T) {
	ctx, _ := provisionContext(t)
	const resourceA, resourceB = "https://a.example.com/mcp", "https://b.example.com/tools/mcp"
	labelA, labelB := metricsSite(resourceA), metricsSite(resourceB)
	handlers := map[string]*Handler{}
	for _, resource := range []string{resourceA, resourceB} {
		cfg := progressiveConfig()
		cfg["resource"] = resource
		h, err := load(t, ctx, cfg)
		if err != nil {
			t.Fatalf("provisioning %s: %v", resource, err)
		}
		handlers[resource] = h
	}
	reg := ctx.GetMetricsRegistry()
	if at := metricValue(t, reg, "caddy_mcp_oauth_records_counted_timestamp_seconds", map[string]string{"site": labelA}); at != 0 {
		t.Errorf("counted at %v before any count, want 0", at)
	}

	// Where flows keeps a site's records (Broker.site): the resource's origin and URL, hashed.
	site := func(resource, origin string) string { return storage.Hash(origin + "\n" + resource) }
	siteA, siteB := site(resourceA, "https://a.example.com"), site(resourceB, "https://b.example.com")
	records := handlers[resourceA].records
	put := func(key string, v any) {
		if err := records.Put(t.Context(), key, v, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	for id, s := range map[string]string{"a1": siteA, "a2": siteA, "b1": siteB, "old": ""} {
		put(storage.Key("sessions", id), flows.Session{ID: id, Subject: "alice", Site: s})
	}
	put(storage.Key("offline", siteA, "h1"), flows.OfflineAccessGrant{Subject: "alice"})
	put(storage.Key("offline", siteB, "h1"), flows.OfflineAccessGrant{Subject: "alice"})
	put(storage.Key("offline", siteB, "h2"), flows.OfflineAccessGrant{Subject: "bob"})

	before := time.Now()
	for _, h := range handlers {
		h.countRecords(t.Context())
	}
	for label, want := range map[string][2]float64{labelA: {3, 1}, labelB: {2, 2}} {
		if got := metricValue(t, reg, "caddy_mcp_oauth_sessions", map[string]string{"site": label}); got != want[0] {
			t.Errorf("site %s: %v sessions, want %v", label, got, want[0])
		}
		if got := metricValue(t, reg, "caddy_mcp_oauth_offline_access_grants", map[string]string{"site": label}); got != want[1] {
			t.Errorf("site %s: %v offline access grants, want %v", label, got, want[1])
		}
		if at := metricValue(t, reg, "caddy_mcp_oauth_records_counted_timestamp_seconds", map[string]string{"site": label}); at < float64(before.Unix()) {
			t.Errorf("site %s: counted at %v, want at least %v", label, at, before.Unix())
		}
	}
}
