package flows

import (
	"testing"
	"time"
)

// The gauges' count: a site's live sessions and offline access grants, those of another
// site on the same storage left out, those of earlier releases (no site) counted for
// every site, and a scan that stops at its limit said to be a lower bound.
func TestCountRecords(t *testing.T) {
	base := testSessionStore(t)
	siteA, siteB := base, base
	siteA.site, siteB.site = "site-a", "site-b"
	grantsA := offlineAccessGrantStore{records: base.records, site: "site-a"}
	grantsB := offlineAccessGrantStore{records: base.records, site: "site-b"}
	ctx := t.Context()

	for _, st := range []sessionStore{siteA, siteA, siteB, base} { // base: an earlier release's, no site
		if _, err := st.create(ctx, "alice", "c", []string{"openid"}, IdPGrant{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, g := range []struct {
		st      offlineAccessGrantStore
		subject string
	}{{grantsA, "alice"}, {grantsA, "bob"}, {grantsB, "alice"}} {
		if err := g.st.put(ctx, &OfflineAccessGrant{Subject: g.subject}, "rt"); err != nil {
			t.Fatal(err)
		}
	}
	if err := base.records.Put(ctx, legacyOfflineAccessGrantKey("carol"), OfflineAccessGrant{Subject: "carol"}, time.Hour); err != nil {
		t.Fatal(err)
	}

	admin := adminStore{records: base.records, limit: AdminScanLimit}
	for site, want := range map[string]RecordCount{
		"site-a": {Sessions: 3, OfflineAccessGrants: 3},
		"site-b": {Sessions: 2, OfflineAccessGrants: 2},
		"site-c": {Sessions: 1, OfflineAccessGrants: 1},
	} {
		if got, err := admin.count(ctx, site); err != nil || got != want {
			t.Errorf("count(%s) = %+v, %v; want %+v", site, got, err, want)
		}
	}

	admin.limit = 2
	got, err := admin.count(ctx, "site-a")
	if err != nil || !got.Truncated || got.Sessions > 2 {
		t.Errorf("count at a limit of 2: %+v, %v; want a truncated count of at most 2 sessions", got, err)
	}
}
