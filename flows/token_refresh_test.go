package flows

import (
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

func TestRefreshGrant(t *testing.T) {
	o := verifierOP(t)
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
		before := e.countRecords(t, kindRefreshToken)
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
		if n := e.countRecords(t, kindRefreshToken) - before; n != 1 {
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
		e.clock.advance(e.b.cfg.RefreshGrace / 2)
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
		e.clock.advance(e.b.cfg.RefreshGrace + time.Second)
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
		e.clock.advance(e.b.cfg.RefreshTokenTTL)
		e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})

	t.Run("a refresh token whose session is gone is invalid_grant", func(t *testing.T) {
		first := e.login(t)
		rec := e.storedRefreshToken(t, first.RefreshToken)
		if err := e.b.deleteSession(t.Context(), rec.SessionID); err != nil {
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
