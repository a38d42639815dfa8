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

// codeStore keeps authorization codes. A code is stored once and taken once by moving
// it to its replay marker's key, where it outlives its redemption so that a replay is
// recognized: one record per code, where a marker beside it made two.
type codeStore struct {
	records *storage.Records
	ttl     time.Duration // how long a code is redeemable
}

// issue stores rec under code, for the life of its replay marker; rec.ExpiresAt bounds
// its redemption. Two redemptions racing each other always find one of them a replay,
// which revokes the family whichever won: the move that takes the code leaves the marker
// in the same step (storage.Records.TakeOnceLeaving).
func (st codeStore) issue(ctx context.Context, code string, rec AuthorizationCode) error {
	rec.LeavesMarker = true
	if err := st.records.Put(ctx, recordKey(kindCode, code), rec, usedCodeLife*st.ttl); err != nil {
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

// take redeems the code: exactly one caller gets it, the others storage.ErrNotFound and,
// from then on, its replay marker from used.
func (st codeStore) take(ctx context.Context, code string) (AuthorizationCode, error) {
	var rec AuthorizationCode
	marker := recordKey(kindUsedCode, code)
	if err := st.records.TakeOnceLeaving(ctx, recordKey(kindCode, code), marker, &rec); err != nil {
		return rec, err
	}
	if !rec.LeavesMarker {
		// An earlier release's code: the move replaced its marker with the code record,
		// which expires with the code. The marker again, for its whole life.
		used := UsedCode{FamilyID: rec.FamilyID, SessionID: rec.SessionID}
		if err := st.records.Put(ctx, marker, used, usedCodeLife*st.ttl); err != nil {
			return rec, fmt.Errorf("storing authorization code replay marker: %w", err)
		}
	}
	return rec, nil
}

// used returns the replay marker of a code redeemed earlier, or storage.ErrNotFound.
func (st codeStore) used(ctx context.Context, code string) (UsedCode, error) {
	var used UsedCode
	err := st.records.Get(ctx, recordKey(kindUsedCode, code), &used)
	return used, err
}
