package flows

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Offline grants belong to one site and to the background clients the user granted,
// and their storage keys tell a storage reader nothing (SECURITY.md, offline access).

// backgroundAs asks f's broker for a background token for subject as worker id.
func (f *flow2) backgroundAs(t *testing.T, id, secret, subject string) (*http.Response, oauthError) {
	t.Helper()
	resp := f.backgroundRequest(t, basicCredentials(id, secret), url.Values{"subject": {subject}})
	var e oauthError
	if resp.StatusCode != http.StatusOK {
		decodeJSON(t, resp, &e)
	} else {
		resp.Body.Close()
	}
	return resp, e
}

func TestOfflineGrantBelongsToItsSite(t *testing.T) {
	o := testenv.StartOP(t)
	a := startFlow2(t, o, nil)
	// Another mcp_oauth site on the same storage, with a worker of the same name.
	b := startFlow2(t, o, func(c *Config) { c.Records = a.b.cfg.Records })
	a.provision(t, a.userToken(t, o.User))

	if resp, e := b.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusBadRequest || e.Error != "invalid_grant" {
		t.Errorf("the other site's worker: %s %+v, want 400 invalid_grant (not provisioned there)", resp.Status, e)
	}
	if resp, e := a.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Errorf("the site's own worker: %s %+v", resp.Status, e)
	}
}

func TestOfflineGrantKeyHidesTheSubject(t *testing.T) {
	o := testenv.StartOP(t)
	f := startFlow2(t, o, nil)
	f.provision(t, f.userToken(t, o.User))
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
		t.Errorf("no offline grant among %q", keys)
	}
}

func TestBackgroundClientNeedsTheUsersGrant(t *testing.T) {
	o := testenv.StartOP(t)
	f := startFlow2(t, o, nil)
	f.provision(t, f.userToken(t, o.User))
	// The same site later gets a second worker: the user granted it nothing.
	later := startFlow2(t, o, func(c *Config) {
		c.Resource = f.resource
		c.Records = f.b.cfg.Records
		c.BackgroundClients = append(c.BackgroundClients, BackgroundClient{ID: "worker-2", Secret: "worker-2-secret"})
	})
	if resp, e := later.backgroundAs(t, "worker-2", "worker-2-secret", o.User.Subject); resp.StatusCode != http.StatusForbidden || e.Error != "access_denied" {
		t.Errorf("a worker the user did not grant: %s %+v, want 403 access_denied", resp.Status, e)
	}
	if resp, e := later.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Errorf("the worker the user granted: %s %+v", resp.Status, e)
	}
}

func TestBackgroundTokenRateLimit(t *testing.T) {
	o := testenv.StartOP(t)
	f := startFlow2(t, o, func(c *Config) {
		c.BackgroundTokenRate = 2
		c.BackgroundClients = append(c.BackgroundClients, BackgroundClient{ID: "worker-2", Secret: "worker-2-secret"})
	})
	for i := range 2 {
		if resp, e := f.backgroundAs(t, testWorkerID, testWorkerSecret, "nobody"); resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("request %d: %s %+v", i+1, resp.Status, e)
		}
	}
	resp, e := f.backgroundAs(t, testWorkerID, testWorkerSecret, "nobody")
	if resp.StatusCode != http.StatusTooManyRequests || e.Error != "temporarily_unavailable" || resp.Header.Get("Retry-After") == "" {
		t.Errorf("past the rate: %s %+v Retry-After %q, want 429 temporarily_unavailable with Retry-After", resp.Status, e, resp.Header.Get("Retry-After"))
	}
	// The bucket is the worker's: another worker is not slowed down.
	if resp, e := f.backgroundAs(t, "worker-2", "worker-2-secret", "nobody"); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("another worker: %s %+v", resp.Status, e)
	}
}

// TestSealedValuesAreBoundToWhereTheyAreRead: a record copied whole to another key does
// not open there, so someone who can write storage cannot hand one user's IdP grant to
// another user's session or subject.
func TestSealedValuesAreBoundToWhereTheyAreRead(t *testing.T) {
	t.Run("session", func(t *testing.T) {
		e := newTokenEnv(t, verifierOP(t), nil)
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
	t.Run("offline grant", func(t *testing.T) {
		o := testenv.StartOP(t)
		f := startFlow2(t, o, nil)
		f.provision(t, f.userToken(t, o.User))
		if resp, page := f.callback(t, f.loginAt(t, f.link(t, f.userToken(t, o.OtherUser)), testenv.LoginAs(o.OtherUser))); resp.StatusCode != http.StatusOK {
			t.Fatalf("provisioning other-user: %s %s", resp.Status, page)
		}
		copyRecord(t, f.b, testOfflineGrantKey(t, f.b, o.User.Subject), testOfflineGrantKey(t, f.b, o.OtherUser.Subject))
		g, err := f.b.loadOfflineGrant(t.Context(), o.OtherUser.Subject)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.b.offline.refreshToken(g); err == nil {
			t.Error("test-user's offline grant opened as other-user's")
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

// testOfflineGrantKey is where b keeps subject's offline grant.
func testOfflineGrantKey(t *testing.T, b *Broker, subject string) string {
	t.Helper()
	key, err := b.offlineGrantKey(subject)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func TestOfflineGrantSurvivesKeyRotation(t *testing.T) {
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
	before := startFlow2(t, o, func(c *Config) { c.Records = records(oldKey) })
	before.provision(t, before.userToken(t, o.User))
	oldAt := testOfflineGrantKey(t, before.b, o.User.Subject)

	after := startFlow2(t, o, func(c *Config) {
		c.Resource = before.resource
		c.Records = records(newKey, oldKey)
	})
	if resp, e := after.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Fatalf("after the rotation: %s %+v", resp.Status, e)
	}
	newAt := testOfflineGrantKey(t, after.b, o.User.Subject)
	if newAt == oldAt {
		t.Fatal("the key of the grant does not change with the encryption key")
	}
	var g OfflineGrant
	if err := after.b.cfg.Records.Get(t.Context(), oldAt, &g); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("the grant is still under the retired key: %v", err)
	}
	if err := after.b.cfg.Records.Get(t.Context(), newAt, &g); err != nil {
		t.Errorf("the grant is not under the current key: %v", err)
	}
	// The old key can now go: the grant lives on without it.
	last := startFlow2(t, o, func(c *Config) {
		c.Resource = before.resource
		c.Records = records(newKey)
	})
	if resp, e := last.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Errorf("with the old key dropped: %s %+v", resp.Status, e)
	}
}
