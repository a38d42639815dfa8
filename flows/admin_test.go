package flows

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// The admin API's sessions: listed without a token, ended one by one or all at once as a
// revocation ends them (their broker tokens refused at once, the IdP grant revoked).
func TestAdminSessions(t *testing.T) {
	o := testenv.StartOP(t) // counts its revocations
	e := newTokenEnv(t, o, nil)
	subject := o.User.Subject
	first, second := e.login(t), e.login(t)
	for _, tok := range []TokenResponse{first, second} {
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK { // warm the cache
			t.Fatalf("access token: %d", st)
		}
	}
	firstSession := e.storedRefreshToken(t, first.RefreshToken).SessionID

	user, err := e.b.Sessions(t.Context(), subject)
	if err != nil || len(user.Sessions) != 2 || user.Truncated || user.OfflineAccess.Granted {
		t.Fatalf("Sessions: %+v, %v; want 2 sessions, no offline access", user, err)
	}
	for _, s := range user.Sessions {
		if s.ClientID != testenv.NativeClientID || len(s.Scopes) == 0 || s.CreatedAt.IsZero() || !s.ExpiresAt.After(s.CreatedAt) {
			t.Errorf("session %+v: want client, scopes, created and expiry", s)
		}
	}
	raw, _ := json.Marshal(user)
	for _, secret := range []string{first.AccessToken, first.RefreshToken, second.AccessToken, firstSession, "_sealed", "mcpat_", "mcprt_"} {
		if strings.Contains(string(raw), secret) {
			t.Errorf("the listing holds %q: %s", secret, raw)
		}
	}
	if other, err := e.b.Sessions(t.Context(), "somebody-else"); err != nil || len(other.Sessions) != 0 {
		t.Errorf("another subject's sessions: %+v, %v; want none", other, err)
	}

	revokes := o.Count(testenv.CountRevoke)
	if n, truncated, err := e.b.EndSessions(t.Context(), subject, Fingerprint(firstSession)); n != 1 || truncated || err != nil {
		t.Fatalf("EndSessions(one): %d, %v", n, err)
	}
	if st := e.mcpStatus(t, first.AccessToken); st != http.StatusUnauthorized {
		t.Errorf("the ended session's access token: %d, want 401", st)
	}
	e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	if st := e.mcpStatus(t, second.AccessToken); st != http.StatusOK {
		t.Errorf("the other session's access token: %d, want 200", st)
	}
	if n := o.Count(testenv.CountRevoke) - revokes; n != 1 {
		t.Errorf("the IdP's revocation endpoint was called %d times, want 1", n)
	}
	if n, truncated, err := e.b.EndSessions(t.Context(), subject, Fingerprint(firstSession)); n != 0 || truncated || err != nil {
		t.Errorf("ending it again: %d, %v; want 0", n, err)
	}

	if n, truncated, err := e.b.EndSessions(t.Context(), subject, ""); n != 1 || truncated || err != nil {
		t.Fatalf("EndSessions(all): %d, %v", n, err)
	}
	if st := e.mcpStatus(t, second.AccessToken); st != http.StatusUnauthorized {
		t.Errorf("the second session's access token after ending all: %d, want 401", st)
	}
	if user, err := e.b.Sessions(t.Context(), subject); err != nil || len(user.Sessions) != 0 {
		t.Errorf("Sessions after ending all: %+v, %v; want none", user, err)
	}
}

// The admin API's offline access: shown with the user's sessions, revoked here and at the
// IdP, after which the background client is refused.
func TestAdminOfflineAccess(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	f.grantOfflineAccess(t, f.userToken(t, o.User))
	user, err := f.b.Sessions(t.Context(), o.User.Subject)
	if err != nil || !user.OfflineAccess.Granted || user.OfflineAccess.GrantedAt == nil ||
		len(user.OfflineAccess.BackgroundClients) != 1 || user.OfflineAccess.BackgroundClients[0] != testWorkerID {
		t.Fatalf("Sessions: %+v, %v; want the offline access grant for the worker", user.OfflineAccess, err)
	}
	if resp, e := f.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Fatalf("background token before revocation: %s %+v", resp.Status, e)
	}
	_, refreshToken, _ := f.grant(t, o.User.Subject)
	st, err := f.b.RevokeOfflineAccess(t.Context(), o.User.Subject)
	if err != nil || st.Granted || st.RevokedAtIdP == nil || !*st.RevokedAtIdP {
		t.Fatalf("RevokeOfflineAccess: %+v, %v; want revoked at the IdP", st, err)
	}
	if resp, _ := f.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode == http.StatusOK {
		t.Error("a background token after revocation")
	}
	if _, err := refreshAsBroker(t, o, refreshToken); err == nil {
		t.Error("the IdP still honours the revoked grant's refresh token")
	}
	if st, err := f.b.OfflineAccess(t.Context(), o.User.Subject); err != nil || st.Granted {
		t.Errorf("OfflineAccess after revocation: %+v, %v", st, err)
	}
	f.assertNotLogged(t, refreshToken)
}

// The admin API's registered clients: listed without their secret's hash, deleted.
func TestAdminRegisteredClients(t *testing.T) {
	b := newTestBroker(t, testenv.SharedOP(t), nil)
	ctx := t.Context()
	rec := &RegisteredClient{
		ClientID: "dyn-" + randomToken()[:8], ClientSecretHash: storage.Hash("s3cret"), ClientName: "Editor",
		RedirectURIs: []string{"http://127.0.0.1/cb"}, IssuedAt: time.Now().UTC(),
	}
	if err := b.registrations.register(ctx, rec); err != nil {
		t.Fatal(err)
	}
	clients, truncated, err := b.RegisteredClients(ctx)
	if err != nil || truncated || len(clients) != 1 {
		t.Fatalf("RegisteredClients: %+v, %v, %v", clients, truncated, err)
	}
	c := clients[0]
	if c.ClientID != rec.ClientID || c.ClientName != "Editor" || len(c.RedirectURIs) != 1 || !c.ExpiresAt.After(c.RegisteredAt) {
		t.Errorf("listed %+v", c)
	}
	if raw, _ := json.Marshal(clients); bytes.Contains(raw, []byte(rec.ClientSecretHash)) {
		t.Errorf("the listing holds the secret's hash: %s", raw)
	}
	if ok, err := b.DeleteClient(ctx, rec.ClientID); !ok || err != nil {
		t.Fatalf("DeleteClient: %v, %v", ok, err)
	}
	if _, err := b.registrations.load(ctx, rec.ClientID); err == nil {
		t.Error("the registration is still there")
	}
	if ok, err := b.DeleteClient(ctx, rec.ClientID); ok || err != nil {
		t.Errorf("deleting it again: %v, %v; want false", ok, err)
	}
}

// The key ring's usage: after a rotation, the old key still seals what was sealed
// before it and the new one what was sealed after.
func TestAdminKeyUsage(t *testing.T) {
	o := testenv.SharedOP(t)
	store := &certmagic.FileStorage{Path: t.TempDir()}
	oldKey, newKey := bytes.Repeat([]byte{7}, 32), bytes.Repeat([]byte{8}, 32)
	oldRing, _ := storage.NewKeyRing(oldKey)
	rotated, _ := storage.NewKeyRing(newKey, oldKey)
	before := newTestBroker(t, o, func(c *Config) { c.Records = storage.New(store, oldRing) })
	after := newTestBroker(t, o, func(c *Config) { c.Records = storage.New(store, rotated) })
	for _, b := range []*Broker{before, before, after} {
		if _, err := b.sessions.create(t.Context(), o.User.Subject, testenv.NativeClientID, []string{"openid"}, IdPGrant{}); err != nil {
			t.Fatal(err)
		}
	}
	usage, err := after.KeyUsage(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ids := rotated.KeyIDs()
	want := []KeyUse{{ID: ids[0], Sealing: true, Sealed: 1}, {ID: ids[1], Sealed: 2}}
	if len(usage.Keys) != 2 || usage.Keys[0] != want[0] || usage.Keys[1] != want[1] || usage.Unknown != 0 || usage.Truncated {
		t.Errorf("KeyUsage after a rotation: %+v, want %+v", usage, want)
	}
	// Once the old key is dropped, what it sealed is sealed by an unknown key.
	if usage, err := before.KeyUsage(t.Context()); err != nil || usage.Unknown != 1 || usage.Keys[0].Sealed != 2 {
		t.Errorf("KeyUsage with the old ring: %+v, %v; want 2 by its key and 1 unknown", usage, err)
	}
}

// Ending all of a user's sessions says when its scan stopped at the limit: the sessions it
// did not reach live on, and the admin must not read the answer as "all ended".
func TestAdminEndSessionsReportsATruncatedScan(t *testing.T) {
	o := testenv.StartOP(t)
	e := newTokenEnv(t, o, nil)
	for range 3 {
		e.login(t)
	}
	e.b.adminScanLimit = 2
	first, truncated, err := e.b.EndSessions(t.Context(), o.User.Subject, "")
	if err != nil || !truncated || first > 2 {
		t.Fatalf("EndSessions over 3 sessions with a scan limit of 2: ended %d, truncated %v, %v; want at most 2 and truncated", first, truncated, err)
	}
	e.b.adminScanLimit = AdminScanLimit
	if n, truncated, err := e.b.EndSessions(t.Context(), o.User.Subject, ""); err != nil || truncated || first+n != 3 {
		t.Errorf("ending the rest: ended %d after %d, truncated %v, %v; want all 3 ended", n, first, truncated, err)
	}
}
