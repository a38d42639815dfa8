package flows

import (
	"context"
	"fmt"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// usedCodeLife is how long, in code lifetimes, a code's replay marker outlives it: a
// replay within it revokes what the code issued (RFC 6749 §10.5).
const usedCodeLife = 10

// codeStore keeps authorization codes. A code is issued once, with its replay marker,
// and taken once; the marker outlives it so that a replay is recognized.
type codeStore struct {
	records *storage.Records
	ttl     time.Duration // how long a code is redeemable
}

// issue stores rec under code. The replay marker is written with the code, not at
// redemption: two redemptions racing each other then always find one of them a replay,
// which revokes the family whichever won. (Written at redemption, the loser could miss
// a marker not yet written.)
func (st codeStore) issue(ctx context.Context, code string, rec AuthorizationCode) error {
	marker := UsedCode{FamilyID: rec.FamilyID, SessionID: rec.SessionID}
	if err := st.records.Put(ctx, recordKey(kindUsedCode, code), marker, usedCodeLife*st.ttl); err != nil {
		return fmt.Errorf("storing authorization code replay marker: %w", err)
	}
	if err := st.records.Put(ctx, recordKey(kindCode, code), rec, st.ttl); err != nil {
		return fmt.Errorf("storing authorization code: %w", err)
	}
	return nil
}

// peek reads the code without taking it; it decides nothing (see take).
func (st codeStore) peek(ctx context.Context, code string) (AuthorizationCode, error) {
	var rec AuthorizationCode
	err := st.records.Get(ctx, recordKey(kindCode, code), &rec)
	return rec, err
}

// take redeems the code: exactly one caller gets it, the others storage.ErrNotFound.
func (st codeStore) take(ctx context.Context, code string) (AuthorizationCode, error) {
	var rec AuthorizationCode
	err := st.records.TakeOnce(ctx, recordKey(kindCode, code), &rec)
	return rec, err
}

// used returns the replay marker of a code issued earlier, or storage.ErrNotFound.
func (st codeStore) used(ctx context.Context, code string) (UsedCode, error) {
	var used UsedCode
	err := st.records.Get(ctx, recordKey(kindUsedCode, code), &used)
	return used, err
}
