package flows

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/internal/tokencache"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Scopes of the delegation tests: the broker's and what a full login grants.
var (
	delegationToolScopes = []ToolScopeRule{
		{Tool: "notes_write", Scopes: []string{"notes:write"}},
		{Tool: "notes_read", Scopes: []string{"notes:read"}},
	}
	delegationLoginScopes = []string{"openid", "notes:read", "notes:write", "offline_access"}
)

// delegating configures a test broker to delegate for the audience "nextcloud", which the
// delegation upstream accepts, with the read and write tool rules.
func delegating(mode, delegationMode string, more ...func(*Config)) func(*Config) {
	return func(c *Config) {
		c.Mode = mode
		c.DelegationMode = delegationMode
		c.DelegationAudience = "nextcloud"
		c.ToolScopes = delegationToolScopes
		for _, f := range more {
			f(c)
		}
	}
}

// delegationUpstream is an MCP upstream that takes only the OP's tokens for "nextcloud".
func delegationUpstream(t *testing.T, o *testenv.OP) *testenv.Upstream {
	return testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
}

// hybridPrincipal logs user in at o as the broker's own client, as the hybrid callback
// does, stores the session, and returns the principal a broker token of it speaks for.
func hybridPrincipal(tb testing.TB, b *Broker, o *testenv.OP, user testenv.User, resources ...string) (*idp.Principal, *oauth2.Token) {
	tb.Helper()
	tok := o.LoginGrant(tb, user, testenv.BrokerClientID, testenv.BrokerClientSecret, delegationLoginScopes, resources...)
	s, err := b.sessions.create(context.Background(), user.Subject, testenv.NativeClientID, delegationLoginScopes, IdPGrant{
		Token:  oauth2.Token{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, Expiry: tok.Expiry},
		Scopes: delegationLoginScopes,
	})
	if err != nil {
		tb.Fatal(err)
	}
	return &idp.Principal{
		Subject:   user.Subject,
		ClientID:  testenv.NativeClientID,
		Scopes:    delegationLoginScopes,
		Expiry:    time.Now().Add(time.Hour),
		SessionID: s.ID,
	}, tok
}

// progressivePrincipal logs user in as the native client for the test resource and
// verifies the token as the protected path would.
func progressivePrincipal(tb testing.TB, b *Broker, o *testenv.OP, user testenv.User) (*idp.Principal, string) {
	tb.Helper()
	raw := o.LoginGrant(tb, user, testenv.NativeClientID, "", delegationLoginScopes, testResource).AccessToken
	who, err := b.verifier.Verify(context.Background(), raw)
	if err != nil {
		tb.Fatalf("verifying the client's token: %v", err)
	}
	return who, raw
}

// newPresentedToken is the token raw as authenticate presents it in progressive mode.
func newPresentedToken(raw string) presentedToken {
	return presentedToken{raw: raw, digest: tokencache.Key(raw)}
}

// delegate runs delegateInto as protect does and returns the response (if it answered)
// and the Authorization header the upstream would get.
func delegate(ctx context.Context, b *Broker, who *idp.Principal, raw string, need []string) (*httptest.ResponseRecorder, string, bool) {
	w := httptest.NewRecorder()
	out := httptest.NewRequestWithContext(ctx, http.MethodPost, testResource, nil)
	err := b.delegateInto(out, who, newPresentedToken(raw), need)
	if err != nil {
		b.writeError(w, out, err)
	}
	return w, out.Header.Get("Authorization"), err == nil
}

// mustDelegate is delegate that fails the test unless a token was given.
func mustDelegate(tb testing.TB, b *Broker, who *idp.Principal, raw string, need []string) string {
	tb.Helper()
	w, h, ok := delegate(context.Background(), b, who, raw, need)
	if !ok || !strings.HasPrefix(h, "Bearer ") {
		tb.Fatalf("delegation failed: %d %s", w.Code, w.Body.String())
	}
	return strings.TrimPrefix(h, "Bearer ")
}

// delegatedClaims verifies a delegated token with the OP's key and returns its claims.
type delegatedClaimSet struct {
	Subject  string       `json:"sub"`
	Audience idp.Audience `json:"aud"`
	Scope    string       `json:"scope"`
	Expiry   int64        `json:"exp"`
}

func delegatedClaims(tb testing.TB, o *testenv.OP, token string) delegatedClaimSet {
	tb.Helper()
	sig, err := jose.ParseSignedCompact(token, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		tb.Fatalf("parsing delegated token: %v", err)
	}
	key := o.SigningKey()
	payload, err := sig.Verify(key.Public())
	if err != nil {
		tb.Fatalf("verifying delegated token: %v", err)
	}
	var c delegatedClaimSet
	if err := json.Unmarshal(payload, &c); err != nil {
		tb.Fatal(err)
	}
	return c
}

// readCounter is a certmagic.Storage that counts reads and locks: instrumentation, the
// file storage underneath does the work.
type readCounter struct {
	certmagic.Storage
	reads, locks atomic.Int64
}

func (c *readCounter) Load(ctx context.Context, key string) ([]byte, error) {
	c.reads.Add(1)
	return c.Storage.Load(ctx, key)
}

func (c *readCounter) Exists(ctx context.Context, key string) bool {
	c.reads.Add(1)
	return c.Storage.Exists(ctx, key)
}

func (c *readCounter) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	c.reads.Add(1)
	return c.Storage.Stat(ctx, key)
}

func (c *readCounter) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	c.reads.Add(1)
	return c.Storage.List(ctx, path, recursive)
}

func (c *readCounter) Lock(ctx context.Context, name string) error {
	c.locks.Add(1)
	return c.Storage.Lock(ctx, name)
}

// countedRecords puts the broker's records on file storage in dir behind a readCounter.
func countedRecords(dir string) (func(*Config), *readCounter) {
	counter := &readCounter{Storage: &certmagic.FileStorage{Path: dir}}
	return func(c *Config) {
		ring, err := storage.NewKeyRing([]byte("0123456789abcdef0123456789abcdef"))
		if err != nil {
			panic(err)
		}
		c.Records = storage.New(counter, ring)
	}, counter
}

// tokenGrants is how many token-endpoint requests o has had for delegation's grants.
func tokenGrants(o *testenv.OP) int {
	return o.Count(testenv.TokenExchangeGrantType) + o.Count("refresh_token") + o.Count("authorization_code")
}

func TestNewDelegationModes(t *testing.T) {
	o := testenv.SharedOP(t)
	for _, tc := range []struct {
		name, mode, delegation, wantErr string
	}{
		{"token exchange in progressive mode", ModeProgressive, DelegationTokenExchange, ""},
		{"token exchange in hybrid mode", ModeHybrid, DelegationTokenExchange, ""},
		{"auto in progressive mode", ModeProgressive, "", ""},
		{"auto in hybrid mode", ModeHybrid, "", ""},
		{"refresh in hybrid mode", ModeHybrid, DelegationRefresh, ""},
		{"refresh in progressive mode is refused", ModeProgressive, DelegationRefresh,
			"delegation refresh: needs mode hybrid, where the broker holds the IdP grant"},
		{"an unknown mode is refused", ModeHybrid, "passthrough", `delegation: unknown mode "passthrough"; want token_exchange, refresh, app_password or none`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{Mode: tc.mode, Issuer: o.Issuer, Resource: testResource, DelegationMode: tc.delegation,
				Records: storage.New(&certmagic.FileStorage{Path: t.TempDir()}, nil)}
			_, err := New(cfg)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("New: %v", err)
			case tc.wantErr != "" && (err == nil || err.Error() != tc.wantErr):
				t.Fatalf("New: %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestDelegationDefaultScopes(t *testing.T) {
	for _, tc := range []struct {
		name          string
		cfg           Config
		want, refresh []string
	}{
		{"unset: the client's whole grant (nil), not the configured scopes",
			Config{Scopes: []string{"openid", "profile", "notes:write", "email", "offline_access", "notes:read"}, ToolScopes: delegationToolScopes},
			nil, nil},
		{"delegation scopes win over the configured scopes",
			Config{Scopes: []string{"openid", "notes:read", "notes:write"}, DelegationScopes: []string{"files"}},
			[]string{"files"}, []string{"files"}},
		{"refresh narrows to the default and every tool scope",
			Config{Scopes: []string{"openid"}, DelegationScopes: []string{"notes:read"}, ToolScopes: delegationToolScopes},
			[]string{"notes:read"}, []string{"notes:read", "notes:write"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDelegation(&tc.cfg)
			if !slices.Equal(d.defaultScopes, tc.want) || !slices.Equal(d.refreshScopes, tc.refresh) ||
				(d.defaultScopes == nil) != (tc.want == nil) || (d.refreshScopes == nil) != (tc.refresh == nil) {
				t.Errorf("default %v refresh %v, want %v %v", d.defaultScopes, d.refreshScopes, tc.want, tc.refresh)
			}
			if d.wholeGrant {
				t.Error("whole grant for every call without narrow none")
			}
		})
	}
	t.Run("resource only for an absolute URI", func(t *testing.T) {
		for aud, want := range map[string]string{"nextcloud": "", "https://cloud.example/": "https://cloud.example/", "/relative": ""} {
			if got := newDelegation(&Config{DelegationAudience: aud}).resource; got != want {
				t.Errorf("audience %q: resource %q, want %q", aud, got, want)
			}
		}
	})
}

// TestDelegationThroughUpstream runs real MCP calls through the broker in progressive
// mode: the upstream verifies every token it gets, and each is one the IdP delegated.
func TestDelegationThroughUpstream(t *testing.T) {
	o := testenv.SharedOP(t)
	up := delegationUpstream(t, o)
	front := startFront(t, newTestBroker(t, o, delegating(ModeProgressive, DelegationTokenExchange)), up.URL)
	clientToken := o.LoginAccessToken(t, testenv.NativeClientID, "", delegationLoginScopes, testResource)
	s := connect(t, front.URL, clientToken)

	call := func(t *testing.T, name string, args any) testenv.SeenRequest {
		t.Helper()
		up.Reset()
		res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: name, Arguments: args})
		if err != nil || res.IsError {
			t.Fatalf("%s: %v %+v", name, err, res)
		}
		for _, r := range up.Seen() {
			if r.RPCMethod == "tools/call" {
				return r
			}
		}
		t.Fatalf("%s never reached the upstream", name)
		return testenv.SeenRequest{}
	}
	for _, tc := range []struct {
		name, tool string
		args       any
		want       []string
	}{
		{"a call without a rule gets the client's whole grant", "whoami", nil, []string{"notes:read", "notes:write", "offline_access", "openid"}},
		{"the read tool gets only notes:read", "notes_read", nil, []string{"notes:read"}},
		{"the write tool gets only notes:write", "notes_write", map[string]any{"text": "hi"}, []string{"notes:write"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seen := call(t, tc.tool, tc.args)
			if seen.AuthError != "" {
				t.Fatalf("upstream refused the token: %s", seen.AuthError)
			}
			if !slices.Equal(seen.Audience, []string{"nextcloud"}) || seen.Subject != o.User.Subject {
				t.Errorf("upstream saw aud %v sub %q", seen.Audience, seen.Subject)
			}
			if !slices.Equal(seen.Scopes, tc.want) {
				t.Errorf("upstream saw scopes %v, want %v", seen.Scopes, tc.want)
			}
		})
	}
	t.Run("the client's token never reaches the upstream", func(t *testing.T) {
		call(t, "whoami", nil)
		call(t, "notes_read", nil)
		for _, r := range up.Seen() {
			if r.AuthError != "" {
				t.Errorf("%s %s: %s", r.Method, r.RPCMethod, r.AuthError)
			}
			if strings.Contains(strings.Join(flatten(r.Header), " "), clientToken) {
				t.Errorf("%s %s carried the client's token", r.Method, r.RPCMethod)
			}
		}
	})
}

func TestDelegationRefusedSubjectGets401(t *testing.T) {
	o := testenv.SharedOP(t)
	up := delegationUpstream(t, o)
	b := newTestBroker(t, o, delegating(ModeProgressive, DelegationTokenExchange))
	front := startFront(t, b, up.URL)
	// The OP refuses to exchange the tokens of a user who is no admin.
	restricted := o.LoginGrant(t, o.RestrictedUser, testenv.NativeClientID, "", delegationLoginScopes, testResource).AccessToken

	resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(restricted), `{"jsonrpc":"2.0","id":1,"method":"initialize"}`)
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("status %s, want 401", resp.Status)
	}
	if got, want := resp.Header.Get("WWW-Authenticate"), wantChallenge+`, error="invalid_token"`; got != want {
		t.Errorf("WWW-Authenticate\n got %s\nwant %s", got, want)
	}
	if n := len(up.Seen()); n != 0 {
		t.Errorf("upstream saw %d requests", n)
	}
}

func TestDelegationProgressiveWithoutTokenExchange(t *testing.T) {
	o := testenv.StartOP(t, testenv.WithoutTokenExchangeAdvertised())
	core, logs := observer.New(zap.ErrorLevel)
	up := delegationUpstream(t, o)
	b := newTestBroker(t, o, delegating(ModeProgressive, "", func(c *Config) { c.Logger = zap.New(core) }))
	front := startFront(t, b, up.URL)
	tok := o.LoginAccessToken(t, testenv.NativeClientID, "", delegationLoginScopes, testResource)

	for range 2 {
		resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(tok), `{"jsonrpc":"2.0","id":1,"method":"initialize"}`)
		var e oauthError
		decodeJSON(t, resp, &e)
		if resp.StatusCode != http.StatusBadGateway || e.Error != "server_error" || e.Description != "the identity provider offers no token exchange" {
			t.Fatalf("%s %+v", resp.Status, e)
		}
	}
	if n := logs.FilterMessageSnippet("offers no token exchange").Len(); n != 1 {
		t.Errorf("logged %d times, want once", n)
	}
	if n := len(up.Seen()); n != 0 {
		t.Errorf("upstream saw %d requests", n)
	}
	if n := o.Count(testenv.TokenExchangeGrantType) + o.Count("refresh_token"); n != 0 {
		t.Errorf("%d grants at the IdP", n)
	}
}

// TestDelegationSingleFlightAndWarmPath: on a cold key, concurrent requests cost one IdP
// call; on a warm key none, and no storage read either.
func TestDelegationSingleFlightAndWarmPath(t *testing.T) {
	for _, tc := range []struct {
		name       string
		mode       string
		opts       []testenv.OPOption
		grant      string
		principal  func(t *testing.T, b *Broker, o *testenv.OP) (*idp.Principal, string)
		wantScopes string
	}{
		{"progressive token exchange", ModeProgressive, nil, testenv.TokenExchangeGrantType,
			func(t *testing.T, b *Broker, o *testenv.OP) (*idp.Principal, string) {
				return progressivePrincipal(t, b, o, o.User)
			},
			"notes:read"},
		{"hybrid token exchange", ModeHybrid, nil, testenv.TokenExchangeGrantType,
			func(t *testing.T, b *Broker, o *testenv.OP) (*idp.Principal, string) {
				who, _ := hybridPrincipal(t, b, o, o.User)
				return who, "broker-token"
			}, "notes:read"},
		{"hybrid refresh", ModeHybrid, []testenv.OPOption{testenv.WithoutTokenExchangeAdvertised()}, "refresh_token",
			func(t *testing.T, b *Broker, o *testenv.OP) (*idp.Principal, string) {
				who, _ := hybridPrincipal(t, b, o, o.User, "nextcloud")
				return who, "broker-token"
			}, "notes:read notes:write offline_access openid"}, // one set per session: the whole grant
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := testenv.StartOP(t, tc.opts...)
			records, counter := countedRecords(t.TempDir())
			b := newTestBroker(t, o, delegating(tc.mode, "", records))
			who, raw := tc.principal(t, b, o)
			need := []string{"notes:read"}
			o.ResetCounts()

			const n = 100
			headers := make([]string, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					w, h, ok := delegate(context.Background(), b, who, raw, need)
					if !ok {
						t.Errorf("request %d: %d %s", i, w.Code, w.Body.String())
					}
					headers[i] = h
				})
			}
			wg.Wait()
			if got := o.Count(tc.grant); got != 1 {
				t.Errorf("%d cold requests made %d %s grants, want 1", n, got, tc.grant)
			}
			for i, h := range headers {
				if h != headers[0] {
					t.Fatalf("request %d got another token", i)
				}
			}
			c := delegatedClaims(t, o, strings.TrimPrefix(headers[0], "Bearer "))
			if !slices.Equal(c.Audience, []string{"nextcloud"}) || c.Scope != tc.wantScopes || c.Subject != o.User.Subject {
				t.Errorf("delegated token: aud %v scope %q sub %q, want scope %q", c.Audience, c.Scope, c.Subject, tc.wantScopes)
			}
			if strings.Contains(headers[0], raw) {
				t.Error("the client's token was passed on")
			}

			o.ResetCounts()
			reads, locks := counter.reads.Load(), counter.locks.Load()
			for range n {
				if h := mustDelegate(t, b, who, raw, need); "Bearer "+h != headers[0] {
					t.Fatal("a warm request got another token")
				}
			}
			if got := tokenGrants(o) + o.Count(testenv.CountJWKS); got != 0 {
				t.Errorf("%d warm requests made %d IdP calls", n, got)
			}
			if got := counter.reads.Load() - reads + counter.locks.Load() - locks; got != 0 {
				t.Errorf("%d warm requests made %d storage reads and locks", n, got)
			}
		})
	}
}

func TestDelegationWaitersOutliveCanceledLeader(t *testing.T) {
	o := testenv.StartOP(t)
	b := newTestBroker(t, o, delegating(ModeProgressive, DelegationTokenExchange))
	who, raw := progressivePrincipal(t, b, o, o.User)
	mustDelegate(t, b, who, raw, []string{"notes:write"}) // discovery done
	o.ResetCounts()
	o.SetLatency(300 * time.Millisecond)

	leaderCtx, cancelLeader := context.WithCancel(context.Background())
	leaderDone := make(chan *httptest.ResponseRecorder)
	go func() {
		w, _, _ := delegate(leaderCtx, b, who, raw, nil)
		leaderDone <- w
	}()
	for b.delegation.cache.flightCount() == 0 {
		time.Sleep(time.Millisecond)
	}
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() {
			if w, _, ok := delegate(context.Background(), b, who, raw, nil); !ok {
				t.Errorf("waiter: %d %s", w.Code, w.Body.String())
			}
		})
	}
	time.Sleep(20 * time.Millisecond) // the waiters join the flight
	cancelLeader()
	if w := <-leaderDone; w.Code != http.StatusServiceUnavailable {
		t.Errorf("the canceled leader got %d", w.Code)
	}
	wg.Wait()
	if got := o.Count(testenv.TokenExchangeGrantType); got != 1 {
		t.Errorf("%d token exchanges, want 1", got)
	}
}

func TestDelegationHybridTokenExchange(t *testing.T) {
	o := testenv.StartOP(t)
	b := newTestBroker(t, o, delegating(ModeHybrid, DelegationTokenExchange))

	t.Run("read and write calls get their own scopes, never the session's token", func(t *testing.T) {
		who, idp := hybridPrincipal(t, b, o, o.User)
		for need, want := range map[string]string{"notes:read": "notes:read", "notes:write": "notes:write", "": "notes:read notes:write offline_access openid"} {
			tok := mustDelegate(t, b, who, "broker-token", strings.Fields(need))
			if tok == idp.AccessToken {
				t.Fatal("the session's IdP token was passed on")
			}
			if c := delegatedClaims(t, o, tok); c.Scope != want || !slices.Equal(c.Audience, []string{"nextcloud"}) {
				t.Errorf("need %q: scope %q aud %v, want %q", need, c.Scope, c.Audience, want)
			}
		}
	})
	t.Run("an expired IdP token is refreshed first, and the rotation stored", func(t *testing.T) {
		who, idp := hybridPrincipal(t, b, o, o.User)
		expireSessionToken(t, b, who.SessionID)
		o.ResetCounts()
		tok := mustDelegate(t, b, who, "broker-token", []string{"notes:read"})
		if r, x := o.Count("refresh_token"), o.Count(testenv.TokenExchangeGrantType); r != 1 || x != 1 {
			t.Errorf("%d refreshes, %d exchanges; want 1, 1", r, x)
		}
		if c := delegatedClaims(t, o, tok); c.Scope != "notes:read" {
			t.Errorf("scope %q", c.Scope)
		}
		g := storedGrant(t, b, who.SessionID)
		if g.RefreshToken == idp.RefreshToken || g.AccessToken == idp.AccessToken || len(g.AccessTokenScopes) != 0 {
			t.Error("the session's grant was not replaced by the refreshed one")
		}
		if !g.Expiry.After(time.Now()) {
			t.Errorf("stored expiry %v", g.Expiry)
		}
		if _, err := refreshAt(o, idp.RefreshToken); err == nil {
			t.Error("the OP still takes the rotated-away refresh token")
		}
		if _, err := refreshAt(o, g.RefreshToken); err != nil {
			t.Errorf("the stored refresh token does not work: %v", err)
		}
	})
	t.Run("a refused subject of unknown lifetime is refreshed once and exchanged again", func(t *testing.T) {
		who, idp := hybridPrincipal(t, b, o, o.User)
		s, err := b.sessions.load(context.Background(), who.SessionID)
		if err != nil {
			t.Fatal(err)
		}
		// A login answer without expires_in, and a token the OP no longer takes.
		if err := b.sessions.rotateGrant(context.Background(), s, IdPGrant{Token: oauth2.Token{AccessToken: "revoked", RefreshToken: idp.RefreshToken}, Scopes: delegationLoginScopes}); err != nil {
			t.Fatal(err)
		}
		o.ResetCounts()
		tok := mustDelegate(t, b, who, "broker-token", []string{"notes:write"})
		if r, x := o.Count("refresh_token"), o.Count(testenv.TokenExchangeGrantType); r != 1 || x != 2 {
			t.Errorf("%d refreshes, %d exchanges; want 1, 2", r, x)
		}
		if c := delegatedClaims(t, o, tok); c.Scope != "notes:write" {
			t.Errorf("scope %q", c.Scope)
		}
	})
	t.Run("a subject the IdP will not exchange gets 401", func(t *testing.T) {
		who, _ := hybridPrincipal(t, b, o, o.RestrictedUser)
		w, h, ok := delegate(context.Background(), b, who, "broker-token", nil)
		if ok || h != "" || w.Code != http.StatusUnauthorized || !strings.Contains(w.Header().Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Errorf("%d %q %s", w.Code, w.Header().Get("WWW-Authenticate"), w.Body.String())
		}
	})
	t.Run("a session that is gone gets 401", func(t *testing.T) {
		who, _ := hybridPrincipal(t, b, o, o.User)
		if err := b.sessions.end(context.Background(), who.SessionID); err != nil {
			t.Fatal(err)
		}
		w, h, ok := delegate(context.Background(), b, who, "broker-token", nil)
		if ok || h != "" || w.Code != http.StatusUnauthorized || !strings.Contains(w.Header().Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Errorf("%d %q %s", w.Code, w.Header().Get("WWW-Authenticate"), w.Body.String())
		}
	})
	t.Run("evictDelegated forgets a session's tokens at once", func(t *testing.T) {
		who, _ := hybridPrincipal(t, b, o, o.User)
		first := mustDelegate(t, b, who, "broker-token", nil)
		b.evictDelegated(who.SessionID)
		o.ResetCounts()
		if again := mustDelegate(t, b, who, "broker-token", nil); again == first {
			t.Error("the evicted token came back")
		}
		if got := o.Count(testenv.TokenExchangeGrantType); got != 1 {
			t.Errorf("%d exchanges after eviction, want 1", got)
		}
	})
}

// expireSessionToken makes the broker believe the session's IdP access token expired.
func expireSessionToken(tb testing.TB, b *Broker, id string) {
	tb.Helper()
	s, err := b.sessions.load(context.Background(), id)
	if err != nil {
		tb.Fatal(err)
	}
	g, err := b.sessions.grant(s)
	if err != nil {
		tb.Fatal(err)
	}
	g.Expiry = time.Now().Add(-time.Minute)
	if err := b.sessions.rotateGrant(context.Background(), s, g); err != nil {
		tb.Fatal(err)
	}
}

// storedGrant opens the session's grant as it is in storage now.
func storedGrant(tb testing.TB, b *Broker, id string) IdPGrant {
	tb.Helper()
	s, err := b.sessions.load(context.Background(), id)
	if err != nil {
		tb.Fatal(err)
	}
	g, err := b.sessions.grant(s)
	if err != nil {
		tb.Fatal(err)
	}
	return g
}

// refreshAt uses refreshToken at o as the broker's client would.
func refreshAt(o *testenv.OP, refreshToken string) (*oauth2.Token, error) {
	cfg := oauth2.Config{ClientID: testenv.BrokerClientID, ClientSecret: testenv.BrokerClientSecret, Endpoint: o.Endpoint()}
	return cfg.TokenSource(context.Background(), &oauth2.Token{RefreshToken: refreshToken}).Token()
}

// TestDelegationNeverWidensScopes: in hybrid mode the session's IdP grant holds every
// configured scope, while the client's broker token may hold fewer (SECURITY.md S1.5). A
// call by a client that holds none of the delegation scopes must not get the upstream a
// token carrying the IdP grant's scopes (token exchange without `scope`, RFC 8693 §2.1,
// or a refresh of the whole grant, RFC 6749 §6): it is refused for step-up instead.
func TestDelegationNeverWidensScopes(t *testing.T) {
	for _, tc := range []struct {
		name, mode string
		opts       []testenv.OPOption
		resources  []string
	}{
		{"token exchange", DelegationTokenExchange, nil, nil},
		{"refresh", DelegationRefresh, []testenv.OPOption{testenv.WithoutTokenExchangeAdvertised()}, []string{"nextcloud"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := testenv.StartOP(t, tc.opts...)
			b := newTestBroker(t, o, delegating(ModeHybrid, tc.mode))
			who, _ := hybridPrincipal(t, b, o, o.User, tc.resources...)
			// The client consented to identity scopes only.
			who.Scopes = []string{"openid"}

			w, h, ok := delegate(context.Background(), b, who, "broker-token", nil)
			if ok {
				c := delegatedClaims(t, o, strings.TrimPrefix(h, "Bearer "))
				if strings.Contains(c.Scope, "notes:") {
					t.Fatalf("a client holding %v got the upstream a token with scope %q", who.Scopes, c.Scope)
				}
				return
			}
			if w.Code != http.StatusForbidden || !strings.Contains(w.Header().Get("WWW-Authenticate"), `error="insufficient_scope"`) {
				t.Errorf("%d %q %s, want 403 insufficient_scope", w.Code, w.Header().Get("WWW-Authenticate"), w.Body.String())
			}
		})
	}
}

// TestDelegationWholeGrant: a call no tool_scope rule covers gets the client's whole
// grant, identity scopes included (an upstream may show tools by them); delegation.scopes,
// when configured, keeps its meaning; `narrow none` gives every call the whole grant.
func TestDelegationWholeGrant(t *testing.T) {
	whole := "notes:read notes:write offline_access openid" // delegationLoginScopes, sorted
	for _, tc := range []struct {
		name      string
		opts      []testenv.OPOption
		mode      string
		change    func(*Config)
		resources []string
		// want is the scope of the delegated token for a call without a rule, and for
		// the notes_read tool call.
		wantOther, wantTool string
		// shared: both calls use one token (one IdP call for both).
		shared bool
	}{
		{"token exchange, by default", nil, DelegationTokenExchange, nil, nil, whole, "notes:read", false},
		{"token exchange, delegation.scopes configured", nil, DelegationTokenExchange,
			func(c *Config) { c.DelegationScopes = []string{"notes:write"} }, nil, "notes:write", "notes:read", false},
		{"token exchange, narrow none", nil, DelegationTokenExchange,
			func(c *Config) { c.DelegationNarrow = DelegationNarrowNone }, nil, whole, whole, true},
		{"refresh, by default", []testenv.OPOption{testenv.WithoutTokenExchangeAdvertised()}, DelegationRefresh, nil,
			[]string{"nextcloud"}, whole, whole, true},
		{"refresh, narrow none", []testenv.OPOption{testenv.WithoutTokenExchangeAdvertised()}, DelegationRefresh,
			func(c *Config) { c.DelegationNarrow = DelegationNarrowNone }, []string{"nextcloud"}, whole, whole, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := testenv.StartOP(t, tc.opts...)
			var more []func(*Config)
			if tc.change != nil {
				more = append(more, tc.change)
			}
			b := newTestBroker(t, o, delegating(ModeHybrid, tc.mode, more...))
			who, _ := hybridPrincipal(t, b, o, o.User, tc.resources...)
			o.ResetCounts()
			other := mustDelegate(t, b, who, "broker-token", nil)
			if c := delegatedClaims(t, o, other); c.Scope != tc.wantOther {
				t.Errorf("a call without a rule: scope %q, want %q", c.Scope, tc.wantOther)
			}
			tool := mustDelegate(t, b, who, "broker-token", []string{"notes:read"})
			if c := delegatedClaims(t, o, tool); c.Scope != tc.wantTool {
				t.Errorf("the notes_read call: scope %q, want %q", c.Scope, tc.wantTool)
			}
			if calls := tokenGrants(o); (tool == other) != tc.shared || (calls == 1) != tc.shared {
				t.Errorf("one token for both calls: %v after %d IdP calls, want %v", tool == other, calls, tc.shared)
			}
		})
	}
	t.Run("a client granted nothing gets 403, and the IdP is not asked", func(t *testing.T) {
		o := testenv.StartOP(t)
		b := newTestBroker(t, o, delegating(ModeHybrid, DelegationTokenExchange,
			func(c *Config) { c.Scopes = []string{"openid", "notes:read"} }))
		who, _ := hybridPrincipal(t, b, o, o.User)
		who.Scopes = nil
		o.ResetCounts()
		w, _, ok := delegate(context.Background(), b, who, "broker-token", nil)
		if ok || w.Code != http.StatusForbidden || !strings.Contains(w.Header().Get("WWW-Authenticate"), `scope="openid notes:read"`) {
			t.Errorf("%d %q, want 403 with a step-up to the configured scopes", w.Code, w.Header().Get("WWW-Authenticate"))
		}
		if n := tokenGrants(o); n != 0 {
			t.Errorf("%d IdP calls", n)
		}
	})
	t.Run("token exchange: a client granted no openid still gets the session's openid on calls no rule covers", func(t *testing.T) {
		// The login asked the IdP for openid whatever the client asked (idpLoginScopes),
		// and the refresh grant hands it on with the rest of the session's grant; the
		// Nextcloud MCP server gates its provisioning tools on it.
		o := testenv.StartOP(t)
		b := newTestBroker(t, o, delegating(ModeHybrid, DelegationTokenExchange))
		who, _ := hybridPrincipal(t, b, o, o.User)
		who.Scopes = []string{"notes:read"}
		if c := delegatedClaims(t, o, mustDelegate(t, b, who, "broker-token", nil)); c.Scope != "notes:read openid" {
			t.Errorf("a call without a rule: scope %q, want %q", c.Scope, "notes:read openid")
		}
		if c := delegatedClaims(t, o, mustDelegate(t, b, who, "broker-token", []string{"notes:read"})); c.Scope != "notes:read" {
			t.Errorf("the notes_read call: scope %q, want notes:read alone", c.Scope)
		}
	})
	t.Run("narrow is checked", func(t *testing.T) {
		o := testenv.SharedOP(t)
		for narrow, want := range map[string]string{
			"all":                `delegation: narrow: unknown value "all"; want tool_calls or none`,
			DelegationNarrowNone: "delegation: scopes are never delegated with narrow none, where every call gets the client's whole grant; remove one of them",
		} {
			_, err := New(Config{Issuer: o.Issuer, Resource: testResource, DelegationNarrow: narrow, DelegationScopes: []string{"notes:read"},
				Records: storage.New(&certmagic.FileStorage{Path: t.TempDir()}, nil)})
			if err == nil || err.Error() != want {
				t.Errorf("narrow %q: %v, want %q", narrow, err, want)
			}
		}
	})
}
