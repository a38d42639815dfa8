// Package upgradefixture reads the upgrade fixture, the storage an earlier release wrote
// (flows/testdata/upgrade, see flows' TestWriteUpgradeFixture), for the tests in flows and
// caddyoauthbroker that open it with this release. Test-only: production code never
// imports it.
package upgradefixture

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Fixture is fixture.json: what a test needs to use the stored records.
type Fixture struct {
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
	// OfflineRefreshToken is the IdP refresh token sealed in Subject's offline access grant,
	// granted offline access through ClientID with OfflineScopes.
	OfflineRefreshToken string   `json:"offline_refresh_token"`
	OfflineScopes       []string `json:"offline_scopes"`
	// WorkerID and WorkerSecret are the background client configured when the grant was made.
	WorkerID     string `json:"worker_id"`
	WorkerSecret string `json:"worker_secret"`
	// PendingCode is an authorization code issued to ClientID and not redeemed, with its
	// PKCE verifier: redeemable until code_ttl (60s) after WrittenAt. Fixtures written
	// before the code became its own replay marker have one; earlier ones none.
	PendingCode         string `json:"pending_code,omitempty"`
	PendingCodeVerifier string `json:"pending_code_verifier,omitempty"`
}

// Load reads dir/fixture.json and copies dir/storage into a fresh directory, which the
// test may change, and returns the fixture and that directory.
func Load(tb testing.TB, dir string) (Fixture, string) {
	tb.Helper()
	raw, err := os.ReadFile(filepath.Join(dir, "fixture.json"))
	if err != nil {
		tb.Fatal(err)
	}
	var fx Fixture
	if err := json.Unmarshal(raw, &fx); err != nil {
		tb.Fatal(err)
	}
	storage := tb.TempDir()
	if err := os.CopyFS(storage, os.DirFS(filepath.Join(dir, "storage"))); err != nil {
		tb.Fatal(err)
	}
	return fx, storage
}
