package flows

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// refreshLockName serializes the refreshes of one refresh token across the cluster, so
// that concurrent retries of one client rotate it once and all get the same pair.
func refreshLockName(rt string) string { return "refresh/" + storage.Hash(rt) }

// refreshGrant is the refresh_token grant (RFC 6749 §6) with rotation: a refresh token
// yields a new pair once; within RefreshGrace after that it yields the same pair again
// (clients that lost the answer, or refresh from several places at once); after the grace
// window it is a reuse, which revokes the whole family (OAuth 2.1 §4.3.1). It works at
// once after the code exchange.
func (b *Broker) refreshGrant(w http.ResponseWriter, r *http.Request, form url.Values, client *Client) {
	raw := form.Get("refresh_token")
	if raw == "" {
		writeError(w, http.StatusBadRequest, "invalid_request", "refresh_token is required")
		return
	}
	resource, ok := singleResource(form)
	if !ok {
		writeError(w, http.StatusBadRequest, "invalid_target", "resource must name this server once")
		return
	}
	if !isBrokerToken(raw, refreshTokenPrefix) {
		writeError(w, http.StatusBadRequest, "invalid_grant", "the refresh token is invalid, expired or revoked")
		return
	}

	key := recordKey(kindRefreshToken, raw)
	var rec RefreshToken
	// Look before locking: a made-up token must not cost a storage lock (SECURITY.md).
	// The read under the lock below is the one that counts.
	switch err := b.cfg.Records.Get(r.Context(), key, &rec); {
	case errors.Is(err, storage.ErrNotFound):
		writeError(w, http.StatusBadRequest, "invalid_grant", "the refresh token is invalid, expired or revoked")
		return
	case err != nil:
		b.unavailable(w, "reading refresh token", err)
		return
	}

	unlock, err := b.cfg.Records.Lock(r.Context(), refreshLockName(raw))
	if err != nil {
		b.unavailable(w, "locking refresh token", err)
		return
	}
	defer unlock()
	ctx := context.WithoutCancel(r.Context()) // a rotation, once begun, is written whole

	rec = RefreshToken{}
	switch err := b.cfg.Records.Get(ctx, key, &rec); {
	case errors.Is(err, storage.ErrNotFound):
		writeError(w, http.StatusBadRequest, "invalid_grant", "the refresh token is invalid, expired or revoked")
		return
	case err != nil:
		b.unavailable(w, "reading refresh token", err)
		return
	}
	now := b.now()
	switch {
	case rec.ClientID != client.ID:
		b.logger.Warn("refresh token presented by another client",
			zap.String("client_id", client.ID), zap.String("refresh_token", Fingerprint(raw)))
		writeError(w, http.StatusBadRequest, "invalid_grant", "the refresh token was issued to another client")
		return
	case !now.Before(rec.Expiry):
		writeError(w, http.StatusBadRequest, "invalid_grant", "the refresh token is invalid, expired or revoked")
		return
	case resource != "" && resource != rec.Resource:
		writeError(w, http.StatusBadRequest, "invalid_target", "resource does not match the refresh token")
		return
	}
	scopes := rec.Scopes
	if form.Has("scope") {
		asked := strings.Fields(form.Get("scope"))
		held := Principal{Scopes: rec.Scopes}
		if len(asked) == 0 || !held.HasScopes(asked) {
			writeError(w, http.StatusBadRequest, "invalid_scope", "scope may only narrow the scopes granted")
			return
		}
		scopes = asked
	}

	if !rec.RotatedAt.IsZero() {
		if now.Sub(rec.RotatedAt) <= b.cfg.RefreshGrace {
			b.repeatRotation(ctx, w, key, &rec, now)
			return
		}
		b.logger.Warn("rotated refresh token reused after the grace window; revoking its family",
			zap.String("client_id", client.ID), zap.String("refresh_token", Fingerprint(raw)),
			zap.String("family", Fingerprint(rec.FamilyID)))
		b.revokeGrant(ctx, rec.FamilyID, rec.SessionID)
		writeError(w, http.StatusBadRequest, "invalid_grant", "the refresh token is invalid, expired or revoked")
		return
	}

	switch err := b.extendFamily(ctx, rec.FamilyID); {
	case errors.Is(err, errFamilyRevoked):
		writeError(w, http.StatusBadRequest, "invalid_grant", "the refresh token is invalid, expired or revoked")
		return
	case err != nil:
		b.unavailable(w, "refreshing broker tokens", err)
		return
	}
	switch err := b.touchSession(ctx, rec.SessionID); {
	case errors.Is(err, storage.ErrNotFound):
		// The IdP grant behind the tokens is gone (expired or ended): so is the family.
		b.revokeGrant(ctx, rec.FamilyID, "")
		writeError(w, http.StatusBadRequest, "invalid_grant", "the refresh token is invalid, expired or revoked")
		return
	case err != nil:
		b.unavailable(w, "refreshing broker tokens", err)
		return
	}
	resp, err := b.issueTokens(ctx, tokenGrant{
		FamilyID:      rec.FamilyID,
		SessionID:     rec.SessionID,
		Subject:       rec.Subject,
		ClientID:      rec.ClientID,
		Resource:      rec.Resource,
		Scopes:        scopes,
		RefreshScopes: rec.Scopes,
	})
	if err == nil {
		err = b.markRotated(ctx, key, rec, resp, now)
	}
	if err != nil {
		// The old token is still unrotated: the client may retry.
		b.unavailable(w, "refreshing broker tokens", err)
		return
	}
	b.logger.Info("rotated broker refresh token",
		zap.String("client_id", client.ID), zap.String("family", Fingerprint(rec.FamilyID)))
	b.renewRegistration(ctx, client)
	writeJSON(w, http.StatusOK, resp)
}

// markRotated records in the old refresh token's record that it was used and which pair
// it yielded (sealed), for retries within the grace window and reuse detection after it.
// The record stays as long as the token would have: a reuse is detected all that time.
func (b *Broker) markRotated(ctx context.Context, key string, rec RefreshToken, resp TokenResponse, now time.Time) error {
	plain, err := json.Marshal(resp)
	if err != nil {
		return fmt.Errorf("encoding successor pair: %w", err)
	}
	if rec.Successor, err = b.cfg.Records.Seal(key, plain); err != nil {
		return fmt.Errorf("sealing successor pair: %w", err)
	}
	rec.RotatedAt = now
	ttl := max(rec.Expiry.Sub(now), 2*b.cfg.RefreshGrace)
	if err := b.cfg.Records.Put(ctx, key, rec, ttl); err != nil {
		return fmt.Errorf("storing rotated refresh token: %w", err)
	}
	return nil
}

// repeatRotation answers a refresh within the grace window with the pair the first
// refresh yielded, unless the family has been revoked since.
func (b *Broker) repeatRotation(ctx context.Context, w http.ResponseWriter, key string, rec *RefreshToken, now time.Time) {
	switch _, err := b.liveFamily(ctx, rec.FamilyID); {
	case errors.Is(err, errFamilyRevoked):
		writeError(w, http.StatusBadRequest, "invalid_grant", "the refresh token is invalid, expired or revoked")
		return
	case err != nil:
		b.unavailable(w, "refreshing broker tokens", err)
		return
	}
	plain, err := b.cfg.Records.Open(key, rec.Successor)
	var resp TokenResponse
	if err == nil {
		err = json.Unmarshal(plain, &resp)
	}
	if err != nil {
		b.unavailable(w, "opening successor pair", err)
		return
	}
	// The access token has aged since it was issued: say how long it has left.
	resp.ExpiresIn = max(resp.ExpiresIn-int64(now.Sub(rec.RotatedAt)/time.Second), 1)
	writeJSON(w, http.StatusOK, resp)
}

// touchSession renews the life of the session behind a refreshed family: a session lives
// as long as its client keeps refreshing. It holds the session's lock so that a
// concurrent rotation of the IdP grant (delegation) is never overwritten.
func (b *Broker) touchSession(ctx context.Context, id string) error {
	if id == "" {
		return storage.ErrNotFound
	}
	unlock, err := b.cfg.Records.Lock(ctx, sessionLockName(id))
	if err != nil {
		return fmt.Errorf("locking session: %w", err)
	}
	defer unlock()
	s, err := b.loadSession(ctx, id)
	if err != nil {
		return err
	}
	if err := b.cfg.Records.Put(ctx, sessionKey(s.ID), s, b.cfg.SessionTTL); err != nil {
		return fmt.Errorf("renewing session: %w", err)
	}
	return nil
}
