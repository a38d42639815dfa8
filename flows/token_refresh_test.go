package flows

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

func TestRefreshGrant(t *testing.T) {
	o := testenv.SharedOP(t)
	e := newTokenEnv(t, o, nil)

	t.Run("a refresh token works at once after the exchange and rotates", func(t *testing.T) {
		first := e.login(t)
		next := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
		if next.AccessToken == first.AccessToken || next.RefreshToken == first.RefreshToken {
			t.Fatal("the refresh did not rotate the pair")
		}
		if next.TokenType != "Bearer" || next.ExpiresIn != int64(e.b.cfg.AccessTokenTTL/time.Second) || next.Scope != "openid notes:read notes:write" {
			t.Errorf("token response %d %q %q", next.ExpiresIn, next.TokenType, next.Scope)
		}
		if st := e.mcpStatus(t, next.AccessToken); st != http.StatusOK {
			t.Errorf("refreshed access token: %d", st)
		}
		// The rotated pair refreshes in turn.
		e.refresh(t, testenv.NativeClientID, next.RefreshToken, nil).wantTokens(t)
	})

	t.Run("20 concurrent refreshes with one token rotate it once and all get the same valid pair", func(t *testing.T) {
		first := e.login(t)
		before := e.countRecords(t, kindTokenPair)
		results := make([]endpointReply, 20)
		var wg sync.WaitGroup
		for i := range results {
			wg.Go(func() {
				var err error
				results[i], err = e.postE(t.Context(), pathToken, url.Values{
					"grant_type": {"refresh_token"}, "client_id": {testenv.NativeClientID}, "refresh_token": {first.RefreshToken},
				}, nil)
				if err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		want := results[0].wantTokens(t)
		for i, r := range results {
			got := r.wantTokens(t)
			if got.AccessToken != want.AccessToken || got.RefreshToken != want.RefreshToken {
				t.Errorf("caller %d got another pair", i)
			}
		}
		if n := e.countRecords(t, kindTokenPair) - before; n != 1 {
			t.Errorf("%d refresh tokens stored by the refreshes, want 1 successor", n)
		}
		if st := e.mcpStatus(t, want.AccessToken); st != http.StatusOK {
			t.Errorf("the shared access token: %d", st)
		}
		e.refresh(t, testenv.NativeClientID, want.RefreshToken, nil).wantTokens(t)
	})

	t.Run("a retry within the grace window gets the same pair", func(t *testing.T) {
		first := e.login(t)
		next := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
		e.clock.Advance(e.b.cfg.RefreshGrace / 2)
		again := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
		if again.AccessToken != next.AccessToken || again.RefreshToken != next.RefreshToken {
			t.Fatal("the retry got another pair")
		}
		if want := next.ExpiresIn - int64(e.b.cfg.RefreshGrace/2/time.Second); again.ExpiresIn != want {
			t.Errorf("expires_in of the repeated pair %d, want %d", again.ExpiresIn, want)
		}
		if st := e.mcpStatus(t, again.AccessToken); st != http.StatusOK {
			t.Errorf("repeated access token: %d", st)
		}
	})

	t.Run("reuse after the grace window revokes the family at once", func(t *testing.T) {
		first := e.login(t)
		next := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
		e.clock.Advance(e.b.cfg.RefreshGrace + time.Second)
		// Warm this node's cache, so that only the revocation's eviction can stop the tokens.
		for _, at := range []string{first.AccessToken, next.AccessToken} {
			if st := e.mcpStatus(t, at); st != http.StatusOK {
				t.Fatalf("access token before the reuse: %d", st)
			}
		}
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		for _, at := range []string{first.AccessToken, next.AccessToken} {
			if st := e.mcpStatus(t, at); st != http.StatusUnauthorized {
				t.Errorf("access token of the family after the reuse: %d, want 401", st)
			}
		}
		e.refresh(t, testenv.NativeClientID, next.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})

	t.Run("another client's refresh token is invalid_grant and stays usable by its own", func(t *testing.T) {
		first := e.login(t)
		e.refresh(t, tokenTestOtherClient, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
	})

	t.Run("resource: the bound one passes, another is invalid_target", func(t *testing.T) {
		first := e.login(t)
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, func(f url.Values) { f.Set("resource", "https://other.example/mcp") }).
			wantError(t, http.StatusBadRequest, "invalid_target")
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, func(f url.Values) { f.Set("resource", testResource) }).wantTokens(t)
	})

	t.Run("scope may narrow the access token, never widen it; the refresh token keeps the grant", func(t *testing.T) {
		first := e.login(t)
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, func(f url.Values) { f.Set("scope", "openid admin") }).
			wantError(t, http.StatusBadRequest, "invalid_scope")
		narrow := e.refresh(t, testenv.NativeClientID, first.RefreshToken, func(f url.Values) { f.Set("scope", "openid notes:read") }).wantTokens(t)
		if narrow.Scope != "openid notes:read" {
			t.Errorf("narrowed scope %q", narrow.Scope)
		}
		p, err := e.b.verifyBrokerToken(t.Context(), narrow.AccessToken)
		if err != nil || p.ScopeString() != "openid notes:read" {
			t.Errorf("narrowed access token: %v %+v", err, p)
		}
		full := e.refresh(t, testenv.NativeClientID, narrow.RefreshToken, nil).wantTokens(t)
		if full.Scope != "openid notes:read notes:write" {
			t.Errorf("the next refresh's scope %q, want the whole grant", full.Scope)
		}
	})

	t.Run("an expired refresh token is invalid_grant", func(t *testing.T) {
		first := e.login(t)
		e.clock.Advance(e.b.cfg.RefreshTokenTTL)
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})

	t.Run("a refresh token whose session is gone is invalid_grant", func(t *testing.T) {
		first := e.login(t)
		rec := e.storedRefreshToken(t, first.RefreshToken)
		if err := e.b.sessions.end(t.Context(), rec.SessionID); err != nil {
			t.Fatal(err)
		}
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		if st := e.mcpStatus(t, first.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("access token of a family without session: %d, want 401", st)
		}
	})

	for _, tc := range []struct {
		name   string
		token  string
		status int
		code   string
	}{
		{"an unknown refresh token is invalid_grant", refreshTokenPrefix + randomToken(), http.StatusBadRequest, "invalid_grant"},
		{"an access token is not a refresh token", "", http.StatusBadRequest, "invalid_grant"},
		{"garbage is invalid_grant", "garbage", http.StatusBadRequest, "invalid_grant"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := tc.token
			if tok == "" {
				tok = e.login(t).AccessToken
			}
			e.refresh(t, testenv.NativeClientID, tok, nil).wantError(t, tc.status, tc.code)
		})
	}
	t.Run("a missing refresh_token is invalid_request", func(t *testing.T) {
		e.post(t, pathToken, url.Values{"grant_type": {"refresh_token"}, "client_id": {testenv.NativeClientID}}, nil).
			wantError(t, http.StatusBadRequest, "invalid_request")
	})
}

// writeCounter is a certmagic.Storage that counts writes (Store, Delete): instrumentation,
// the file storage underneath does the work.
type writeCounter struct {
	certmagic.Storage
	writes atomic.Int64
}

func (c *writeCounter) Store(ctx context.Context, key string, value []byte) error {
	c.writes.Add(1)
	return c.Storage.Store(ctx, key, value)
}

func (c *writeCounter) Delete(ctx context.Context, key string) error {
	c.writes.Add(1)
	return c.Storage.Delete(ctx, key)
}

// Clients repeat refreshes (lost answers, parallel processes of one CLI, hosted clients
// refreshing from several addresses): within the grace window a repeat gets the pair the
// first refresh yielded and writes nothing; once the successor has been used, or the window
// has passed, a repeat is reuse and ends the grant (SECURITY.md, refresh token reuse).
func TestRefreshRepeats(t *testing.T) {
	counter := &writeCounter{Storage: &certmagic.FileStorage{Path: t.TempDir()}}
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, storage.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	e := newTokenEnv(t, testenv.SharedOP(t), func(c *Config) { c.Records = storage.New(counter, ring) })

	t.Run("repeats within the window get the same pair, write nothing and are logged at Info", func(t *testing.T) {
		first := e.login(t)
		next := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
		before := counter.writes.Load()
		for range 5 {
			again := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
			if again.AccessToken != next.AccessToken || again.RefreshToken != next.RefreshToken {
				t.Fatal("a repeat got another pair")
			}
		}
		if n := counter.writes.Load() - before; n != 0 {
			t.Errorf("5 repeats wrote %d times, want none", n)
		}
		repeats := e.logs.FilterMessage("repeated refresh within the grace window; answering with the same pair").
			FilterField(zap.String("refresh_token", Fingerprint(first.RefreshToken))).All()
		if len(repeats) != 5 || repeats[0].Level != zap.InfoLevel {
			t.Errorf("%d repeat log entries (want 5 at Info)", len(repeats))
		}
	})

	t.Run("a repeat after the successor was used is reuse: the family is revoked", func(t *testing.T) {
		first := e.login(t)
		next := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
		third := e.refresh(t, testenv.NativeClientID, next.RefreshToken, nil).wantTokens(t)
		if st := e.mcpStatus(t, third.AccessToken); st != http.StatusOK { // warm the cache
			t.Fatalf("access token before the reuse: %d", st)
		}
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		if st := e.mcpStatus(t, third.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("access token of the family after the reuse: %d, want 401", st)
		}
		e.refresh(t, testenv.NativeClientID, third.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		if n := len(e.logs.FilterMessage("rotated refresh token reused; revoking its family").
			FilterField(zap.String("refresh_token", Fingerprint(first.RefreshToken))).All()); n != 1 {
			t.Errorf("%d reuse log entries, want 1", n)
		}
	})

	t.Run("a repeat asking other scopes is invalid_scope, not the pair", func(t *testing.T) {
		first := e.login(t)
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, func(f url.Values) { f.Set("scope", "openid notes:read") }).
			wantError(t, http.StatusBadRequest, "invalid_scope")
		// The same scopes in another order and form are the same request.
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, func(f url.Values) { f.Set("scope", "notes:write openid  notes:read") }).
			wantTokens(t)

		narrowed := e.login(t)
		e.refresh(t, testenv.NativeClientID, narrowed.RefreshToken, func(f url.Values) { f.Set("scope", "openid notes:read") }).wantTokens(t)
		e.refresh(t, testenv.NativeClientID, narrowed.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_scope")
	})
}

// A grant refreshed faster than any client needs gets 429 instead of writing more records;
// repeats within the grace window write nothing and do not count.
func TestRefreshRateLimitPerGrant(t *testing.T) {
	const perMinute = 30 // the documented limit (README, "Hybrid mode")
	e := newTokenEnv(t, testenv.SharedOP(t), nil)
	tok := e.login(t)
	for i := range perMinute {
		next := e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
		if i%2 == 0 {
			e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t) // a repeat
		}
		tok = next
	}
	before := e.countRecords(t, kindTokenPair)
	res := e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil)
	res.wantError(t, http.StatusTooManyRequests, "temporarily_unavailable")
	if ra, err := strconv.Atoi(res.header.Get("Retry-After")); err != nil || ra < 1 || ra > 60 {
		t.Errorf("Retry-After %q", res.header.Get("Retry-After"))
	}
	if n := e.countRecords(t, kindTokenPair) - before; n != 0 {
		t.Errorf("the refused refresh stored %d refresh tokens", n)
	}
	// Another grant is not limited, and this one recovers.
	other := e.login(t)
	e.refresh(t, testenv.NativeClientID, other.RefreshToken, nil).wantTokens(t)
	e.clock.Advance(time.Minute)
	e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
}

// With delegation none nothing else asks the IdP: the broker's refresh confirms the
// session's IdP grant at least every IdPConfirmInterval, and a grant revoked at the IdP
// ends the session with its broker tokens (SECURITY.md, revocation at the IdP).
func TestRefreshConfirmsIdPGrant(t *testing.T) {
	o := testenv.StartOP(t) // its own counts and outages
	e := newTokenEnv(t, o, nil)
	idpRefreshes := func() int { return o.Count("refresh_token") }
	sessionGrant := func(t *testing.T, rt string) (*Session, IdPGrant) {
		t.Helper()
		s, err := e.b.sessions.load(t.Context(), e.storedRefreshToken(t, rt).SessionID)
		if err != nil {
			t.Fatal(err)
		}
		g, err := e.b.sessions.grant(s)
		if err != nil {
			t.Fatal(err)
		}
		return s, g
	}

	t.Run("a refresh within the interval does not ask the IdP", func(t *testing.T) {
		tok := e.login(t)
		n := idpRefreshes()
		e.clock.Advance(5 * time.Minute)
		e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
		if got := idpRefreshes() - n; got != 0 {
			t.Errorf("%d refreshes at the IdP, want none", got)
		}
	})

	t.Run("a grant revoked at the IdP ends the session at the next confirming refresh, with its tokens", func(t *testing.T) {
		tok := e.login(t)
		s, g := sessionGrant(t, tok.RefreshToken)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK { // warm the cache
			t.Fatalf("access token before the revocation: %d", st)
		}
		revokeAtOP(t, o, g.RefreshToken)
		e.clock.Advance(11 * time.Minute)
		e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("access token after the IdP revoked the grant: %d, want 401", st)
		}
		if _, err := e.b.sessions.load(t.Context(), s.ID); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("the session is still stored: %v", err)
		}
		e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})

	t.Run("a user disabled at the IdP is signed out at the next confirming refresh", func(t *testing.T) {
		tok := e.login(t)
		o.DisableUser(o.User, true)
		defer o.DisableUser(o.User, false)
		// Confirmed at the login: within the interval the broker does not ask.
		next := e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
		e.clock.Advance(11 * time.Minute)
		e.refresh(t, testenv.NativeClientID, next.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		if st := e.mcpStatus(t, next.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("access token of a disabled user: %d, want 401", st)
		}
	})

	t.Run("a confirming refresh stores the IdP's rotated refresh token", func(t *testing.T) {
		tok := e.login(t)
		_, before := sessionGrant(t, tok.RefreshToken)
		e.clock.Advance(11 * time.Minute)
		n := idpRefreshes()
		next := e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
		if got := idpRefreshes() - n; got != 1 {
			t.Fatalf("%d refreshes at the IdP, want 1", got)
		}
		s, after := sessionGrant(t, next.RefreshToken)
		if after.RefreshToken == before.RefreshToken || after.RefreshToken == "" {
			t.Error("the IdP's rotated refresh token was not stored")
		}
		if !s.ConfirmedAt.Equal(e.clock.Now()) {
			t.Errorf("confirmed at %v, want now", s.ConfirmedAt)
		}
		e.remember(after.AccessToken, after.RefreshToken, after.IDToken)
		// Confirmed just now: the next refresh does not ask again.
		e.clock.Advance(time.Minute)
		e.refresh(t, testenv.NativeClientID, next.RefreshToken, nil).wantTokens(t)
		if got := idpRefreshes() - n; got != 1 {
			t.Errorf("%d refreshes at the IdP, want still 1", got)
		}
	})

	t.Run("an IdP that is down does not end the session; the next refresh confirms", func(t *testing.T) {
		tok := e.login(t)
		e.clock.Advance(11 * time.Minute)
		o.SetDown(true)
		next := e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil)
		o.SetDown(false)
		got := next.wantTokens(t)
		n := idpRefreshes()
		e.clock.Advance(time.Minute)
		e.refresh(t, testenv.NativeClientID, got.RefreshToken, nil).wantTokens(t)
		if d := idpRefreshes() - n; d != 1 {
			t.Errorf("%d refreshes at the IdP after the outage, want 1", d)
		}
	})

	t.Run("the session's absolute lifetime ends it: refreshes cannot extend it", func(t *testing.T) {
		tok := e.login(t)
		e.clock.Advance(20 * 24 * time.Hour)
		tok = e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
		e.clock.Advance(10*24*time.Hour - 30*time.Minute)
		tok = e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
		if tok.ExpiresIn > int64(30*time.Minute/time.Second) {
			t.Errorf("an access token issued 30 min before the session ends lives %d s", tok.ExpiresIn)
		}
		if rec := e.storedRefreshToken(t, tok.RefreshToken); rec.Expiry.After(e.clock.Now().Add(30 * time.Minute)) {
			t.Errorf("a refresh token issued 30 min before the session ends lives until %v", rec.Expiry)
		}
		e.clock.Advance(31 * time.Minute)
		e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})
	e.assertNoSecretsLogged(t)
}

// revokeAtOP revokes a refresh token at o (RFC 7009) as the broker's client, as an admin
// or the user would end the grant there.
func revokeAtOP(t *testing.T, o *testenv.OP, rt string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, o.RevocationEndpoint,
		strings.NewReader(url.Values{"token": {rt}, "token_type_hint": {"refresh_token"}}.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(testenv.BrokerClientID, testenv.BrokerClientSecret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revoking at the OP: %s", resp.Status)
	}
}

// A scope the IdP withdraws after the login (an administrator takes notes:write from the
// user or the client) is gone from the grant the next confirming refresh sees: the broker
// must not keep issuing it from its own refresh tokens until the session's lifetime ends.
func TestRefreshNarrowsToTheConfirmedGrant(t *testing.T) {
	o := testenv.StartOP(t)
	e := newTokenEnv(t, o, nil)
	tok := e.login(t)
	if !slices.Contains(strings.Fields(tok.Scope), "notes:write") {
		t.Fatalf("login scope %q", tok.Scope)
	}
	o.SetTokenAnswerFault(testenv.SetAnswerScope("refresh_token", "openid offline_access notes:read"))
	defer o.SetTokenAnswerFault(nil)
	e.clock.Advance(11 * time.Minute)
	next := e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
	if slices.Contains(strings.Fields(next.Scope), "notes:write") {
		t.Errorf("after the IdP withdrew notes:write, a refresh still grants %q", next.Scope)
	}
	e.remember(next.AccessToken, next.RefreshToken)
	// Nor may the next refresh, within the interval, ask for it back.
	e.clock.Advance(time.Minute)
	e.refresh(t, testenv.NativeClientID, next.RefreshToken, func(f url.Values) { f.Set("scope", "notes:write") }).
		wantError(t, http.StatusBadRequest, "invalid_scope")
}
