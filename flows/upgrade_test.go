package flows

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// The upgrade fixture: storage written by an earlier release (testdata/upgrade/storage)
// and what a test needs to use it (testdata/upgrade/fixture.json). Every secret in it is
// a test secret of this fixture alone.

// upgradeFixtureDir holds the fixture.
const upgradeFixtureDir = "testdata/upgrade"

// upgradeFixture is fixture.json.
type upgradeFixture struct {
	// WrittenAt is when the records were written; their TTLs count from it.
	WrittenAt time.Time `json:"written_at"`
	// EncryptionKey is the base64 key the records were sealed with.
	EncryptionKey string `json:"encryption_key"`
	// Resource is the protected resource of the broker that wrote them.
	Resource string `json:"resource"`
	// ClientID is a dynamically registered public client with RedirectURI.
	ClientID    string `json:"client_id"`
	RedirectURI string `json:"redirect_uri"`
	// AccessToken and RefreshToken are the broker's pair issued to ClientID for Subject.
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	Subject      string `json:"subject"`
	// OfflineRefreshToken is the IdP refresh token sealed in Subject's offline grant,
	// provisioned through ClientID with OfflineScopes.
	OfflineRefreshToken string   `json:"offline_refresh_token"`
	OfflineScopes       []string `json:"offline_scopes"`
	// WorkerID and WorkerSecret are the background client configured when the grant was made.
	WorkerID     string `json:"worker_id"`
	WorkerSecret string `json:"worker_secret"`
}

// upgradeFixtureKey is the fixture's encryption key: 32 bytes of 7, as newTestBroker's.
var upgradeFixtureKey = bytes.Repeat([]byte{7}, 32)

// TestWriteUpgradeFixture writes the upgrade fixture with the broker of this release, when
// MCP_OAUTH_WRITE_FIXTURE names an empty or missing directory: a registered client, a
// session with the broker's access and refresh tokens, and an offline grant. It is a
// generator, run by hand before a release changes what is stored; it asserts nothing.
func TestWriteUpgradeFixture(t *testing.T) {
	dir := os.Getenv("MCP_OAUTH_WRITE_FIXTURE")
	if dir == "" {
		t.Skip("set MCP_OAUTH_WRITE_FIXTURE=dir to write the upgrade fixture")
	}
	ring, err := storage.NewKeyRing(upgradeFixtureKey)
	if err != nil {
		t.Fatal(err)
	}
	o := testenv.StartOP(t)
	e := newTokenEnv(t, o, func(c *Config) {
		c.Registration = true
		c.BackgroundClients = []BackgroundClient{{ID: testWorkerID, Secret: testWorkerSecret}}
		c.Records = storage.New(&certmagic.FileStorage{Path: filepath.Join(dir, "storage")}, ring)
	})
	e.clock.t = time.Now().UTC().Truncate(time.Second)

	info := registerClient(t, e.b, `{"redirect_uris":["`+tokenTestRedirect+`"],"token_endpoint_auth_method":"none","client_name":"Upgrade fixture"}`)
	code, verifier := e.code(t, info.ClientID)
	pair := e.exchange(t, info.ClientID, code, verifier, nil).wantTokens(t)

	grant := e.idpGrant(t)
	d, err := e.b.idp.Discovery(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	offlineScopes := []string{"openid", "offline_access", "notes:read"}
	if err := e.b.storeOfflineGrant(t.Context(), d, o.User.Subject, info.ClientID, offlineScopes, grant.RefreshToken); err != nil {
		t.Fatal(err)
	}

	fx := upgradeFixture{
		WrittenAt:           e.clock.t,
		EncryptionKey:       base64.StdEncoding.EncodeToString(upgradeFixtureKey),
		Resource:            testResource,
		ClientID:            info.ClientID,
		RedirectURI:         tokenTestRedirect,
		AccessToken:         pair.AccessToken,
		RefreshToken:        pair.RefreshToken,
		Subject:             o.User.Subject,
		OfflineRefreshToken: grant.RefreshToken,
		OfflineScopes:       offlineScopes,
		WorkerID:            testWorkerID,
		WorkerSecret:        testWorkerSecret,
	}
	out, err := json.MarshalIndent(fx, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "fixture.json"), append(out, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}
