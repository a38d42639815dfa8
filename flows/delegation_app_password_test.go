package flows

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/nextcloud"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// ncPublicURL is where the tests' users reach Nextcloud; the broker reaches the stand-in
// at its loopback address.
const ncPublicURL = "https://cloud.example.test"

// appPasswordTest is a broker in delegation mode app_password in front of an upstream that
// takes Basic credentials as the Nextcloud MCP server's multi_user_basic mode does, with
// the Nextcloud stand-in behind.
type appPasswordTest struct {
	o        *testenv.OP
	nc       *testenv.NextcloudStandIn
	up       *testenv.Upstream
	b        *Broker
	front    *httptest.Server
	resource string
	logs     *observer.ObservedLogs
	clock    *testenv.Clock
	metrics  recordingMetrics
}

func startAppPassword(t *testing.T, o *testenv.OP, nc *testenv.NextcloudStandIn, records *storage.Records, upstream ...testenv.UpstreamOption) *appPasswordTest {
	t.Helper()
	var handler http.Handler
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { handler.ServeHTTP(w, r) }))
	t.Cleanup(front.Close)
	core, logs := observer.New(zap.DebugLevel)
	f := &appPasswordTest{o: o, nc: nc, logs: logs, front: front, resource: front.URL + "/mcp", clock: &testenv.Clock{},
		up: testenv.StartUpstream(t, testenv.BasicPassThrough(), upstream...)}
	f.b = f.newBroker(t, records, zap.New(core))
	handler = startFront(t, f.b, f.up.URL).Config.Handler
	return f
}

// newBroker is a broker of this test's site, on records (nil: storage of its own).
func (f *appPasswordTest) newBroker(t *testing.T, records *storage.Records, logger *zap.Logger) *Broker {
	b := newTestBroker(t, f.o, func(c *Config) {
		c.Logger = logger
		c.Resource = f.resource
		c.DelegationMode = DelegationAppPassword
		c.AppPassword = AppPasswordConfig{NextcloudURL: f.nc.URL, PublicURL: ncPublicURL, UserAgent: "MCP broker (test)"}
		c.ToolScopes = nil
		c.Metrics = &f.metrics
		if records != nil {
			c.Records = records
		}
	})
	b.now = f.clock.Now
	return b
}

func (f *appPasswordTest) token(t *testing.T, u testenv.User) string {
	t.Helper()
	return f.o.LoginGrant(t, u, testenv.NativeClientID, "", []string{"openid", "notes:read"}, f.resource).AccessToken
}

func toolCall(name string) string {
	return `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"` + name + `","arguments":{}}}`
}

// mcpPost posts a JSON-RPC body to the MCP endpoint as a streamable HTTP client would.
func (f *appPasswordTest) mcpPost(t *testing.T, token, body string) *http.Response {
	t.Helper()
	h := bearer(token)
	h.Set("Content-Type", "application/json")
	h.Set("Accept", "application/json, text/event-stream")
	return do(t, http.MethodPost, f.resource, h, body)
}

// elicit calls a tool without an app password and returns the elicitation's link.
func (f *appPasswordTest) elicit(t *testing.T, token string) string {
	t.Helper()
	resp := f.mcpPost(t, token, toolCall("whoami"))
	var a elicitationAnswer
	decodeJSON(t, resp, &a)
	if resp.StatusCode != http.StatusOK || a.Error.Code != codeURLElicitationRequired || len(a.Error.Data.Elicitations) != 1 {
		t.Fatalf("%s %+v", resp.Status, a)
	}
	link := a.Error.Data.Elicitations[0].URL
	if !strings.HasPrefix(link, f.front.URL+pathAppPasswordStart+"?link=") || !strings.Contains(a.Error.Message, link) {
		t.Fatalf("elicitation %+v", a)
	}
	return link
}

// open opens a link as the user's browser and returns the Nextcloud login URL it leads to.
func (f *appPasswordTest) open(t *testing.T, link string) string {
	t.Helper()
	resp := getWithoutRedirect(t, link)
	to := redirectTarget(t, resp)
	if !strings.HasPrefix(to.String(), ncPublicURL+"/index.php/login/v2/flow/") {
		t.Fatalf("the link leads to %s", to.Redacted())
	}
	return to.String()
}

// upstreamBasic is the login name and password of the last request the upstream saw.
func (f *appPasswordTest) upstreamBasic(t *testing.T) (login, password string) {
	t.Helper()
	seen := f.up.Seen()
	if len(seen) == 0 {
		t.Fatal("the upstream saw nothing")
	}
	last := seen[len(seen)-1]
	if !strings.HasPrefix(last.Authorization, "Basic ") {
		return "", ""
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(last.Authorization, "Basic "))
	if err != nil {
		t.Fatal(err)
	}
	login, password, _ = strings.Cut(string(raw), ":")
	return login, password
}

func (f *appPasswordTest) auditEvents(event string) []observer.LoggedEntry {
	return f.logs.FilterLoggerName("audit").FilterMessage(event).All()
}

func (f *appPasswordTest) stored(t *testing.T, subject string) *AppPasswordGrant {
	t.Helper()
	g, err := f.b.appPasswords.store.loadGrant(t.Context(), subject)
	if err != nil {
		return nil
	}
	return g
}

func TestAppPasswordProvisionedIsSentAsBasic(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)

	t.Run("a call that is not a tool call passes without credentials", func(t *testing.T) {
		resp := f.mcpPost(t, token, `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %s", resp.Status)
		}
		if last := f.up.Seen()[len(f.up.Seen())-1]; last.Authorization != "" {
			t.Errorf("the upstream got Authorization %q", last.Authorization)
		}
	})
	link := f.elicit(t, token)
	login := f.open(t, link)
	t.Run("the link is good once", func(t *testing.T) {
		if resp := getWithoutRedirect(t, link); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("second use: %s", resp.Status)
		}
	})
	t.Run("the flow carries the broker's User-Agent", func(t *testing.T) {
		if r := nc.Requests()[0]; r.Path != "/index.php/login/v2" || r.UserAgent != "MCP broker (test)" {
			t.Errorf("first request %+v", r)
		}
	})
	if err := nc.Grant(login, o.User.Subject); err != nil {
		t.Fatal(err)
	}
	t.Run("the next tool call polls the flow and carries Basic", func(t *testing.T) {
		f.up.Reset()
		if who := f.whoami(t, token); who != o.User.Subject {
			t.Fatalf("the upstream's tool saw %q", who)
		}
		user, password := f.upstreamBasic(t)
		if user != o.User.Subject || len(password) != 72 {
			t.Errorf("upstream Basic for %q", user)
		}
		for _, s := range f.up.Seen() {
			for _, v := range s.Header {
				if strings.Contains(strings.Join(v, ","), token) {
					t.Error("the client's token reached the upstream")
				}
			}
		}
		if len(f.auditEvents(auditAppPasswordGranted)) != 1 {
			t.Error("no app_password_granted audit event")
		}
		// The OCS checks were made as Nextcloud expects them.
		var ocs int
		for _, r := range nc.Requests() {
			if strings.HasPrefix(r.Path, "/ocs/") {
				ocs++
				if r.OCSAPIRequest != "true" {
					t.Errorf("OCS request without OCS-APIRequest: %+v", r)
				}
			}
		}
		if ocs == 0 {
			t.Error("the app password's user was not checked")
		}
	})
	t.Run("the warm path reads no storage and asks Nextcloud nothing", func(t *testing.T) {
		before := len(nc.Requests())
		for range 3 {
			f.whoami(t, token)
		}
		if len(nc.Requests()) != before {
			t.Error("Nextcloud was asked on the warm path")
		}
		if _, password := f.upstreamBasic(t); password == "" {
			t.Error("no Basic upstream")
		}
	})
	t.Run("at rest the app password is sealed", func(t *testing.T) {
		g := f.stored(t, o.User.Subject)
		_, password := f.upstreamBasic(t)
		if g == nil || strings.Contains(g.AppPassword, password) || g.NextcloudUser != o.User.Subject {
			t.Errorf("stored %+v", g)
		}
	})
	t.Run("revoking offline access deletes it in Nextcloud", func(t *testing.T) {
		resp := do(t, http.MethodDelete, f.front.URL+pathOfflineAccessStatus, bearer(token), "")
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %s", resp.Status)
		}
		pws := nc.AppPasswords()
		if len(pws) != 1 || !pws[0].Deleted || pws[0].Name != "MCP broker (test)" {
			t.Errorf("app passwords %+v", pws)
		}
		if f.stored(t, o.User.Subject) != nil {
			t.Error("still stored")
		}
		if len(f.auditEvents(auditAppPasswordRevoked)) != 1 {
			t.Error("no app_password_revoked audit event")
		}
		f.elicit(t, token)
	})
}

func TestAppPasswordGrantedByAnotherAccountIsRefused(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)
	login := f.open(t, f.elicit(t, token))
	// Someone else's browser (or the user, logged in to Nextcloud as another account)
	// grants the flow.
	if err := nc.Grant(login, o.OtherUser.Subject); err != nil {
		t.Fatal(err)
	}
	if err := f.b.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	if f.stored(t, o.User.Subject) != nil || f.stored(t, o.OtherUser.Subject) != nil {
		t.Error("another account's app password was stored")
	}
	if pws := nc.AppPasswords(); len(pws) != 1 || !pws[0].Deleted {
		t.Errorf("the app password was not deleted in Nextcloud: %+v", pws)
	}
	events := f.auditEvents(auditAppPasswordRefused)
	if len(events) != 1 || events[0].ContextMap()["reason"] != "another_account" {
		t.Errorf("audit %+v", events)
	}
	if nc.PendingFlows() != 0 {
		t.Error("the flow is still pending in Nextcloud")
	}
	f.elicit(t, token) // still none: the tool call asks again
	if n := f.metrics.events[RequestAppPasswordNeeded].Load(); n != 2 {
		t.Errorf("%d elicitations counted, want 2", n)
	}
}

func TestAppPasswordPollSurvivesAnotherBroker(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)
	login := f.open(t, f.elicit(t, token))
	if err := nc.Grant(login, o.User.Subject); err != nil {
		t.Fatal(err)
	}
	// The broker that started the flow is gone (a reload, a killed instance); another on
	// the same storage polls it.
	other := f.newBroker(t, f.b.cfg.Records, zap.NewNop())
	if err := other.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	if g, err := other.appPasswords.store.loadGrant(t.Context(), o.User.Subject); err != nil || g.NextcloudUser != o.User.Subject {
		t.Fatalf("the other broker stored nothing: %v", err)
	}
	f.up.Reset()
	if who := f.whoami(t, token); who != o.User.Subject {
		t.Errorf("the upstream's tool saw %q", who)
	}
	if user, _ := f.upstreamBasic(t); user != o.User.Subject {
		t.Errorf("upstream Basic for %q", user)
	}
}

func TestAppPasswordFlowExpires(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)
	f.open(t, f.elicit(t, token))
	f.clock.Advance(1201 * time.Second)
	if err := f.b.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := f.b.appPasswords.store.loadFlow(t.Context(), o.User.Subject); err == nil {
		t.Error("an expired flow is still pending")
	}
}

// provision runs the whole grant for u and returns u's token.
func (f *appPasswordTest) provision(t *testing.T, u testenv.User) string {
	t.Helper()
	token := f.token(t, u)
	if err := f.nc.Grant(f.open(t, f.elicit(t, token)), u.Subject); err != nil {
		t.Fatal(err)
	}
	if err := f.b.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	if f.stored(t, u.Subject) == nil {
		t.Fatal("not provisioned")
	}
	return token
}

func TestAppPasswordRevokedOnlyWhenNextcloudSaysSo(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.provision(t, o.User)

	t.Run("an outage of Nextcloud revokes nothing", func(t *testing.T) {
		nc.FailOCS(http.StatusServiceUnavailable)
		defer nc.FailOCS(0)
		f.clock.Advance(appPasswordConfirmInterval + time.Second)
		f.up.Reset()
		before := len(nc.Requests())
		f.whoami(t, token)
		if len(nc.Requests()) == before {
			t.Error("Nextcloud was not asked")
		}
		if user, _ := f.upstreamBasic(t); user != o.User.Subject {
			t.Error("the app password was not used during the outage")
		}
		if g := f.stored(t, o.User.Subject); g == nil || !g.RevokedAt.IsZero() {
			t.Errorf("stored %+v", g)
		}
	})
	t.Run("throttling holds calls to Nextcloud back", func(t *testing.T) {
		nc.Throttle(true)
		defer nc.Throttle(false)
		f.clock.Advance(appPasswordConfirmInterval + time.Second)
		f.whoami(t, token)
		before := len(nc.Requests())
		f.clock.Advance(2 * time.Minute) // past the retry, within the back-off
		f.up.Reset()
		f.whoami(t, token)
		if len(nc.Requests()) != before {
			t.Error("Nextcloud was asked while it throttles the broker")
		}
		if user, _ := f.upstreamBasic(t); user != o.User.Subject {
			t.Error("the app password was not used while throttled")
		}
		if g := f.stored(t, o.User.Subject); g == nil || !g.RevokedAt.IsZero() {
			t.Errorf("stored %+v", g)
		}
		f.clock.Advance(nextcloud.DefaultThrottleWait)
	})
	t.Run("an app password Nextcloud refuses is marked revoked", func(t *testing.T) {
		nc.RevokeAppPasswords(o.User.Subject)
		f.clock.Advance(appPasswordConfirmInterval + time.Second)
		f.elicit(t, token)
		if g := f.stored(t, o.User.Subject); g == nil || g.RevokedAt.IsZero() || g.AppPassword != "" {
			t.Errorf("stored %+v", g)
		}
		if e := f.auditEvents(auditAppPasswordRevoked); len(e) != 1 || e[0].ContextMap()["reason"] != "nextcloud_refused" {
			t.Errorf("audit %+v", e)
		}
	})
}

// whoami calls the upstream's whoami tool in a new MCP session and returns whom the
// tool saw.
func (f *appPasswordTest) whoami(t *testing.T, token string) string {
	t.Helper()
	s := connect(t, f.front.URL, token)
	res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "whoami"})
	if err != nil || res.IsError {
		t.Fatalf("whoami: %v %+v", err, res)
	}
	var who testenv.Identity
	raw, _ := json.Marshal(res.StructuredContent)
	_ = json.Unmarshal(raw, &who)
	return who.Subject
}

// TestAppPasswordHybridSessionRevokedDeletesIt: in hybrid mode, the user's app password
// is provisioned through the broker's own tokens, and revoking the session (RFC 7009)
// deletes it in Nextcloud and here.
func TestAppPasswordHybridSessionRevokedDeletesIt(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	up := testenv.StartUpstream(t, testenv.BasicPassThrough())
	b, front := startHybridFront(t, o, up.URL, func(c *Config) {
		c.DelegationMode = DelegationAppPassword
		c.AppPassword = AppPasswordConfig{NextcloudURL: nc.URL, PublicURL: ncPublicURL}
		c.ToolScopes = nil
	})
	f := &appPasswordTest{o: o, nc: nc, up: up, b: b, front: front, resource: front.URL + "/mcp"}
	tok := brokerTokensFor(t, front, o, []string{"openid", "notes:read"})
	if err := nc.Grant(f.open(t, f.elicit(t, tok.AccessToken)), o.User.Subject); err != nil {
		t.Fatal(err)
	}
	if who := f.whoami(t, tok.AccessToken); who != o.User.Subject {
		t.Fatalf("the upstream's tool saw %q", who)
	}
	if user, _ := f.upstreamBasic(t); user != o.User.Subject {
		t.Fatalf("upstream Basic for %q", user)
	}
	resp := do(t, http.MethodPost, front.URL+pathRevoke, http.Header{"Content-Type": {"application/x-www-form-urlencoded"}},
		url.Values{"token": {tok.RefreshToken}, "client_id": {testenv.NativeClientID}}.Encode())
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revocation: %s", resp.Status)
	}
	if pws := nc.AppPasswords(); len(pws) != 1 || !pws[0].Deleted {
		t.Errorf("app passwords in Nextcloud %+v", pws)
	}
	if f.stored(t, o.User.Subject) != nil {
		t.Error("still stored")
	}
}

// TestAppPasswordUserClaim: with user_claim set, the app password must authenticate as the
// Nextcloud user that claim of the caller's token names, not as its sub.
func TestAppPasswordUserClaim(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := &appPasswordTest{o: o, nc: nc, clock: &testenv.Clock{}, up: testenv.StartUpstream(t, testenv.BasicPassThrough())}
	var handler http.Handler
	f.front = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { handler.ServeHTTP(w, r) }))
	t.Cleanup(f.front.Close)
	f.resource = f.front.URL + "/mcp"
	f.b = newTestBroker(t, o, func(c *Config) {
		c.Resource = f.resource
		c.DelegationMode = DelegationAppPassword
		c.AppPassword = AppPasswordConfig{NextcloudURL: nc.URL, PublicURL: ncPublicURL, UserClaim: "nextcloud_uid"}
		c.ToolScopes = nil
	})
	handler = startFront(t, f.b, f.up.URL).Config.Handler
	claims := o.AccessTokenClaims(o.User.Subject, f.resource)
	claims["scope"] = "openid notes:read"
	claims["nextcloud_uid"] = "alice"
	token := o.MintJWT(claims)

	login := f.open(t, f.elicit(t, token))
	if err := nc.Grant(login, o.User.Subject); err != nil { // the sub, not the Nextcloud user
		t.Fatal(err)
	}
	if err := f.b.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	if f.stored(t, o.User.Subject) != nil {
		t.Fatal("an app password of the sub's account was stored")
	}
	if err := nc.Grant(f.open(t, f.elicit(t, token)), "alice"); err != nil {
		t.Fatal(err)
	}
	if err := f.b.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	if g := f.stored(t, o.User.Subject); g == nil || g.NextcloudUser != "alice" || g.LoginName != "alice" {
		t.Fatalf("stored %+v", g)
	}
}

// TestAppPasswordDeletionRetried: an app password that must be deleted in Nextcloud while
// Nextcloud throttles the broker (here: another account's grant, which cannot even be
// checked) is queued, sealed, and deleted by the poller once the throttling is over.
func TestAppPasswordDeletionRetried(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)
	if err := nc.Grant(f.open(t, f.elicit(t, token)), o.OtherUser.Subject); err != nil {
		t.Fatal(err)
	}
	nc.Throttle(true)
	if err := f.b.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	if f.stored(t, o.User.Subject) != nil {
		t.Fatal("an unverifiable app password was stored")
	}
	if pws := nc.AppPasswords(); len(pws) != 1 || pws[0].Deleted {
		t.Fatalf("app passwords %+v", pws)
	}
	if e := f.auditEvents(auditAppPasswordRefused); len(e) != 1 || e[0].ContextMap()["reason"] != "unverifiable" {
		t.Errorf("audit %+v", e)
	}
	keys, err := f.b.appPasswords.store.deletionKeys(t.Context(), 10)
	if err != nil || len(keys) != 1 {
		t.Fatalf("queued deletions %v %v", keys, err)
	}
	nc.Throttle(false)
	if err := f.b.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	if pws := nc.AppPasswords(); pws[0].Deleted {
		t.Error("deleted while the broker should still hold back")
	}
	f.clock.Advance(nextcloud.DefaultThrottleWait + time.Second)
	if err := f.b.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	if pws := nc.AppPasswords(); !pws[0].Deleted {
		t.Error("the queued deletion was not retried")
	}
	if keys, _ := f.b.appPasswords.store.deletionKeys(t.Context(), 10); len(keys) != 0 {
		t.Errorf("deletions still queued: %d", len(keys))
	}
	assertNoSecretInLogs(t, f.logs, auditSecrets{"app password": nc.Secrets()[2]})
}
