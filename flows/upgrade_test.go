package flows

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/internal/upgradefixture"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// The upgrade fixture: storage written by an earlier release (testdata/upgrade/storage)
// and what a test needs to use it (testdata/upgrade/fixture.json, read by package
// upgradefixture). Every secret in it is a test secret of this fixture alone. It was
// written by TestWriteUpgradeFixture at
// commit f4bbd60, before offline access grants were kept per site and bound to background
// clients; keep it, and add a fixture of a later release beside it when what is stored
// changes again.

// upgradeFixtureDir holds the fixture.
const upgradeFixtureDir = "testdata/upgrade"

// upgradeFixtureDirBeforePairs holds the fixture of a later release, written by
// TestWriteUpgradeFixture at commit 2d7db80, before a code became its own replay marker,
// its family was stored with it, and a pair of broker tokens became one record. It also
// holds a code not redeemed (Fixture.PendingCode).
const upgradeFixtureDirBeforePairs = "testdata/upgrade-2d7db80"

// upgradeFixtureKey is the fixture's encryption key: 32 bytes of 7, as newTestBroker's.
var upgradeFixtureKey = bytes.Repeat([]byte{7}, 32)

// TestWriteUpgradeFixture writes the upgrade fixture with the broker of this release, when
// MCP_OAUTH_WRITE_FIXTURE names an empty or missing directory: a registered client, a
// session with the broker's access and refresh tokens, and an offline access grant. It is a
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
	e.clock.Base = time.Now().UTC().Truncate(time.Second)

	info := registerClient(t, e.b, `{"redirect_uris":["`+tokenTestRedirect+`"],"token_endpoint_auth_method":"none","client_name":"Upgrade fixture"}`)
	code, verifier := e.code(t, info.ClientID)
	pair := e.exchange(t, info.ClientID, code, verifier, nil).wantTokens(t)
	pendingCode, pendingVerifier := e.code(t, info.ClientID)

	grant := e.idpGrant(t)
	d, err := e.b.idp.Discovery(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	offlineScopes := []string{"openid", "offline_access", "notes:read"}
	if err := e.b.storeOfflineAccessGrant(t.Context(), d, o.User.Subject, info.ClientID, offlineScopes, e.b.backgroundClientIDs(), grant.RefreshToken); err != nil {
		t.Fatal(err)
	}

	fx := upgradefixture.Fixture{
		WrittenAt:           e.clock.Base,
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
		PendingCode:         pendingCode,
		PendingCodeVerifier: pendingVerifier,
	}
	out, err := json.MarshalIndent(fx, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "fixture.json"), append(out, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}

// newUpgradeEnv is a hybrid broker of this release over the fixture's storage, as the
// fixture's broker was configured, with the clock a minute after the fixture was
// written so that its records are live.
func newUpgradeEnv(t *testing.T, o *testenv.OP, fx upgradefixture.Fixture, dir string, change func(*Config)) *tokenEnv {
	t.Helper()
	key, err := base64.StdEncoding.DecodeString(fx.EncryptionKey)
	if err != nil {
		t.Fatal(err)
	}
	ring, err := storage.NewKeyRing(key)
	if err != nil {
		t.Fatal(err)
	}
	clock := &testenv.Clock{Base: fx.WrittenAt.Add(time.Minute)}
	core, logs := observer.New(zap.DebugLevel)
	b := newTestBroker(t, o, func(c *Config) {
		c.Mode = ModeHybrid
		c.Logger = zap.New(core)
		c.Resource = fx.Resource
		c.Registration = true
		c.BackgroundClients = []BackgroundClient{{ID: fx.WorkerID, Secret: fx.WorkerSecret}}
		c.Records = storage.New(&certmagic.FileStorage{Path: dir}, ring, storage.WithClock(clock.Now))
		if change != nil {
			change(c)
		}
	})
	b.now = clock.Now // before anything serves: no race
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	e := &tokenEnv{o: o, b: b, clock: clock, up: up, front: startFront(t, b, up.URL), logs: logs}
	t.Cleanup(func() { e.assertNoSecretsLogged(t) })
	e.remember(fx.AccessToken, fx.RefreshToken, fx.OfflineRefreshToken)
	return e
}

// TestUpgradeKeepsStoredRecords loads storage written by an earlier release (see
// TestWriteUpgradeFixture) into this one: its tokens, registered client and offline
// grant keep working. The IdP is a fresh OP that is told of the fixture's IdP refresh
// token (the OP of the run that wrote it is gone), so the background token proves the
// grant was found, opened and its refresh token used.
func TestUpgradeKeepsStoredRecords(t *testing.T) {
	fx, dir := upgradefixture.Load(t, upgradeFixtureDir)
	o := testenv.StartOP(t)
	e := newUpgradeEnv(t, o, fx, dir, nil)

	if st := e.mcpStatus(t, fx.AccessToken); st != http.StatusOK {
		t.Fatalf("the stored access token at the MCP endpoint: %d", st)
	}
	// The session's sealed IdP grant opens where the session is read from.
	var at AccessToken
	if err := e.b.cfg.Records.Get(t.Context(), recordKey(kindAccessToken, fx.AccessToken), &at); err != nil {
		t.Fatal(err)
	}
	s, serr := e.b.loadSession(t.Context(), at.SessionID)
	if serr != nil {
		t.Fatal(serr)
	}
	if g, err := e.b.sessionGrant(s); err != nil || g.RefreshToken == "" {
		t.Fatalf("the stored session's IdP grant: %v", err)
	}

	// The registered client is known: its authorization request goes on to consent.
	q := hybridAuthorizeQuery(fx.ClientID, fx.RedirectURI, oauth2.GenerateVerifier(), "st", nil)
	resp, err := noRedirect.Get(e.front.URL + pathAuthorize + "?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if loc, _ := url.Parse(resp.Header.Get("Location")); resp.StatusCode != http.StatusFound || loc == nil || loc.Path != pathConsent {
		t.Fatalf("authorization request of the registered client: %s to %q", resp.Status, resp.Header.Get("Location"))
	}

	next := e.refresh(t, fx.ClientID, fx.RefreshToken, nil).wantTokens(t)
	if st := e.mcpStatus(t, next.AccessToken); st != http.StatusOK {
		t.Fatalf("the refreshed access token at the MCP endpoint: %d", st)
	}

	o.SeedRefreshToken(fx.OfflineRefreshToken, testenv.BrokerClientID, fx.Subject, fx.OfflineScopes)
	for i := range 2 { // the second one uses the refresh token the first one rotated in
		if i == 1 { // rather than the access token the first one got
			g, err := e.b.loadOfflineAccessGrant(t.Context(), fx.Subject)
			if err != nil {
				t.Fatal(err)
			}
			g.AccessToken, g.AccessTokenExpiry = "", time.Time{}
			if err := e.b.offline.putBack(t.Context(), g); err != nil {
				t.Fatal(err)
			}
		}
		resp = do(t, http.MethodPost, e.front.URL+pathBackgroundToken,
			http.Header{"Content-Type": {"application/x-www-form-urlencoded"}, "Authorization": {basicCredentials(fx.WorkerID, fx.WorkerSecret)}},
			url.Values{"subject": {fx.Subject}}.Encode())
		var tok TokenResponse
		decodeJSON(t, resp, &tok)
		if resp.StatusCode != http.StatusOK || tok.AccessToken == "" {
			t.Fatalf("background token %d for the user with offline access: %s", i+1, resp.Status)
		}
		e.remember(tok.AccessToken)
	}
	if n := o.Count("refresh_token"); n != 2 {
		t.Errorf("the OP saw %d refresh grants, want 2", n)
	}

	// The grant moved to this site's key, bound to the worker configured at the upgrade.
	var legacy OfflineAccessGrant
	if err := e.b.cfg.Records.Get(t.Context(), legacyOfflineAccessGrantKey(fx.Subject), &legacy); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("the grant of the earlier release is still under its old key: %v", err)
	}
	g, err := e.b.loadOfflineAccessGrant(t.Context(), fx.Subject)
	if err != nil {
		t.Fatal(err)
	}
	if key, _ := e.b.offlineAccessGrantKey(fx.Subject); g.key != key || !g.FromUpgrade || !slices.Equal(g.BackgroundClients, []string{fx.WorkerID}) {
		t.Errorf("moved grant at %s (want %s), from upgrade %v, background clients %q", g.key, key, g.FromUpgrade, g.BackgroundClients)
	}
	if e.logs.FilterMessageSnippet("made before grants were bound to background clients").Len() == 0 {
		t.Error("no warning that the grant predates the binding")
	}
}

// TestUpgradeKeepsTokensAndCodesOfTheReleaseBeforePairs opens the storage of the release
// before codes were their own replay markers and token pairs one record: its pair
// verifies and refreshes (into a pair of this release), and its code in flight redeems,
// its family started then, and a replay of it after the code's life still revokes it.
func TestUpgradeKeepsTokensAndCodesOfTheReleaseBeforePairs(t *testing.T) {
	fx, dir := upgradefixture.Load(t, upgradeFixtureDirBeforePairs)
	o := testenv.StartOP(t)
	e := newUpgradeEnv(t, o, fx, dir, nil)
	e.clock.Advance(-50 * time.Second) // 10 s after the fixture was written: its code is live
	e.remember(fx.PendingCode, fx.PendingCodeVerifier)

	if st := e.mcpStatus(t, fx.AccessToken); st != http.StatusOK {
		t.Fatalf("the stored access token at the MCP endpoint: %d", st)
	}
	next := e.refresh(t, fx.ClientID, fx.RefreshToken, nil).wantTokens(t)
	if _, ok := pairTokenID(next.RefreshToken); !ok {
		t.Error("the refresh of an earlier release's token did not yield a pair of this release")
	}
	if st := e.mcpStatus(t, next.AccessToken); st != http.StatusOK {
		t.Fatalf("the refreshed access token at the MCP endpoint: %d", st)
	}

	tok := e.exchange(t, fx.ClientID, fx.PendingCode, fx.PendingCodeVerifier, nil).wantTokens(t)
	if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
		t.Fatalf("the access token of the stored code: %d", st)
	}
	e.clock.Advance(5 * time.Minute)
	e.exchange(t, fx.ClientID, fx.PendingCode, fx.PendingCodeVerifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
		t.Errorf("the stored code's access token after its replay: %d, want 401", st)
	}
}

// TestUpgradeGrantGoesToOneSite: of two sites on one storage, the one that first uses a
// grant of an earlier release (which names no site) takes it; the other has none.
func TestUpgradeGrantGoesToOneSite(t *testing.T) {
	fx, dir := upgradefixture.Load(t, upgradeFixtureDir)
	o := testenv.StartOP(t)
	a := newUpgradeEnv(t, o, fx, dir, nil)
	b := newUpgradeEnv(t, o, fx, dir, func(c *Config) { c.Resource = "https://other.example.test/mcp" })
	o.SeedRefreshToken(fx.OfflineRefreshToken, testenv.BrokerClientID, fx.Subject, fx.OfflineScopes)
	ask := func(e *tokenEnv) int {
		resp := do(t, http.MethodPost, e.front.URL+pathBackgroundToken,
			http.Header{"Content-Type": {"application/x-www-form-urlencoded"}, "Authorization": {basicCredentials(fx.WorkerID, fx.WorkerSecret)}},
			url.Values{"subject": {fx.Subject}}.Encode())
		var tok TokenResponse
		decodeJSON(t, resp, &tok)
		e.remember(tok.AccessToken)
		return resp.StatusCode
	}
	if st := ask(a); st != http.StatusOK {
		t.Fatalf("first site: %d", st)
	}
	if st := ask(b); st != http.StatusBadRequest {
		t.Errorf("second site: %d, want 400 (no offline access there)", st)
	}
	if st := ask(a); st != http.StatusOK {
		t.Errorf("first site again: %d", st)
	}
}
