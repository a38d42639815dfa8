package flows

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// Bounds of a claimed assertion id: its length, and how long its marker is kept.
const (
	// maxAssertionIDBytes bounds a jti before anything is hashed or stored.
	maxAssertionIDBytes = 256
	// minAssertionIDTTL: a marker outlives its assertion by at least this, so that a
	// replay just past exp, within the verifier's clock leeway, is still recognised.
	minAssertionIDTTL = time.Minute
	// maxAssertionIDTTL caps what one claim keeps: the longest-lived assertion accepted
	// (an ID-JAG an hour ahead, token_jwt_bearer.go) plus the leeway it is accepted in
	// after its exp.
	maxAssertionIDTTL = maxAssertionLifetime + assertionLeeway
)

// errAssertionReplayed means the (issuer, jti) pair was claimed before and has not expired.
var errAssertionReplayed = errors.New("assertion id already used")

// errAssertionIDInvalid means the jti is empty or longer than maxAssertionIDBytes.
var errAssertionIDInvalid = errors.New("assertion id is empty or too long")

// assertionIDStore remembers the JWT ids (jti, RFC 7519 §4.1.7) of the assertions the
// broker accepted, client assertions (RFC 7523 §3) and grant assertions alike, so that each
// is used once (RFC 7523 §3 item 7). Keys hash the issuer and the jti, both chosen by the
// sender.
type assertionIDStore struct {
	records *storage.Records
	// now is the clock the TTL is counted on (nil: time.Now); openStores sets the broker's.
	now func() time.Time
}

// claim marks jti of issuer as used until expires. It returns nil the first time,
// errAssertionReplayed while an earlier claim stands, errAssertionIDInvalid for an empty
// or over-long jti (nothing is stored then), or a storage error. Claims of one pair on
// several cluster nodes are serialised by the storage lock of its key.
func (s assertionIDStore) claim(ctx context.Context, issuer, jti string, expires time.Time) error {
	if jti == "" || len(jti) > maxAssertionIDBytes {
		return errAssertionIDInvalid
	}
	key := storage.Key(kindAssertionID, storage.Hash(issuer), storage.Hash(jti))
	now := time.Now
	if s.now != nil {
		now = s.now
	}
	ttl := min(max(expires.Sub(now()), minAssertionIDTTL), maxAssertionIDTTL)
	unlock, err := s.records.Lock(ctx, key)
	if err != nil {
		return fmt.Errorf("locking assertion id: %w", err)
	}
	defer unlock()
	var used UsedAssertionID
	switch err := s.records.Get(ctx, key, &used); {
	case err == nil:
		return errAssertionReplayed
	case !errors.Is(err, storage.ErrNotFound):
		return fmt.Errorf("reading assertion id: %w", err)
	}
	if err := s.records.Put(ctx, key, UsedAssertionID{Expires: expires.UTC()}, ttl); err != nil {
		return fmt.Errorf("storing assertion id: %w", err)
	}
	return nil
}
