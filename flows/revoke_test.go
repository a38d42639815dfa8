package flows

import (
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// revoke posts an RFC 7009 revocation as clientID.
func (e *tokenEnv) revoke(t *testing.T, clientID, token, hint string) endpointReply {
	t.Helper()
	form := url.Values{"client_id": {clientID}, "token": {token}}
	if hint != "" {
		form.Set("token_type_hint", hint)
	}
	return e.post(t, pathRevoke, form, nil)
}

func (r endpointReply) wantOK(t *testing.T) {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("got %d %q, want 200", r.status, r.err.Error)
	}
	if cc := r.header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control %q", cc)
	}
}

func TestRevoke(t *testing.T) {
	o := testenv.StartOP(t) // counts its revocations
	e := newTokenEnv(t, o, nil)

	t.Run("revoking the access token stops the family and ends the session at the IdP", func(t *testing.T) {
		tok := e.login(t)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK { // warm the cache
			t.Fatalf("access token: %d", st)
		}
		sessionID := e.storedRefreshToken(t, tok.RefreshToken).SessionID
		revokes := o.Count(testenv.CountRevoke)
		e.revoke(t, testenv.NativeClientID, tok.AccessToken, "access_token").wantOK(t)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("access token after revocation: %d, want 401", st)
		}
		e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		if n := o.Count(testenv.CountRevoke) - revokes; n != 1 {
			t.Errorf("the IdP's revocation endpoint was called %d times, want 1", n)
		}
		if _, err := e.b.sessions.load(t.Context(), sessionID); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("session after revocation: %v, want gone", err)
		}
	})

	t.Run("revoking the refresh token stops refreshing and the access token", func(t *testing.T) {
		tok := e.login(t)
		revokes := o.Count(testenv.CountRevoke)
		e.revoke(t, testenv.NativeClientID, tok.RefreshToken, "").wantOK(t)
		e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("access token after revoking the refresh token: %d, want 401", st)
		}
		if o.Count(testenv.CountRevoke) == revokes {
			t.Error("the IdP grant was not revoked")
		}
	})

	t.Run("a wrong hint does not matter", func(t *testing.T) {
		tok := e.login(t)
		e.revoke(t, testenv.NativeClientID, tok.RefreshToken, "access_token").wantOK(t)
		e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})

	t.Run("revoking twice is 200 both times", func(t *testing.T) {
		tok := e.login(t)
		e.revoke(t, testenv.NativeClientID, tok.AccessToken, "").wantOK(t)
		e.revoke(t, testenv.NativeClientID, tok.AccessToken, "").wantOK(t)
	})

	t.Run("another client's token is answered 200 and nothing is revoked", func(t *testing.T) {
		tok := e.login(t)
		revokes := o.Count(testenv.CountRevoke)
		e.revoke(t, tokenTestOtherClient, tok.AccessToken, "").wantOK(t)
		e.revoke(t, tokenTestOtherClient, tok.RefreshToken, "").wantOK(t)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
			t.Errorf("access token after another client's revocation: %d", st)
		}
		e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
		if o.Count(testenv.CountRevoke) != revokes {
			t.Error("the IdP grant was revoked")
		}
	})

	for _, tc := range []struct{ name, token string }{
		{"an unknown access token is answered 200", accessTokenPrefix + randomToken()},
		{"an unknown refresh token is answered 200", refreshTokenPrefix + randomToken()},
		{"garbage is answered 200", "garbage"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.revoke(t, testenv.NativeClientID, tc.token, "").wantOK(t)
		})
	}

	t.Run("a missing token is invalid_request", func(t *testing.T) {
		e.post(t, pathRevoke, url.Values{"client_id": {testenv.NativeClientID}}, nil).wantError(t, http.StatusBadRequest, "invalid_request")
	})

	t.Run("an unauthenticated client is invalid_client, with a Basic challenge when it tried Basic", func(t *testing.T) {
		tok := e.login(t)
		e.post(t, pathRevoke, url.Values{"token": {tok.AccessToken}}, nil).wantError(t, http.StatusUnauthorized, "invalid_client")
		r := e.post(t, pathRevoke, url.Values{"token": {tok.AccessToken}},
			http.Header{"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte("nobody:x"))}})
		r.wantError(t, http.StatusUnauthorized, "invalid_client")
		if r.header.Get("WWW-Authenticate") == "" {
			t.Error("no Basic challenge")
		}
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
			t.Errorf("access token after refused revocations: %d", st)
		}
	})

	t.Run("an IdP that cannot be reached does not stop the revocation", func(t *testing.T) {
		tok := e.login(t)
		o.SetDown(true)
		defer o.SetDown(false)
		e.revoke(t, testenv.NativeClientID, tok.RefreshToken, "").wantOK(t)
		o.SetDown(false)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("access token: %d, want 401", st)
		}
	})
}

// sessionCacheEntries counts this node's cached delegated tokens of session.
func sessionCacheEntries(b *Broker, session string) int {
	return b.delegation.cache.entries.Count(func(e delegatedEntry) bool { return e.session == session })
}

// TestRevocationEvictsDelegatedTokens: every way a session ends by revocation (RFC 7009
// revocation, refresh token reuse, code replay) drops the session's delegated tokens on
// this node at once (SECURITY.md, revocation row): a request that passed the token check
// just before the revocation finds no cached delegated token and gets 401, and the cache
// holds nothing of the session.
func TestRevocationEvictsDelegatedTokens(t *testing.T) {
	o := testenv.StartOP(t)
	e := newTokenEnv(t, o, delegating(ModeHybrid, DelegationTokenExchange))
	e.front = startFront(t, e.b, delegationUpstream(t, o).URL)

	for _, tc := range []struct {
		name   string
		revoke func(t *testing.T, tok TokenResponse, code, verifier string)
	}{
		{"revocation endpoint", func(t *testing.T, tok TokenResponse, _, _ string) {
			e.revoke(t, testenv.NativeClientID, tok.RefreshToken, "").wantOK(t)
		}},
		{"refresh token reused after the grace window", func(t *testing.T, tok TokenResponse, _, _ string) {
			e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
			e.clock.Advance(e.b.cfg.RefreshGrace + time.Second)
			e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		}},
		{"code replayed", func(t *testing.T, _ TokenResponse, code, verifier string) {
			e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, verifier := e.code(t, testenv.NativeClientID)
			tok := e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
			if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK { // caches a delegated token
				t.Fatalf("access token: %d", st)
			}
			// A request that passed the token check just before the revocation.
			who, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken)
			if err != nil {
				t.Fatal(err)
			}
			if n := sessionCacheEntries(e.b, who.SessionID); n == 0 {
				t.Fatal("no delegated token cached for the session")
			}

			tc.revoke(t, tok, code, verifier)

			if n := sessionCacheEntries(e.b, who.SessionID); n != 0 {
				t.Errorf("%d delegated tokens of the revoked session still cached", n)
			}
			w, h, ok := delegate(t.Context(), e.b, who, tok.AccessToken, nil)
			if ok || h != "" || w.Code != http.StatusUnauthorized {
				t.Errorf("request right after revocation: passed %v, delegated token given %v, status %d, want 401", ok, h != "", w.Code)
			}
			if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
				t.Errorf("access token after revocation: %d, want 401", st)
			}
		})
	}
}
