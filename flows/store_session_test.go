package flows

import (
	"bytes"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/storage"
)

func testSessionStore(t *testing.T) sessionStore {
	t.Helper()
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, storage.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	return sessionStore{
		records: storage.New(&certmagic.FileStorage{Path: t.TempDir()}, ring),
		now:     time.Now, ttl: time.Hour, maxLifetime: 24 * time.Hour,
	}
}

// A session grant sealed by a release whose IdPGrant had its own token fields opens as
// the IdPGrant built on oauth2.Token, and one written now has the same JSON fields: read
// old, write new, and an older release can still read what this one writes.
func TestSessionGrantOldShapeOpens(t *testing.T) {
	st := testSessionStore(t)
	expiry := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	old := `{"access_token":"at","refresh_token":"rt","expiry":"2026-05-01T12:00:00Z","id_token":"idt",` +
		`"scopes":["openid","notes:read"],"access_token_scopes":["notes:read"]}`
	s := &Session{ID: "s1", Subject: "alice", ClientID: "c", CreatedAt: time.Now()}
	key := sessionKey(s.ID)
	sealed, err := st.records.Seal(key, []byte(old))
	if err != nil {
		t.Fatal(err)
	}
	s.Grant = sealed
	if err := st.records.Put(t.Context(), key, s, time.Hour); err != nil {
		t.Fatal(err)
	}

	loaded, err := st.load(t.Context(), s.ID)
	if err != nil {
		t.Fatal(err)
	}
	g, err := st.grant(loaded)
	if err != nil {
		t.Fatalf("an old-shape grant does not open: %v", err)
	}
	if g.AccessToken != "at" || g.RefreshToken != "rt" || !g.Expiry.Equal(expiry) || g.IDToken != "idt" ||
		!slices.Equal(g.Scopes, []string{"openid", "notes:read"}) || !slices.Equal(g.AccessTokenScopes, []string{"notes:read"}) {
		t.Errorf("old-shape grant read as %+v", g)
	}

	// Written back, the grant has the fields it had: the subject is the session's, not sealed twice.
	g.Subject = "alice"
	if err := st.rotateGrant(t.Context(), loaded, g); err != nil {
		t.Fatal(err)
	}
	plain, err := st.records.Open(loaded.key, loaded.Grant)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(plain, &fields); err != nil {
		t.Fatal(err)
	}
	var names []string
	for k := range fields {
		names = append(names, k)
	}
	slices.Sort(names)
	if want := []string{"access_token", "access_token_scopes", "expiry", "id_token", "refresh_token", "scopes"}; !slices.Equal(names, want) {
		t.Errorf("a grant is written with fields %v, want %v", names, want)
	}
}

// The session's record lives SessionTTL, never past its absolute lifetime.
func TestSessionLifetime(t *testing.T) {
	st := testSessionStore(t)
	created := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	s := &Session{CreatedAt: created}
	if got := st.lifetime(s, created); got != time.Hour {
		t.Errorf("fresh session lives %s, want the TTL", got)
	}
	if got := st.lifetime(s, created.Add(24*time.Hour-time.Minute)); got != time.Minute {
		t.Errorf("near its end a session lives %s, want what is left", got)
	}
	if got := st.lifetime(s, created.Add(48*time.Hour)); got != time.Second {
		t.Errorf("past its end a session record lives %s, want the minimum", got)
	}
}
