package flows

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// familyStore keeps token families and the broker-issued access and refresh tokens in
// them (broker_tokens.go says why they are opaque records). A pair is issued into a
// family as one record (TokenPair); a refresh token is read, locked and rotated once; a family is started once by
// its code, extended by refreshes, and revoked.
type familyStore struct {
	records *storage.Records
	logger  *zap.Logger
	now     func() time.Time
	// accessTTL and refreshTTL are the tokens' lifetimes; grace how long a rotated refresh
	// token still yields its successor pair.
	accessTTL, refreshTTL, grace time.Duration
}

func familyKey(id string) string { return storage.Key(kindFamily, id) }

// familyLockName serializes the writes of a family record: a revocation must never be
// overwritten by a refresh extending the family's life.
func familyLockName(id string) string { return "family/" + id }

// refreshLockName serializes the refreshes of one refresh token across the cluster, so
// that concurrent retries of one client rotate it once and all get the same pair.
func refreshLockName(rt string) string { return "refresh/" + storage.Hash(rt) }

// familyTTL outlives every token of the family issued so far.
func (st familyStore) familyTTL() time.Duration {
	return max(st.accessTTL, st.refreshTTL) + st.grace
}

// issue mints an access token and a refresh token for g (the access token alone when
// g.AccessOnly) and stores them as one TokenPair.
func (st familyStore) issue(ctx context.Context, g tokenGrant) (TokenResponse, error) {
	now := st.now()
	pairID := newPairID()
	access := newPairToken(accessTokenPrefix, pairID)
	accessTTL, refreshTTL := st.accessTTL, st.refreshTTL
	if !g.NotAfter.IsZero() {
		left := max(g.NotAfter.Sub(now), time.Second)
		accessTTL, refreshTTL = min(accessTTL, left), min(refreshTTL, left)
	}
	pair := TokenPair{
		AccessHash: storage.Hash(access),
		Access: AccessToken{
			FamilyID:  g.FamilyID,
			SessionID: g.SessionID,
			Subject:   g.Subject,
			ClientID:  g.ClientID,
			Scopes:    g.Scopes,
			Resource:  g.Resource,
			Expiry:    now.Add(accessTTL),
		},
	}
	resp := TokenResponse{
		AccessToken: access,
		TokenType:   "Bearer",
		ExpiresIn:   int64(accessTTL / time.Second),
		Scope:       strings.Join(g.Scopes, " "),
	}
	ttl := accessTTL
	if !g.AccessOnly {
		resp.RefreshToken = newPairToken(refreshTokenPrefix, pairID)
		pair.RefreshHash = storage.Hash(resp.RefreshToken)
		pair.Refresh = &RefreshToken{
			FamilyID:  g.FamilyID,
			SessionID: g.SessionID,
			Subject:   g.Subject,
			ClientID:  g.ClientID,
			Scopes:    g.RefreshScopes,
			Resource:  g.Resource,
			Expiry:    now.Add(refreshTTL),
		}
		ttl = max(ttl, refreshTTL)
	}
	if err := st.records.Put(ctx, pairKey(pairID), pair, ttl); err != nil {
		return TokenResponse{}, fmt.Errorf("storing token pair: %w", err)
	}
	return resp, nil
}

// pairIDLength is the length of a pair id: 15 random bytes in base64url.
const pairIDLength = 20

// newPairID mints the id of a token pair.
func newPairID() string {
	b := make([]byte, 15)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return base64.RawURLEncoding.EncodeToString(b)
}

// newPairToken mints a token of the pair id: prefix, a dot, the id and 16 random bytes,
// brokerTokenLength long as the tokens of earlier releases (prefix and 32 random bytes),
// which never have the dot (base64url has none).
func newPairToken(prefix, pairID string) string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return prefix + "." + pairID + base64.RawURLEncoding.EncodeToString(b)
}

// pairTokenID returns the pair id a token names; ok is false for a token of an earlier
// release. raw has the shape of a broker token (isBrokerToken).
func pairTokenID(raw string) (id string, ok bool) {
	if len(raw) != brokerTokenLength || raw[len(accessTokenPrefix)] != '.' {
		return "", false
	}
	start := len(accessTokenPrefix) + 1
	return raw[start : start+pairIDLength], true
}

func pairKey(id string) string { return recordKey(kindTokenPair, id) }

// tokenRecordKey is the key of the record that holds the token raw of kind
// (kindAccessToken or kindRefreshToken): its pair's, or for a token of an earlier
// release its own.
func tokenRecordKey(kind, raw string) string {
	if id, ok := pairTokenID(raw); ok {
		return pairKey(id)
	}
	return recordKey(kind, raw)
}

// pair reads the pair the token raw names and checks that raw is its access token
// (refresh false) or its refresh token; storage.ErrNotFound otherwise.
func (st familyStore) pair(ctx context.Context, id, raw string, refresh bool) (TokenPair, error) {
	// On any failure the pair is not handed out: a caller that looked at the record
	// before the error would be reading another token's (its family, client, subject).
	var p TokenPair
	if err := st.records.Get(ctx, pairKey(id), &p); err != nil {
		return TokenPair{}, err
	}
	want := p.AccessHash
	if refresh {
		if p.Refresh == nil {
			return TokenPair{}, storage.ErrNotFound
		}
		want = p.RefreshHash
	}
	if subtle.ConstantTimeCompare([]byte(storage.Hash(raw)), []byte(want)) != 1 {
		return TokenPair{}, storage.ErrNotFound
	}
	if p.Refresh != nil {
		p.Refresh.Successor = p.RefreshSuccessor
	}
	return p, nil
}

// accessToken returns the record of the access token raw, or storage.ErrNotFound.
func (st familyStore) accessToken(ctx context.Context, raw string) (AccessToken, error) {
	if id, ok := pairTokenID(raw); ok {
		p, err := st.pair(ctx, id, raw, false)
		return p.Access, err
	}
	var at AccessToken
	err := st.records.Get(ctx, recordKey(kindAccessToken, raw), &at)
	return at, err
}

// refreshToken returns the record of the refresh token raw, or storage.ErrNotFound.
func (st familyStore) refreshToken(ctx context.Context, raw string) (RefreshToken, error) {
	rt, _, err := st.refreshRecord(ctx, raw)
	return rt, err
}

// refreshRecord is refreshToken with the pair that holds the token, which rotate
// rewrites; nil for a token of an earlier release, which has a record of its own.
func (st familyStore) refreshRecord(ctx context.Context, raw string) (RefreshToken, *TokenPair, error) {
	if id, ok := pairTokenID(raw); ok {
		p, err := st.pair(ctx, id, raw, true)
		if err != nil {
			return RefreshToken{}, nil, err
		}
		return *p.Refresh, &p, nil
	}
	var rt RefreshToken
	err := st.records.Get(ctx, recordKey(kindRefreshToken, raw), &rt)
	return rt, nil, err
}

// lockRefresh takes the cluster-wide lock of the refresh token raw.
func (st familyStore) lockRefresh(ctx context.Context, raw string) (func(), error) {
	return st.records.Lock(ctx, refreshLockName(raw))
}

// rotate records in the old refresh token's record that it was used and which pair it
// yielded (sealed), for retries within the grace window and reuse detection after it.
// The record stays as long as the token would have: a reuse is detected all that time.
// The caller holds the refresh token's lock, under which it read rec and pair
// (refreshRecord).
func (st familyStore) rotate(ctx context.Context, raw string, rec RefreshToken, pair *TokenPair, resp TokenResponse, now time.Time) error {
	key := tokenRecordKey(kindRefreshToken, raw)
	plain, err := json.Marshal(resp)
	if err != nil {
		return fmt.Errorf("encoding successor pair: %w", err)
	}
	if rec.Successor, err = st.records.Seal(key, plain); err != nil {
		return fmt.Errorf("sealing successor pair: %w", err)
	}
	rec.RotatedAt = now
	ttl := max(rec.Expiry.Sub(now), 2*st.grace)
	if pair == nil {
		if err := st.records.Put(ctx, key, rec, ttl); err != nil {
			return fmt.Errorf("storing rotated refresh token: %w", err)
		}
		return nil
	}
	// The pair's access token stays as it was, valid until its expiry as a rotated pair's
	// always was; the record lives as long as either token.
	p := *pair
	p.RefreshSuccessor, rec.Successor = rec.Successor, ""
	p.Refresh = &rec
	ttl = max(ttl, p.Access.Expiry.Sub(now))
	if err := st.records.Put(ctx, key, p, ttl); err != nil {
		return fmt.Errorf("storing rotated refresh token: %w", err)
	}
	return nil
}

// successor opens the pair the rotated refresh token raw yielded.
func (st familyStore) successor(raw string, rec *RefreshToken) (TokenResponse, error) {
	var resp TokenResponse
	plain, err := st.records.Open(tokenRecordKey(kindRefreshToken, raw), rec.Successor)
	if err == nil {
		err = json.Unmarshal(plain, &resp)
	}
	return resp, err
}

// refreshUsed tells whether a refresh token has been rotated. One that is gone counts as
// used: nothing of its family should be answered on its behalf.
func (st familyStore) refreshUsed(ctx context.Context, raw string) (bool, error) {
	switch rec, err := st.refreshToken(ctx, raw); {
	case errors.Is(err, storage.ErrNotFound):
		return true, nil
	case err != nil:
		return false, err
	default:
		return !rec.RotatedAt.IsZero(), nil
	}
}

// live returns the family with id, or errFamilyRevoked when it is revoked or gone.
func (st familyStore) live(ctx context.Context, id string) (*TokenFamily, error) {
	var f TokenFamily
	switch err := st.records.Get(ctx, familyKey(id), &f); {
	case errors.Is(err, storage.ErrNotFound):
		return nil, errFamilyRevoked
	case err != nil:
		return nil, fmt.Errorf("reading token family: %w", err)
	}
	if f.Revoked {
		return nil, errFamilyRevoked
	}
	return &f, nil
}

// startFresh stores the family f with a new, unguessable id that nobody holds yet: no
// revocation can race the write, so it takes no lock (start's lock guards against a
// replay revoking the family while it is started). before is how long tokens may be
// issued into it from now (a code's life): the record outlives every token of it.
func (st familyStore) startFresh(ctx context.Context, f TokenFamily, before time.Duration) error {
	if err := st.records.Put(ctx, familyKey(f.ID), f, st.familyTTL()+before); err != nil {
		return fmt.Errorf("starting token family: %w", err)
	}
	return nil
}

// forget deletes the family id that startFresh stored for a code that was not issued.
func (st familyStore) forget(ctx context.Context, id string) error {
	return st.records.Delete(ctx, familyKey(id))
}

// start stores the family of a redeemed code. A replay of the code may have revoked it
// already: then errFamilyRevoked.
func (st familyStore) start(ctx context.Context, f TokenFamily) error {
	unlock, err := st.records.Lock(ctx, familyLockName(f.ID))
	if err != nil {
		return fmt.Errorf("starting token family: %w", err)
	}
	defer unlock()
	var existing TokenFamily
	switch err := st.records.Get(ctx, familyKey(f.ID), &existing); {
	case err == nil:
		return errFamilyRevoked // revoked by a replay, or (never) started twice
	case !errors.Is(err, storage.ErrNotFound):
		return fmt.Errorf("starting token family: %w", err)
	}
	if err := st.records.Put(ctx, familyKey(f.ID), f, st.familyTTL()); err != nil {
		return fmt.Errorf("starting token family: %w", err)
	}
	return nil
}

// extend renews a live family's record for the tokens a refresh is about to issue, or
// returns errFamilyRevoked.
func (st familyStore) extend(ctx context.Context, id string) error {
	unlock, err := st.records.Lock(ctx, familyLockName(id))
	if err != nil {
		return fmt.Errorf("extending token family: %w", err)
	}
	defer unlock()
	f, err := st.live(ctx, id)
	if err != nil {
		return err
	}
	if err := st.records.Put(ctx, familyKey(id), f, st.familyTTL()); err != nil {
		return fmt.Errorf("extending token family: %w", err)
	}
	return nil
}

// revoke marks a family revoked, which stops every token in it. The mark outlives every
// token of the family. Callers use Broker.revokeFamily, which also evicts its tokens
// from this node's cache.
func (st familyStore) revoke(ctx context.Context, id, sessionID string) error {
	unlock, err := st.records.Lock(ctx, familyLockName(id))
	if err != nil {
		return fmt.Errorf("revoking token family: %w", err)
	}
	defer unlock()
	f := TokenFamily{ID: id, SessionID: sessionID}
	if err := st.records.Get(ctx, familyKey(id), &f); err != nil && !errors.Is(err, storage.ErrNotFound) {
		st.logger.Warn("reading token family before revoking it", zap.Error(err))
	}
	if f.Revoked {
		return nil
	}
	f.Revoked, f.RevokedAt = true, st.now()
	if err := st.records.Put(ctx, familyKey(id), f, st.familyTTL()); err != nil {
		return fmt.Errorf("revoking token family: %w", err)
	}
	return nil
}
