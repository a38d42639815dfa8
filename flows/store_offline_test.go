package flows

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Offline grants (store_offline.go) belong to one site, their storage keys tell a
// storage reader nothing, and their sealed refresh token opens only where it was written
// (SECURITY.md, offline access).

func TestOfflineAccessGrantBelongsToItsSite(t *testing.T) {
	o := testenv.StartOP(t)
	a := startOfflineAccess(t, o, nil)
	// Another mcp_oauth site on the same storage, with a worker of the same name.
	b := startOfflineAccess(t, o, func(c *Config) { c.Records = a.b.cfg.Records })
	a.grantOfflineAccess(t, a.userToken(t, o.User))

	if resp, e := b.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusBadRequest || e.Error != "invalid_grant" {
		t.Errorf("the other site's worker: %s %+v, want 400 invalid_grant (no offline access there)", resp.Status, e)
	}
	if resp, e := a.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Errorf("the site's own worker: %s %+v", resp.Status, e)
	}
}

func TestOfflineAccessGrantKeyHidesTheSubject(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	f.grantOfflineAccess(t, f.userToken(t, o.User))
	keys, err := f.b.cfg.Records.List(t.Context(), storage.Key())
	if err != nil {
		t.Fatal(err)
	}
	plain := storage.Hash(o.User.Subject)
	found := false
	for _, k := range keys {
		if strings.Contains(k, plain) {
			t.Errorf("record key %s holds the plain hash of the subject: anyone can test who provisioned", k)
		}
		found = found || strings.Contains(k, "offline")
	}
	if !found {
		t.Errorf("no offline access grant among %q", keys)
	}
}

// TestSealedValuesAreBoundToWhereTheyAreRead: a record copied whole to another key does
// not open there, so someone who can write storage cannot hand one user's IdP grant to
// another user's session or subject.
func TestSealedValuesAreBoundToWhereTheyAreRead(t *testing.T) {
	t.Run("session", func(t *testing.T) {
		e := newTokenEnv(t, testenv.SharedOP(t), nil)
		victim, attacker := e.session(t, testenv.NativeClientID), e.session(t, testenv.NativeClientID)
		copyRecord(t, e.b, sessionKey(victim.ID), sessionKey(attacker.ID))
		s, err := e.b.sessions.load(t.Context(), attacker.ID)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.b.sessions.grant(s); err == nil {
			t.Error("the victim's IdP grant opened under the attacker's session key")
		}
	})
	t.Run("offline access grant", func(t *testing.T) {
		o := testenv.StartOP(t)
		f := startOfflineAccess(t, o, nil)
		f.grantOfflineAccess(t, f.userToken(t, o.User))
		if resp, page := f.callback(t, f.loginAt(t, f.link(t, f.userToken(t, o.OtherUser)), testenv.LoginAs(o.OtherUser))); resp.StatusCode != http.StatusOK {
			t.Fatalf("granting offline access as other-user: %s %s", resp.Status, page)
		}
		copyRecord(t, f.b, testOfflineAccessGrantKey(t, f.b, o.User.Subject), testOfflineAccessGrantKey(t, f.b, o.OtherUser.Subject))
		g, err := f.b.loadOfflineAccessGrant(t.Context(), o.OtherUser.Subject)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.b.offline.refreshToken(g); err == nil {
			t.Error("test-user's offline access grant opened as other-user's")
		}
	})
}

// copyRecord overwrites the record at to with the one at from, as someone with write
// access to the storage could.
func copyRecord(t *testing.T, b *Broker, from, to string) {
	t.Helper()
	var record json.RawMessage
	if err := b.cfg.Records.Get(t.Context(), from, &record); err != nil {
		t.Fatal(err)
	}
	if err := b.cfg.Records.Put(t.Context(), to, record, time.Hour); err != nil {
		t.Fatal(err)
	}
}

// testOfflineAccessGrantKey is where b keeps subject's offline access grant.
func testOfflineAccessGrantKey(t *testing.T, b *Broker, subject string) string {
	t.Helper()
	key, err := b.offlineAccessGrantKey(subject)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func TestOfflineAccessGrantSurvivesKeyRotation(t *testing.T) {
	o := testenv.StartOP(t)
	dir := t.TempDir()
	oldKey, newKey := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	records := func(keys ...[]byte) *storage.Records {
		ring, err := storage.NewKeyRing(keys...)
		if err != nil {
			t.Fatal(err)
		}
		return storage.New(&certmagic.FileStorage{Path: dir}, ring)
	}
	before := startOfflineAccess(t, o, func(c *Config) { c.Records = records(oldKey) })
	before.grantOfflineAccess(t, before.userToken(t, o.User))
	oldAt := testOfflineAccessGrantKey(t, before.b, o.User.Subject)

	after := startOfflineAccess(t, o, func(c *Config) {
		c.Resource = before.resource
		c.Records = records(newKey, oldKey)
	})
	if resp, e := after.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Fatalf("after the rotation: %s %+v", resp.Status, e)
	}
	newAt := testOfflineAccessGrantKey(t, after.b, o.User.Subject)
	if newAt == oldAt {
		t.Fatal("the key of the grant does not change with the encryption key")
	}
	var g OfflineAccessGrant
	if err := after.b.cfg.Records.Get(t.Context(), oldAt, &g); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("the grant is still under the retired key: %v", err)
	}
	if err := after.b.cfg.Records.Get(t.Context(), newAt, &g); err != nil {
		t.Errorf("the grant is not under the current key: %v", err)
	}
	// The old key can now go: the grant lives on without it.
	last := startOfflineAccess(t, o, func(c *Config) {
		c.Resource = before.resource
		c.Records = records(newKey)
	})
	if resp, e := last.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Errorf("with the old key dropped: %s %+v", resp.Status, e)
	}
}
