package flows

import (
	"net/http"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// A pair of broker tokens is one record; each token is checked against its own hash, so
// that neither opens the other's part, and a pair id alone opens nothing.
func TestTokenPairIsOneRecordAndEachTokenOpensOnlyItsPart(t *testing.T) {
	e := newCodeEnv(t)
	tok := e.login(t)
	if p, a, r := e.countRecords(t, kindTokenPair), e.countRecords(t, kindAccessToken), e.countRecords(t, kindRefreshToken); p != 1 || a != 0 || r != 0 {
		t.Fatalf("after a login: %d pairs, %d access and %d refresh records; want 1, 0, 0", p, a, r)
	}
	if len(tok.AccessToken) != brokerTokenLength || len(tok.RefreshToken) != brokerTokenLength {
		t.Fatalf("token lengths %d, %d; want %d", len(tok.AccessToken), len(tok.RefreshToken), brokerTokenLength)
	}
	aID, aok := pairTokenID(tok.AccessToken)
	rID, rok := pairTokenID(tok.RefreshToken)
	if !aok || !rok || aID != rID {
		t.Fatalf("the tokens do not name one pair")
	}
	body := func(raw string) string { return raw[len(accessTokenPrefix):] }
	// The refresh token's body under the access prefix, and the other way round.
	asAccess := accessTokenPrefix + body(tok.RefreshToken)
	asRefresh := refreshTokenPrefix + body(tok.AccessToken)
	// The pair's id with a secret of another pair.
	other := e.login(t)
	forged := tok.AccessToken[:len(tok.AccessToken)-22] + other.AccessToken[len(other.AccessToken)-22:]
	forgedRefresh := tok.RefreshToken[:len(tok.RefreshToken)-22] + other.RefreshToken[len(other.RefreshToken)-22:]
	e.remember(asAccess, asRefresh, forged, forgedRefresh)
	for name, raw := range map[string]string{"the refresh token as an access token": asAccess, "another secret with the pair's id": forged} {
		if st := e.mcpStatus(t, raw); st != http.StatusUnauthorized {
			t.Errorf("%s at the MCP endpoint: %d, want 401", name, st)
		}
	}
	for name, raw := range map[string]string{"the access token as a refresh token": asRefresh, "another refresh secret with the pair's id": forgedRefresh} {
		t.Run(name, func(t *testing.T) {
			e.refresh(t, testenv.NativeClientID, raw, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		})
	}
	// And the real ones still work: nothing above was taken for a reuse.
	if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
		t.Fatalf("access token: %d", st)
	}
	e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
}

// Rotating a pair's refresh token rewrites the pair: its access token works until it
// expires, as a rotated pair's always did; a retry within the grace window gets the same
// successor; a reuse after it revokes the family, the successor's tokens with it.
func TestTokenPairRotation(t *testing.T) {
	e := newCodeEnv(t)
	first := e.login(t)
	next := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
	if n := e.countRecords(t, kindTokenPair); n != 2 {
		t.Fatalf("%d pairs after a rotation, want 2 (the rotated one kept for the grace window and reuse)", n)
	}
	if st := e.mcpStatus(t, first.AccessToken); st != http.StatusOK {
		t.Errorf("the rotated pair's access token: %d, want 200 until it expires", st)
	}
	again := e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
	if again.AccessToken != next.AccessToken || again.RefreshToken != next.RefreshToken {
		t.Fatal("a retry within the grace window got another pair")
	}
	e.clock.Advance(e.b.cfg.RefreshGrace + 1)
	e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	e.clock.Advance(brokerCacheTTL)
	for _, raw := range []string{first.AccessToken, next.AccessToken} {
		if st := e.mcpStatus(t, raw); st != http.StatusUnauthorized {
			t.Errorf("an access token of the family after a reuse: %d, want 401", st)
		}
	}
	e.refresh(t, testenv.NativeClientID, next.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
}

// A pair's sealed successor counts in the key ring's usage, as a refresh record's did:
// an admin who drops a key the count says is unused breaks no retry.
func TestTokenPairSuccessorCountsInKeyUsage(t *testing.T) {
	e := newCodeEnv(t)
	before, err := e.b.KeyUsage(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	tok := e.login(t)
	e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantTokens(t)
	after, err := e.b.KeyUsage(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	// The login's session seals its IdP grant; the rotation seals the successor.
	if got := after.Keys[0].Sealed - before.Keys[0].Sealed; got != 2 {
		t.Errorf("sealed values after a login and a rotation: +%d, want +2 (session, successor)", got)
	}
}
