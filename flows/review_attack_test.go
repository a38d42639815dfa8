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
