package flows

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// refreshGrant is the refresh_token grant (RFC 6749 §6) with rotation: a refresh token
// yields a new pair once; within RefreshGrace after that it yields the same pair again
// (clients that lost the answer, or refresh from several places at once); after the grace
// window it is a reuse, which revokes the whole family (OAuth 2.1 §4.3.1). It works at
// once after the code exchange.
func (b *Broker) refreshGrant(r *http.Request, form url.Values, client *Client) (TokenResponse, error) {
	raw := form.Get("refresh_token")
	if raw == "" {
		return TokenResponse{}, errInvalidRequest("refresh_token is required")
	}
	resource, ok := singleResource(form)
	if !ok {
		return TokenResponse{}, errInvalidTarget("resource must name this server once")
	}
	if !isBrokerToken(raw, refreshTokenPrefix) {
		return TokenResponse{}, errInvalidGrant("the refresh token is invalid, expired or revoked")
	}

	var (
		rec  RefreshToken
		pair *TokenPair // the record rotate rewrites, when the token is in one
	)
	read := func(ctx context.Context) error {
		var err error
		rec, pair, err = b.families.refreshRecord(ctx, raw)
		switch {
		case errors.Is(err, storage.ErrNotFound):
			return errInvalidGrant("the refresh token is invalid, expired or revoked")
		case err != nil:
			return errStorage("reading refresh token", err)
		}
		return nil
	}
	// Look before locking: a made-up token must not cost a storage lock (SECURITY.md).
	// The read under the lock below is the one that counts.
	if err := read(r.Context()); err != nil {
		return TokenResponse{}, err
	}

	unlock, err := b.families.lockRefresh(r.Context(), raw)
	if err != nil {
		return TokenResponse{}, errStorage("locking refresh token", err)
	}
	defer unlock()
	ctx := context.WithoutCancel(r.Context()) // a rotation, once begun, is written whole

	if err := read(ctx); err != nil {
		return TokenResponse{}, err
	}
	now := b.now()
	switch {
	case rec.ClientID != client.ID:
		b.log.token.Warn("refresh token presented by another client",
			zap.String("client_id", client.ID), zap.String("refresh_token", Fingerprint(raw)))
		return TokenResponse{}, errInvalidGrant("the refresh token was issued to another client")
	case !now.Before(rec.Expiry):
		return TokenResponse{}, errInvalidGrant("the refresh token is invalid, expired or revoked")
	case resource != "" && !sameResource(resource, rec.Resource):
		return TokenResponse{}, errInvalidTarget("resource does not match the refresh token")
	}
	scopes := rec.Scopes
	if form.Has("scope") {
		asked := strings.Fields(form.Get("scope"))
		held := idp.Principal{Scopes: rec.Scopes}
		if len(asked) == 0 || !held.HasScopes(asked) {
			return TokenResponse{}, errInvalidScope("scope may only narrow the scopes granted")
		}
		scopes = asked
	}

	if !rec.RotatedAt.IsZero() {
		return b.repeatedRefresh(ctx, &rec, client, raw, scopes, now, clientIP(r))
	}
	// Only rotations count: repeats above write nothing.
	if ok, wait := b.refreshes.Allow(rec.FamilyID, refreshRatePerGrant, now); !ok {
		return TokenResponse{}, errTooManyRequests(wait, "this grant is refreshed too often; retry later").
			because(fmt.Errorf("client %s: family %s over its rate limit", client.ID, Fingerprint(rec.FamilyID)))
	}

	switch err := b.families.extend(ctx, rec.FamilyID); {
	case errors.Is(err, errFamilyRevoked):
		return TokenResponse{}, errInvalidGrant("the refresh token is invalid, expired or revoked")
	case err != nil:
		return TokenResponse{}, errStorage("refreshing broker tokens", err)
	}
	sessionEnd, granted, err := b.renewSession(ctx, rec.SessionID, now)
	switch {
	case errors.Is(err, storage.ErrNotFound), errors.Is(err, errSessionEnded):
		// The IdP grant behind the tokens is gone (expired, ended, refused by the IdP, or
		// past the session's lifetime): so is the family.
		b.log.token.Info("session ended at a refresh; revoking its tokens", zap.String("client_id", client.ID),
			zap.String("family", Fingerprint(rec.FamilyID)), zap.Error(err))
		b.revokeGrant(ctx, rec.FamilyID, rec.SessionID)
		b.audit(auditSessionRevoked, clientIP(r), zap.String("reason", "session_ended"), zap.String("subject", rec.Subject),
			zap.String("client_id", client.ID), zap.String("family", Fingerprint(rec.FamilyID)), zap.Error(err))
		return TokenResponse{}, errInvalidGrant("the refresh token is invalid, expired or revoked")
	case err != nil:
		return TokenResponse{}, errStorage("refreshing broker tokens", err)
	}
	refreshScopes := rec.Scopes
	if granted != nil {
		// The IdP has just confirmed the grant: what it withdrew is gone from the new pair.
		var dropped []string
		scopes, _ = b.narrowToGrant(scopes, granted)
		if refreshScopes, dropped = b.narrowToGrant(rec.Scopes, granted); len(dropped) > 0 {
			b.log.token.Info("the identity provider no longer grants scopes of this family",
				zap.String("client_id", client.ID), zap.String("family", Fingerprint(rec.FamilyID)), zap.Strings("scopes", dropped))
		}
	}
	resp, err := b.families.issue(ctx, tokenGrant{
		FamilyID:      rec.FamilyID,
		SessionID:     rec.SessionID,
		Subject:       rec.Subject,
		ClientID:      rec.ClientID,
		Resource:      rec.Resource,
		Scopes:        scopes,
		RefreshScopes: refreshScopes,
		NotAfter:      sessionEnd,
	})
	if err == nil {
		err = b.families.rotate(ctx, raw, rec, pair, resp, now)
	}
	if err != nil {
		// The old token is still unrotated: the client may retry.
		return TokenResponse{}, errStorage("refreshing broker tokens", err)
	}
	b.count(TokenRefreshed)
	b.log.token.Info("rotated broker refresh token",
		zap.String("client_id", client.ID), zap.String("family", Fingerprint(rec.FamilyID)))
	b.audit(auditTokenRefreshed, clientIP(r), zap.String("subject", rec.Subject), zap.String("client_id", client.ID),
		zap.String("family", Fingerprint(rec.FamilyID)))
	b.renewRegistration(ctx, client)
	return resp, nil
}

// repeatedRefresh answers a refresh with a token already rotated. Within the grace
// window, and while its successor is unused, it is a repeat (a lost answer, parallel
// processes of one client, a client refreshing from several places): it gets the pair the
// first refresh yielded, with the same scopes, and writes nothing. Otherwise it is reuse
// (OAuth 2.1 §4.3.1: someone else may hold the token), which revokes the whole family.
func (b *Broker) repeatedRefresh(ctx context.Context, rec *RefreshToken, client *Client, raw string, scopes []string, now time.Time, ip string) (TokenResponse, error) {
	resp, err := b.families.successor(raw, rec)
	if err != nil {
		return TokenResponse{}, errUnavailable("opening successor pair", err)
	}
	reuse := ""
	if now.Sub(rec.RotatedAt) > b.cfg.RefreshGrace {
		reuse = "after the grace window"
	} else {
		switch used, err := b.families.refreshUsed(ctx, resp.RefreshToken); {
		case err != nil:
			return TokenResponse{}, errStorage("reading successor refresh token", err)
		case used:
			reuse = "after its successor was used"
		}
	}
	if reuse != "" {
		b.count(TokenReuseDetected)
		b.log.token.Warn("rotated refresh token reused; revoking its family", zap.String("when", reuse),
			zap.String("client_id", client.ID), zap.String("refresh_token", Fingerprint(raw)),
			zap.String("family", Fingerprint(rec.FamilyID)))
		b.audit(auditReuseDetected, ip, zap.String("token_type", "refresh_token"), zap.String("subject", rec.Subject),
			zap.String("client_id", client.ID), zap.String("refresh_token", Fingerprint(raw)),
			zap.String("family", Fingerprint(rec.FamilyID)), zap.String("when", reuse))
		b.revokeGrant(ctx, rec.FamilyID, rec.SessionID)
		b.audit(auditSessionRevoked, ip, zap.String("reason", "refresh_token_reuse"), zap.String("subject", rec.Subject),
			zap.String("client_id", client.ID), zap.String("family", Fingerprint(rec.FamilyID)))
		return TokenResponse{}, errInvalidGrant("the refresh token is invalid, expired or revoked")
	}
	if !sameScopes(scopes, strings.Fields(resp.Scope)) {
		return TokenResponse{}, errInvalidScope("a repeated refresh must ask the scopes of the first")
	}
	switch _, err := b.families.live(ctx, rec.FamilyID); {
	case errors.Is(err, errFamilyRevoked):
		return TokenResponse{}, errInvalidGrant("the refresh token is invalid, expired or revoked")
	case err != nil:
		return TokenResponse{}, errStorage("refreshing broker tokens", err)
	}
	b.log.token.Info("repeated refresh within the grace window; answering with the same pair",
		zap.String("client_id", client.ID), zap.String("refresh_token", Fingerprint(raw)),
		zap.String("family", Fingerprint(rec.FamilyID)))
	// The access token has aged since it was issued: say how long it has left.
	resp.ExpiresIn = max(resp.ExpiresIn-int64(now.Sub(rec.RotatedAt)/time.Second), 1)
	return resp, nil
}

// sameScopes tells whether a and b hold the same scopes, in any order.
func sameScopes(a, b []string) bool {
	p, q := idp.Principal{Scopes: a}, idp.Principal{Scopes: b}
	return p.HasScopes(b) && q.HasScopes(a)
}

// errSessionEnded means a session may not be renewed: past its absolute lifetime, or its
// IdP grant was refused by the IdP.
var errSessionEnded = errors.New("session ended")

// renewSession renews the life of the session behind a refreshed family: a session lives
// as long as its client keeps refreshing, up to SessionMaxLifetime after the login, which
// it returns. At least every IdPConfirmInterval it first confirms the session's IdP grant
// by refreshing it: with delegation none nothing else would ever ask the IdP, and a user
// disabled there, or a grant revoked there, would keep the broker's tokens forever. An IdP
// that does not answer does not end the session (the next refresh confirms); one that
// refuses the grant does (errSessionEnded). granted is the grant's scopes when it was
// confirmed just now, else nil.
//
// It holds the session's lock, as delegation refresh does, so that the IdP's rotated
// refresh token is stored before the grant is used again and is never overwritten.
func (b *Broker) renewSession(ctx context.Context, id string, now time.Time) (end time.Time, granted []string, err error) {
	if id == "" {
		return time.Time{}, nil, storage.ErrNotFound
	}
	unlock, err := b.sessions.lock(ctx, id)
	if err != nil {
		return time.Time{}, nil, fmt.Errorf("locking session: %w", err)
	}
	defer unlock()
	s, err := b.sessions.load(ctx, id)
	if err != nil {
		return time.Time{}, nil, err
	}
	end = s.CreatedAt.Add(b.cfg.SessionMaxLifetime)
	if !now.Before(end) {
		return end, nil, fmt.Errorf("%w: past its absolute lifetime", errSessionEnded)
	}
	confirmed := s.ConfirmedAt
	if confirmed.IsZero() {
		confirmed = s.CreatedAt
	}
	if now.Sub(confirmed) >= b.cfg.IdPConfirmInterval {
		switch granted, err := b.confirmGrant(ctx, s, now); {
		case err == nil:
			return end, granted, nil // stored with the rotated grant
		case errors.Is(err, errSessionEnded):
			return end, nil, err
		case errors.Is(err, errGrantStoreFailed):
			return end, nil, err
		case errors.Is(err, errNoIdPRefreshToken):
			b.log.token.Debug("session's IdP grant cannot be confirmed: no refresh token", zap.String("session", Fingerprint(id)))
		default:
			b.log.token.Warn("could not confirm a session's IdP grant; the next refresh tries again",
				zap.String("session", Fingerprint(id)), zap.Error(err))
		}
	}
	if err := b.sessions.renew(ctx, s, now); err != nil {
		return end, nil, err
	}
	return end, nil, nil
}

// errGrantStoreFailed means the IdP rotated a session's grant and storing it failed.
var errGrantStoreFailed = errors.New("storing the confirmed session grant failed")

// errNoIdPRefreshToken means the IdP gave the session no refresh token to confirm with.
var errNoIdPRefreshToken = errors.New("the IdP gave the session no refresh token")

// confirmGrant refreshes a session's IdP grant (as narrowed as it is) and stores the
// result with the time of confirmation; it returns the grant's scopes. The caller holds
// the session's lock.
func (b *Broker) confirmGrant(ctx context.Context, s *Session, now time.Time) ([]string, error) {
	g, err := b.sessions.grant(s)
	if err != nil {
		// Sealed under a key no longer in the ring: the session cannot be used again.
		return nil, fmt.Errorf("%w: %w", errSessionEnded, err)
	}
	if g.RefreshToken == "" {
		// Nothing to confirm with: such a session lives to SessionMaxLifetime (README).
		return nil, errNoIdPRefreshToken
	}
	next, err := b.refreshIdPGrant(ctx, g, g.AccessTokenScopes)
	var de *delegationError
	if errors.As(err, &de) && de.kind == failRejected {
		return nil, fmt.Errorf("%w: the IdP refused the grant: %w", errSessionEnded, err)
	}
	if err != nil {
		return nil, err
	}
	s.ConfirmedAt = now
	if err := b.storeRotatedGrant(ctx, s, next); err != nil {
		return nil, fmt.Errorf("%w: %w", errGrantStoreFailed, err)
	}
	return next.Scopes, nil
}
