package flows

import (
	"bytes"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// newCodeEnv is a tokenEnv whose records expire by the test's clock, so that a code's
// replay marker can be outlived without waiting.
func newCodeEnv(t *testing.T) *tokenEnv {
	t.Helper()
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		t.Fatal(err)
	}
	var e *tokenEnv
	e = newTokenEnv(t, testenv.SharedOP(t), func(c *Config) {
		// Read only once e is set: nothing is served before newTokenEnv returns.
		c.Records = storage.New(&certmagic.FileStorage{Path: t.TempDir()}, ring, storage.WithClock(func() time.Time { return e.clock.Now() }))
	})
	return e
}

// A code is one record, its family stored with it; redeeming it moves the record to its
// replay marker's key, and the family is not written again.
func TestCodeIsOneRecordThatBecomesItsReplayMarker(t *testing.T) {
	e := newCodeEnv(t)
	code, verifier := e.code(t, testenv.NativeClientID)
	if c, u, f := e.countRecords(t, kindCode), e.countRecords(t, kindUsedCode), e.countRecords(t, kindFamily); c != 1 || u != 0 || f != 1 {
		t.Fatalf("after issue: %d codes, %d replay markers, %d families; want 1, 0, 1", c, u, f)
	}
	tok := e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
	if c, u, f := e.countRecords(t, kindCode), e.countRecords(t, kindUsedCode), e.countRecords(t, kindFamily); c != 0 || u != 1 || f != 1 {
		t.Fatalf("after redemption: %d codes, %d replay markers, %d families; want 0, 1, 1", c, u, f)
	}
	if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
		t.Fatalf("access token: %d", st)
	}
}

// The replay marker outlives the code: a replay after the code's life, within the
// marker's, still revokes what the code issued (RFC 6749 §10.5).
func TestCodeReplayedAfterItsLifeRevokesTheFamily(t *testing.T) {
	e := newCodeEnv(t)
	code, verifier := e.code(t, testenv.NativeClientID)
	tok := e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
	e.clock.Advance(5 * e.b.cfg.CodeTTL)
	e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
		t.Errorf("access token after a replay 5 code lives later: %d, want 401", st)
	}
	e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
}

// Of many concurrent redemptions of one code exactly one gets tokens, and since the
// others are replays its family ends revoked.
func TestCodeRedeemedConcurrentlyHasOneWinnerWhoseFamilyIsRevoked(t *testing.T) {
	e := newCodeEnv(t)
	code, verifier := e.code(t, testenv.NativeClientID)
	results := make([]endpointReply, 20)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range results {
		wg.Go(func() {
			<-start
			var err error
			if results[i], err = e.postE(t.Context(), pathToken, exchangeForm(testenv.NativeClientID, code, verifier, nil), nil); err != nil {
				t.Error(err)
			}
		})
	}
	close(start)
	wg.Wait()
	won := 0
	for _, r := range results {
		switch {
		case r.status == http.StatusOK:
			won++
			e.remember(r.tokens.AccessToken, r.tokens.RefreshToken)
			if st := e.mcpStatus(t, r.tokens.AccessToken); st != http.StatusUnauthorized {
				t.Errorf("the winner's access token: %d, want 401", st)
			}
		case r.err.Error != "invalid_grant":
			t.Errorf("a loser got %d %q", r.status, r.err.Error)
		}
	}
	if won > 1 {
		t.Errorf("%d redemptions won, want at most 1", won)
	}
}

// The family is stored with the code and read at redemption: a family revoked before
// the code is redeemed (a replay racing it) yields no tokens.
func TestCodeOfARevokedFamilyYieldsNoTokens(t *testing.T) {
	e := newCodeEnv(t)
	code, verifier := e.code(t, testenv.NativeClientID)
	rec, err := e.b.codes.peek(t.Context(), code)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.b.families.revoke(t.Context(), rec.FamilyID, rec.SessionID); err != nil {
		t.Fatal(err)
	}
	e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
}

// asEarlierRelease rewrites the stored code as the release before this one issued it: the
// record for the code's life without its family, and a UsedCode marker beside it for ten
// lives (that release's codeStore.issue).
func asEarlierRelease(t *testing.T, e *tokenEnv, code string) {
	t.Helper()
	ctx := t.Context()
	rec, err := e.b.codes.peek(ctx, code)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.b.families.forget(ctx, rec.FamilyID); err != nil {
		t.Fatal(err)
	}
	rec.LeavesMarker, rec.FamilyStarted = false, false
	records := e.b.cfg.Records
	ttl := e.b.cfg.CodeTTL
	if err := records.Put(ctx, recordKey(kindUsedCode, code), UsedCode{FamilyID: rec.FamilyID, SessionID: rec.SessionID}, usedCodeLife*ttl); err != nil {
		t.Fatal(err)
	}
	if err := records.Put(ctx, recordKey(kindCode, code), rec, ttl); err != nil {
		t.Fatal(err)
	}
}

// A code issued by the release before this one, in flight during the upgrade, is
// redeemed by this one, its family started then; its replay after the code's life still
// revokes the family, though the move replaced its marker with the code's record.
func TestUpgradeCodeOfAnEarlierReleaseRedeemsAndItsReplayRevokes(t *testing.T) {
	e := newCodeEnv(t)
	code, verifier := e.code(t, testenv.NativeClientID)
	asEarlierRelease(t, e, code)
	tok := e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
	if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
		t.Fatalf("access token of an earlier release's code: %d", st)
	}
	e.clock.Advance(5 * e.b.cfg.CodeTTL)
	e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
		t.Errorf("access token after a replay of an earlier release's code: %d, want 401", st)
	}
}
