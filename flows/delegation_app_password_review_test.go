package flows

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/nextcloud"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Delegation mode app_password under a stranger's and a storage writer's hands
// (SECURITY.md S1.27 to S1.30).

// polls counts the stand-in's Login Flow v2 polls.
func polls(nc *testenv.NextcloudStandIn) int {
	n := 0
	for _, r := range nc.Requests() {
		if r.Path == "/index.php/login/v2/poll" {
			n++
		}
	}
	return n
}

// pollSecrets are the poll and login tokens and app passwords the stand-in handed out.
func pollSecrets(nc *testenv.NextcloudStandIn) auditSecrets {
	s := auditSecrets{}
	for i, v := range nc.Secrets() {
		s.add(fmt.Sprintf("Nextcloud secret %d", i), v)
	}
	return s
}

// liveRecords counts the live records of kind in b's storage.
func liveRecords(t *testing.T, b *Broker, kind string) int {
	t.Helper()
	keys, err := b.cfg.Records.List(t.Context(), storage.Key(kind))
	if err != nil {
		t.Fatal(err)
	}
	return len(keys)
}

// TestAppPasswordToolCallsAreBounded (S1.27): a user's tool calls in a row, with no app
// password, make the broker poll Nextcloud at most once per loginFlowPendingWait and
// store a bounded number of records, whether a flow is pending or not.
func TestAppPasswordToolCallsAreBounded(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)
	const calls = 10

	t.Run("no flow: one link, reused", func(t *testing.T) {
		first := f.elicit(t, token)
		for range calls - 1 {
			if link := f.elicit(t, token); link != first {
				t.Fatal("a new link for each call")
			}
		}
		if n := liveRecords(t, f.b, kindAppPasswordLink); n != 1 {
			t.Errorf("%d link records after %d calls, want 1", n, calls)
		}
		if n := len(nc.Requests()); n != 0 {
			t.Errorf("Nextcloud was asked %d times without a flow", n)
		}
	})
	t.Run("a pending flow is polled once per interval", func(t *testing.T) {
		f.open(t, f.elicit(t, token)) // the link is spent, the flow pending
		before := polls(nc)
		for range calls {
			f.elicit(t, token)
		}
		if n := polls(nc) - before; n > 1 {
			t.Errorf("%d polls of a pending flow in %d calls within the interval, want at most 1", n, calls)
		}
		if n := liveRecords(t, f.b, kindAppPasswordLink); n > 1 {
			t.Errorf("%d link records after %d calls, want at most 1", n, calls)
		}
		if n := liveRecords(t, f.b, kindLoginFlow); n != 1 {
			t.Errorf("%d login flow records, want 1", n)
		}
		// Past the interval the user's call polls again: a grant is still picked up at once.
		f.clock.Advance(loginFlowPendingWait)
		before = polls(nc)
		f.elicit(t, token)
		if polls(nc) != before+1 {
			t.Error("the flow was not polled again after the interval")
		}
	})
	assertNoSecretInLogs(t, f.logs, pollSecrets(nc))
}

// TestAppPasswordRevocationReachesOtherNodes (S1.28): an app password revoked on one node
// is no longer sent upstream by another node sharing the storage after
// appPasswordMemoryTrust, though that node had it in memory.
func TestAppPasswordRevocationReachesOtherNodes(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.provision(t, o.User)
	// Node B: another broker on the same storage, behind its own front.
	nodeB := &appPasswordTest{o: o, nc: nc, up: f.up, clock: f.clock}
	nodeB.b = f.newBroker(t, f.b.cfg.Records, zap.NewNop())
	nodeB.front = startFront(t, nodeB.b, f.up.URL)
	nodeB.resource = nodeB.front.URL + "/mcp"
	f.up.Reset()
	if who := nodeB.whoami(t, token); who != o.User.Subject {
		t.Fatalf("node B: the tool saw %q", who)
	}
	if user, _ := nodeB.upstreamBasic(t); user != o.User.Subject {
		t.Fatal("node B sent no app password")
	}
	// Node A revokes it (offline access revoked by the user).
	resp := do(t, http.MethodDelete, f.front.URL+pathOfflineAccessStatus, bearer(token), "")
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || f.stored(t, o.User.Subject) != nil {
		t.Fatalf("revocation on node A: %s", resp.Status)
	}
	f.clock.Advance(appPasswordMemoryTrust)
	f.up.Reset()
	resp = nodeB.mcpPost(t, token, `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("tools/list on node B: %s", resp.Status)
	}
	if _, password := nodeB.upstreamBasic(t); password != "" {
		t.Error("node B still sends the app password revoked on node A")
	}
	var a elicitationAnswer
	resp = nodeB.mcpPost(t, token, toolCall("whoami"))
	decodeJSON(t, resp, &a)
	if a.Error.Code != codeURLElicitationRequired {
		t.Errorf("a tool call on node B after the revocation: %s %+v", resp.Status, a)
	}
	if appPasswordMemoryTrust > brokerCacheTTL {
		t.Errorf("app passwords are trusted from memory for %s, broker tokens for %s", appPasswordMemoryTrust, brokerCacheTTL)
	}
}

// TestAppPasswordRevokingOneClientKeepsOthers (S1.29): in hybrid mode, revoking one
// client's session (RFC 7009) leaves the user's app password to the user's other
// sessions; revoking the user's last session deletes it in Nextcloud and here.
func TestAppPasswordRevokingOneClientKeepsOthers(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	up := testenv.StartUpstream(t, testenv.BasicPassThrough())
	const second = "second-native-client"
	b, front := startHybridFront(t, o, up.URL, func(c *Config) {
		c.DelegationMode = DelegationAppPassword
		c.AppPassword = AppPasswordConfig{NextcloudURL: nc.URL, PublicURL: ncPublicURL}
		c.ToolScopes = nil
		c.Clients = append(c.Clients, ClientConfig{ClientID: second, Name: "Second", RedirectURIs: []string{"http://127.0.0.1/callback"}})
	})
	f := &appPasswordTest{o: o, nc: nc, up: up, b: b, front: front, resource: front.URL + "/mcp"}
	scopes := []string{"openid", "notes:read"}
	first := brokerTokensFor(t, front, o, scopes)
	other := brokerTokensForClient(t, front, o, second, scopes)
	if err := nc.Grant(f.open(t, f.elicit(t, first.AccessToken)), o.User.Subject); err != nil {
		t.Fatal(err)
	}
	if who := f.whoami(t, first.AccessToken); who != o.User.Subject {
		t.Fatalf("the tool saw %q", who)
	}
	revoke := func(clientID, refreshToken string) {
		t.Helper()
		resp := do(t, http.MethodPost, front.URL+pathRevoke, http.Header{"Content-Type": {"application/x-www-form-urlencoded"}},
			url.Values{"token": {refreshToken}, "client_id": {clientID}}.Encode())
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("revocation: %s", resp.Status)
		}
	}
	revoke(testenv.NativeClientID, first.RefreshToken)
	if pws := nc.AppPasswords(); len(pws) != 1 || pws[0].Deleted {
		t.Fatalf("revoking one client's session deleted the user's app password in Nextcloud: %+v", pws)
	}
	if f.stored(t, o.User.Subject) == nil {
		t.Fatal("revoking one client's session deleted the user's app password here")
	}
	up.Reset()
	if who := f.whoami(t, other.AccessToken); who != o.User.Subject {
		t.Fatalf("the other client's tool saw %q", who)
	}
	if user, _ := f.upstreamBasic(t); user != o.User.Subject {
		t.Error("the other client's call went without the app password")
	}
	revoke(second, other.RefreshToken)
	if pws := nc.AppPasswords(); len(pws) != 1 || !pws[0].Deleted {
		t.Errorf("the user's last session revoked, the app password lives on in Nextcloud: %+v", pws)
	}
	if f.stored(t, o.User.Subject) != nil {
		t.Error("the user's last session revoked, the app password is still stored")
	}
}

// brokerTokensForClient is brokerTokensFor through clientID, whose redirect URIs are
// loopback.
func brokerTokensForClient(t *testing.T, front *httptest.Server, o *testenv.OP, clientID string, scopes []string) *oauth2.Token {
	t.Helper()
	verifier := oauth2.GenerateVerifier()
	code := hybridLogin(t, front, o, clientID, hybridRedirectURI, verifier, scopes)
	conf := oauth2.Config{
		ClientID:    clientID,
		Endpoint:    oauth2.Endpoint{TokenURL: front.URL + pathToken, AuthStyle: oauth2.AuthStyleInParams},
		RedirectURL: hybridRedirectURI,
	}
	tok, err := conf.Exchange(t.Context(), code, oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatalf("redeeming the broker's code: %v", err)
	}
	return tok
}

// TestAppPasswordFlowIdentityIsBound (S1.30): a pending flow whose subject was changed in
// storage (to hand another user the app password its grant yields) is refused: nothing
// is stored for either user, and the record is dropped.
func TestAppPasswordFlowIdentityIsBound(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)
	login := f.open(t, f.elicit(t, token))
	ctx := t.Context()
	fl, err := f.b.appPasswords.store.loadFlow(ctx, o.User.Subject)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		change func(*PendingLoginFlow)
	}{
		{"subject changed", func(p *PendingLoginFlow) { p.Subject = o.OtherUser.Subject }},
		{"client changed", func(p *PendingLoginFlow) { p.ClientID = "another-client" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := *fl
			tc.change(&raw)
			if err := f.b.cfg.Records.Put(ctx, fl.key, &raw, loginFlowTTL); err != nil {
				t.Fatal(err)
			}
			if _, err := f.b.appPasswords.store.loadFlowAt(ctx, fl.key); err == nil {
				t.Error("the altered flow was read as good")
			}
		})
	}
	// The attack: the subject is another user's, the Nextcloud user the one who grants.
	raw := *fl
	raw.Subject = o.OtherUser.Subject
	if err := f.b.cfg.Records.Put(ctx, fl.key, &raw, loginFlowTTL); err != nil {
		t.Fatal(err)
	}
	if err := nc.Grant(login, o.User.Subject); err != nil {
		t.Fatal(err)
	}
	_ = f.b.PollLoginFlows(ctx)
	if f.stored(t, o.OtherUser.Subject) != nil {
		t.Error("an app password was stored for the user the altered record named")
	}
	if f.stored(t, o.User.Subject) != nil {
		t.Error("an app password was stored from an altered record")
	}
	if n := liveRecords(t, f.b, kindLoginFlow); n != 0 {
		t.Errorf("%d altered flow records kept", n)
	}
	assertNoSecretInLogs(t, f.logs, pollSecrets(nc))
}

// BenchmarkAppPasswordReload is what appPasswordMemoryTrust costs a node: per user, once
// per 30 s, one request reads and opens the app password's record (file storage) instead
// of using it from memory; Nextcloud is not asked.
func BenchmarkAppPasswordReload(b *testing.B) {
	br := newBenchBroker(b)
	ap := &appPasswords{store: appPasswordStore{records: br.cfg.Records, site: br.site}}
	br.appPasswords = ap
	ctx := b.Context()
	g := AppPasswordGrant{Subject: "bench-user", NextcloudUser: "bench-user", LoginName: "bench-user", GrantedAt: time.Now(), ConfirmedAt: time.Now()}
	if err := ap.store.putGrant(ctx, &g, strings.Repeat("p", 72)); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if h, err := br.loadAppPasswordOnce(ctx, "bench-user"); err != nil || h == "" {
			b.Fatal(err)
		}
	}
}

// TestAppPasswordReloadKeepsTheConfirmationPace: reading the app password again every
// appPasswordMemoryTrust does not ask Nextcloud more often than before: every
// appPasswordConfirmInterval, and appPasswordRetry after it did not answer.
func TestAppPasswordReloadKeepsTheConfirmationPace(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.provision(t, o.User)
	ocs := func() int {
		n := 0
		for _, r := range nc.Requests() {
			if strings.HasPrefix(r.Path, "/ocs/") {
				n++
			}
		}
		return n
	}
	before := ocs()
	for range 3 {
		f.clock.Advance(appPasswordMemoryTrust)
		f.whoami(t, token)
	}
	if ocs() != before {
		t.Error("Nextcloud was asked within the confirmation interval")
	}
	nc.FailOCS(http.StatusServiceUnavailable)
	f.clock.Advance(appPasswordConfirmInterval)
	f.whoami(t, token)
	if ocs() != before+1 {
		t.Fatalf("%d confirmations, want 1", ocs()-before)
	}
	f.clock.Advance(appPasswordMemoryTrust)
	f.whoami(t, token) // read again, not asked again: Nextcloud did not answer a moment ago
	if ocs() != before+1 {
		t.Errorf("asked again %d times before appPasswordRetry", ocs()-before-1)
	}
	nc.FailOCS(0)
	f.clock.Advance(appPasswordRetry)
	f.whoami(t, token)
	if ocs() != before+2 {
		t.Errorf("%d confirmations after appPasswordRetry, want 2", ocs()-before)
	}
	if user, _ := f.upstreamBasic(t); user != o.User.Subject {
		t.Error("the app password was not used")
	}
}

// TestAppPasswordLinksOpenedInARowStartOneFlow (S1.27): links of a user opened in a row
// while the user's flow is pending send the browser to that flow's login URL: Nextcloud
// starts one flow, not one per link, until the flow has less than a link's lifetime left.
func TestAppPasswordLinksOpenedInARowStartOneFlow(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)
	starts := func() int {
		n := 0
		for _, r := range nc.Requests() {
			if r.Path == "/index.php/login/v2" {
				n++
			}
		}
		return n
	}
	first := f.open(t, f.elicit(t, token))
	for range 3 {
		if login := f.open(t, f.elicit(t, token)); login != first {
			t.Fatal("a link opened while the flow is pending started another flow")
		}
	}
	if n := starts(); n != 1 {
		t.Errorf("%d flows started at Nextcloud, want 1", n)
	}
	f.clock.Advance(nextcloud.FlowLifetime - appPasswordLinkTTL)
	if login := f.open(t, f.elicit(t, token)); login == first || starts() != 2 {
		t.Error("a flow with less than a link's lifetime left was continued")
	}
	assertNoSecretInLogs(t, f.logs, pollSecrets(nc))
}
