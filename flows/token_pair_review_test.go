package flows

import (
	"bytes"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// newCodeEnvOn is newCodeEnv on the folder dir, so that two of them are two nodes.
func newCodeEnvOn(t *testing.T, dir string) *tokenEnv {
	t.Helper()
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		t.Fatal(err)
	}
	var e *tokenEnv
	e = newTokenEnv(t, testenv.SharedOP(t), func(c *Config) {
		c.Records = storage.New(&certmagic.FileStorage{Path: dir}, ring, storage.WithClock(func() time.Time { return e.clock.Now() }))
	})
	return e
}

// Two nodes sharing a folder race the redemptions of one code: at most one wins, and
// the family ends revoked on both (every loser is a replay).
func TestCodeRedeemedOnTwoNodesHasOneWinnerWhoseFamilyIsRevoked(t *testing.T) {
	dir := t.TempDir()
	nodes := []*tokenEnv{newCodeEnvOn(t, dir), newCodeEnvOn(t, dir)}
	for round := range 5 {
		code, verifier := nodes[0].code(t, testenv.NativeClientID)
		results := make([]endpointReply, 16)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range results {
			wg.Go(func() {
				<-start
				var err error
				results[i], err = nodes[i%2].postE(t.Context(), pathToken, exchangeForm(testenv.NativeClientID, code, verifier, nil), nil)
				if err != nil {
					t.Error(err)
				}
			})
		}
		close(start)
		wg.Wait()
		won := 0
		for _, r := range results {
			if r.status == http.StatusOK {
				won++
				for _, n := range nodes {
					n.remember(r.tokens.AccessToken, r.tokens.RefreshToken)
					if st := n.mcpStatus(t, r.tokens.AccessToken); st != http.StatusUnauthorized {
						t.Errorf("round %d: the winner's access token: %d, want 401", round, st)
					}
				}
			} else if r.err.Error != "invalid_grant" {
				t.Errorf("round %d: a loser got %d %q", round, r.status, r.err.Error)
			}
		}
		if won > 1 {
			t.Fatalf("round %d: %d redemptions won, want at most 1", round, won)
		}
	}
}

// RFC 7009 with a token that names a live pair but is not one of its tokens (the pair's
// id with another secret, one token's body under the other's prefix) revokes nothing.
func TestTokenPairForgedTokensRevokeNothing(t *testing.T) {
	e := newCodeEnv(t)
	tok := e.login(t)
	other := e.login(t)
	body := func(raw string) string { return raw[len(accessTokenPrefix):] }
	forged := map[string]string{
		"refresh body as access": accessTokenPrefix + body(tok.RefreshToken),
		"access body as refresh": refreshTokenPrefix + body(tok.AccessToken),
		"pair id, other secret":  tok.AccessToken[:len(tok.AccessToken)-22] + other.AccessToken[len(other.AccessToken)-22:],
		"pair id, other refresh": tok.RefreshToken[:len(tok.RefreshToken)-22] + other.RefreshToken[len(other.RefreshToken)-22:],
		"pair id, access secret": refreshTokenPrefix + tok.AccessToken[len(accessTokenPrefix):],
		"pair id, zeroed secret": tok.AccessToken[:len(tok.AccessToken)-22] + "AAAAAAAAAAAAAAAAAAAAAA",
	}
	for name, raw := range forged {
		e.remember(raw)
		if r := e.revoke(t, testenv.NativeClientID, raw, ""); r.status != http.StatusOK {
			t.Errorf("%s: revocation answered %d, want 200", name, r.status)
		}
	}
	if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
		t.Fatalf("the pair's access token after forged revocations: %d, want 200", st)
	}
	e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
}

// Revoking the access token of a pair whose refresh token was rotated ends the family:
// the successor pair stops too (the pair record rewritten by the rotation still names it).
func TestTokenPairRevokingARotatedPairsAccessTokenStopsItsSuccessor(t *testing.T) {
	e := newCodeEnv(t)
	first := e.login(t)
	next := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
	e.revoke(t, testenv.NativeClientID, first.AccessToken, "").wantOK(t)
	if st := e.mcpStatus(t, next.AccessToken); st != http.StatusUnauthorized {
		t.Errorf("the successor's access token: %d, want 401", st)
	}
	e.refresh(t, testenv.NativeClientID, next.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
}

// A token that names a pair but is not one of its tokens reads as no record at all: the
// pair's family, client and subject are not handed out beside the ErrNotFound.
func TestTokenPairForgedTokenReadsNothing(t *testing.T) {
	e := newCodeEnv(t)
	tok := e.login(t)
	forged := tok.AccessToken[:len(tok.AccessToken)-22] + "AAAAAAAAAAAAAAAAAAAAAA"
	at, err := e.b.families.accessToken(t.Context(), forged)
	if !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("accessToken of a forged token: %v, want ErrNotFound", err)
	}
	if at.FamilyID != "" || at.ClientID != "" || at.Subject != "" {
		t.Errorf("accessToken of a forged token handed out the pair's record: %+v", at)
	}
}
