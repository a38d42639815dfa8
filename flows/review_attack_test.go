package flows

import (
	"bytes"
	"net/http"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Attacker review (h-review): findings held as failing tests.

// An ID-JAG is accepted until exp plus assertionLeeway (go-oidc looks from the leeway
// ago), so its jti marker must stand that long too. It is stored until exp alone: a replay
// in the leeway after exp is accepted and mints a second access token. The client
// assertion path adds clockLeeway to its marker (client_assertion.go); this one does not.
func TestReviewIDJAGReplayedWithinLeewayAfterExp(t *testing.T) {
	// Storage on the test clock, so that the marker's TTL is measured on the clock the
	// verifier reads.
	var clock *testenv.Clock
	e := newEMAEnv(t, func(c *Config) {
		ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
		if err != nil {
			t.Fatal(err)
		}
		c.Records = storage.New(&certmagic.FileStorage{Path: t.TempDir()}, ring,
			storage.WithClock(func() time.Time {
				if clock == nil {
					return time.Now()
				}
				return clock.Now()
			}))
	})
	clock = e.clock
	claims := e.ent.claims(e.clock.Now(), e.client) // exp now+5 min
	assertion := e.ent.mint(claims)
	e.redeem(t, assertion, nil).wantTokens(t)

	// 5 min 10 s later: past exp, within the 30 s leeway the verifier allows.
	e.clock.Advance(5*time.Minute + 10*time.Second)
	e.redeem(t, assertion, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
}

// Two enterprise issuers whose subject prefixes are equal, or one a prefix of the other,
// map different users to one broker subject: issuer A's "alice" and issuer B's "alice"
// under the same prefix, or A ("acme") user "-eu:bob" and B ("acme-eu:") user "bob". The
// subject is what the upstream's subject header, the app password (a Nextcloud account)
// and the admin API know the user by, so one enterprise's user acts as another's. New
// refuses an issuer without a prefix for this reason, but not prefixes that overlap.
func TestReviewEnterpriseSubjectPrefixesMustNotOverlap(t *testing.T) {
	o := testenv.SharedOP(t)
	records := newTestBroker(t, o, nil).cfg.Records
	for _, tc := range []struct {
		name string
		a, b string
	}{
		{"the same prefix", "ent:", "ent:"},
		{"one prefix a prefix of the other", "acme", "acme-eu:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(Config{
				Mode: ModeHybrid, Issuer: o.Issuer, Resource: testResource, DelegationMode: DelegationNone,
				EnterpriseIssuers: []EnterpriseIssuer{
					{Issuer: "https://idp.a.example", JWKSURI: "https://idp.a.example/jwks", SubjectPrefix: tc.a},
					{Issuer: "https://idp.b.example", JWKSURI: "https://idp.b.example/jwks", SubjectPrefix: tc.b},
				},
				Records: records,
			})
			if err == nil {
				t.Fatalf("New accepted subject prefixes %q and %q: two issuers' users share subjects", tc.a, tc.b)
			}
		})
	}
}
