package flows

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Broker tokens (hybrid mode) are opaque random strings whose records live in storage,
// not JWTs: revoking one takes effect at once, there is no signing key to rotate and no
// JWKS to publish, and nobody but the broker ever reads them (the upstream gets a
// delegated token instead). A prefix tells an access token from a refresh token at a
// glance, for operators, secret scanners and /oauth/revoke.
//
// Every token belongs to a TokenFamily: all the tokens descended from one authorization
// code. Revoking the family (revocation, code replay, refresh token reuse) stops them
// all; verification reads the family on every cold check.
//
// Verification is on the hot path, so a verified access token is cached in memory by its
// SHA-256 for at most brokerCacheTTL (and never past its expiry): a revocation made on
// this node evicts the family's entries at once, one made on another node of the cluster
// reaches this node within brokerCacheTTL.

const (
	accessTokenPrefix  = "mcpat_"
	refreshTokenPrefix = "mcprt_"
	// brokerTokenLength is a 6-byte prefix and 32 random bytes in unpadded base64url.
	brokerTokenLength = 6 + 43

	// brokerCacheTTL bounds how long this node trusts a verified access token without
	// reading storage: the delay for a revocation on another node to reach this one.
	brokerCacheTTL = 30 * time.Second
	// brokerRefusalTTL is how long a refused token is remembered, sparing storage a flood
	// of dead tokens. Refusals are final (unknown random tokens never become valid), so
	// only the memory bound matters.
	brokerRefusalTTL = 10 * time.Second
)

// brokerVerdict is a cached verification result. familyID lets a revocation evict the
// family's entries.
type brokerVerdict struct {
	principal *idp.Principal
	err       error
	familyID  string
}

var (
	errNotBrokerToken = fmt.Errorf("checking broker access token: %w: not a broker access token", idp.ErrInvalidToken)
	// errFamilyRevoked means the token family is revoked or gone.
	errFamilyRevoked = errors.New("token family revoked")
)

// newBrokerToken mints a token with prefix.
func newBrokerToken(prefix string) string { return prefix + randomToken() }

// isBrokerToken tells whether raw has the shape of a broker token with prefix, so that
// anything else is refused without touching storage.
func isBrokerToken(raw, prefix string) bool {
	return len(raw) == brokerTokenLength && strings.HasPrefix(raw, prefix)
}

// brokerTokenKey is the cache key of a broker token (its SHA-256), hashed from a copy on
// the stack: no allocation on the warm path.
func brokerTokenKey(raw string) [sha256.Size]byte {
	var buf [brokerTokenLength]byte
	return sha256.Sum256(buf[:copy(buf[:], raw)])
}

// verifyBrokerToken checks an access token the broker issued (hybrid mode). It returns an
// error wrapping idp.ErrInvalidToken for a token that is unknown, expired, revoked or meant for
// another resource, and one wrapping ErrStorageUnavailable when storage cannot be read
// (the token may be fine: answer 503, not 401). The principal is shared by every caller
// presenting the same token: read it, never modify it.
func (b *Broker) verifyBrokerToken(ctx context.Context, raw string) (*idp.Principal, error) {
	if !isBrokerToken(raw, accessTokenPrefix) {
		return nil, errNotBrokerToken
	}
	key := brokerTokenKey(raw)
	now := b.now()
	if vd, ok := b.brokerTokens.Get(key, now.UnixNano()); ok {
		return vd.principal, vd.err
	}
	return b.verifyBrokerTokenCold(ctx, key, raw, now)
}

// verifyBrokerTokenCold reads the token's record and family and caches the verdict.
func (b *Broker) verifyBrokerTokenCold(ctx context.Context, key [sha256.Size]byte, raw string, now time.Time) (*idp.Principal, error) {
	// A revocation evicting the family while this check reads storage must not be undone
	// by caching what was read before it: putSince drops the verdict then.
	epoch := b.brokerTokens.Epoch()
	p, familyID, err := b.checkAccessToken(ctx, raw, now)
	if ce := b.log.token.Check(zap.DebugLevel, "broker access token checked"); ce != nil {
		ce.Write(zap.String("token", Fingerprint(raw)), zap.String("family", fingerprintOrEmpty(familyID)), zap.Error(err))
	}
	switch {
	case err == nil:
		expires := min(p.Expiry.UnixNano(), now.Add(brokerCacheTTL).UnixNano())
		b.brokerTokens.PutSince(epoch, key, brokerVerdict{principal: p, familyID: familyID}, expires, false, now.UnixNano())
	case errors.Is(err, idp.ErrInvalidToken):
		b.brokerTokens.PutSince(epoch, key, brokerVerdict{err: err, familyID: familyID}, now.Add(brokerRefusalTTL).UnixNano(), true, now.UnixNano())
	}
	return p, err
}

// checkAccessToken verifies raw against storage, without the cache.
func (b *Broker) checkAccessToken(ctx context.Context, raw string, now time.Time) (*idp.Principal, string, error) {
	at, err := b.families.accessToken(ctx, raw)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return nil, "", fmt.Errorf("checking broker access token: %w: unknown token", idp.ErrInvalidToken)
	case err != nil:
		return nil, "", storageFailed("reading access token record", err)
	}
	if !now.Before(at.Expiry) {
		return nil, at.FamilyID, fmt.Errorf("checking broker access token: %w: expired", idp.ErrInvalidToken)
	}
	if at.Resource != b.cfg.Resource {
		// Brokers for several MCP servers may share one storage.
		return nil, at.FamilyID, fmt.Errorf("checking broker access token: %w: issued for another resource", idp.ErrInvalidToken)
	}
	switch _, err := b.families.live(ctx, at.FamilyID); {
	case errors.Is(err, errFamilyRevoked):
		return nil, at.FamilyID, fmt.Errorf("checking broker access token: %w: revoked", idp.ErrInvalidToken)
	case err != nil:
		return nil, at.FamilyID, storageFailed("reading token family", err)
	}
	return &idp.Principal{
		Subject:   at.Subject,
		ClientID:  at.ClientID,
		Scopes:    at.Scopes,
		Audience:  []string{at.Resource},
		Expiry:    at.Expiry,
		SessionID: at.SessionID,
	}, at.FamilyID, nil
}

// evictFamily forgets this node's cached verdicts on the tokens of a family, so that a
// revocation takes effect here at once.
func (b *Broker) evictFamily(familyID string) {
	b.brokerTokens.DeleteFunc(func(vd brokerVerdict) bool { return vd.familyID == familyID })
}

// tokenGrant is what a pair of broker tokens is issued for.
type tokenGrant struct {
	FamilyID  string
	SessionID string
	Subject   string
	ClientID  string
	Resource  string
	// Scopes are the access token's; RefreshScopes the refresh token's, which a
	// narrowing refresh keeps whole (RFC 6749 §6).
	Scopes        []string
	RefreshScopes []string
	// NotAfter, when set, is the end of the session's absolute lifetime: no token of the
	// pair outlives it.
	NotAfter time.Time
	// AccessOnly issues an access token alone, no refresh token (the JWT bearer grant).
	AccessOnly bool
}

// revokeFamily marks a family revoked, which stops every token in it, and evicts its
// tokens from this node's cache (also when storage fails: this node at least stops them).
func (b *Broker) revokeFamily(ctx context.Context, id, sessionID string) error {
	defer b.evictFamily(id)
	return b.families.revoke(ctx, id, sessionID)
}
