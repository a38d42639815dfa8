package flows

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Offline grants in storage. The refresh token inside is sealed with the
// record's key and is read only here: to mint background tokens for background clients
// (background_token.go) and to revoke it. The session path never reads an OfflineAccessGrant.

var (
	// errNoOfflineAccess: the user has no offline access grant.
	errNoOfflineAccess = errors.New("the user has not granted offline access")
	// errOfflineAccessGrantDead: the IdP no longer honours the user's refresh token; the grant
	// has been deleted.
	errOfflineAccessGrantDead = errors.New("the identity provider refused the offline access grant")
	// errBackgroundClientNotGranted: the user's grant does not name the background client.
	errBackgroundClientNotGranted = errors.New("the user did not grant this background client offline access")
)

// loadOfflineAccessGrant returns subject's offline access grant wherever this site may find it, or
// storage.ErrNotFound. It moves nothing: see moveOfflineAccessGrant.
func (b *Broker) loadOfflineAccessGrant(ctx context.Context, subject string) (*OfflineAccessGrant, error) {
	return b.offline.load(ctx, subject)
}

// moveOfflineAccessGrant moves g, read from anywhere but the current key, to the current key.
// A grant of an earlier release is taken once, so that of several sites on one storage
// exactly one gets it (errNoOfflineAccess for the others), and it gets the background
// clients configured now, since the user was shown none. The caller holds the lock.
func (b *Broker) moveOfflineAccessGrant(ctx context.Context, g *OfflineAccessGrant) error {
	to, err := b.offline.currentKey(g.Subject)
	if err != nil || g.key == to {
		return err
	}
	from := g.key
	legacy := from == legacyOfflineAccessGrantKey(g.Subject)
	if legacy {
		taken, err := b.offline.take(ctx, from)
		switch {
		case errors.Is(err, storage.ErrNotFound):
			return errNoOfflineAccess
		case err != nil:
			return fmt.Errorf("taking offline access grant of an earlier release: %w", err)
		}
		*g = *taken
	}
	before := *g
	restore := func() {
		// Put back what was taken, so that a failed move loses nothing.
		if legacy {
			if err := b.offline.putBack(ctx, &before); err != nil {
				b.log.offline.Error("restoring offline access grant of an earlier release", zap.Error(err))
			}
		}
	}
	refreshToken, err := b.offline.refreshToken(g)
	if err != nil {
		restore()
		return err
	}
	if legacy {
		g.BackgroundClients = b.backgroundClientIDs()
		g.FromUpgrade = true
	}
	// The stored access token is sealed for the key it leaves; the next one replaces it.
	g.AccessToken, g.AccessTokenExpiry, g.AccessTokenScopes = "", time.Time{}, nil
	if err := b.offline.put(ctx, g, refreshToken); err != nil {
		restore()
		return err
	}
	if !legacy {
		if err := b.offline.delete(ctx, from); err != nil {
			b.log.offline.Warn("deleting offline access grant under a retired key", zap.Error(err))
		}
	}
	b.log.offline.Info("offline access grant moved to the current key", zap.Bool("from_earlier_release", legacy))
	return nil
}

// backgroundClientIDs are the ids of the configured background clients, never nil.
func (b *Broker) backgroundClientIDs() []string {
	ids := make([]string, 0, len(b.cfg.BackgroundClients))
	for _, c := range b.cfg.BackgroundClients {
		ids = append(ids, c.ID)
	}
	return ids
}

// storeOfflineAccessGrant stores a fresh grant for subject, usable by the
// background clients the user was shown, replacing (and revoking at the IdP) any earlier
// one, wherever it was found.
func (b *Broker) storeOfflineAccessGrant(ctx context.Context, d *idp.Discovery, subject, clientID string, scopes, backgroundClients []string, refreshToken string) error {
	unlock, err := b.offline.lock(ctx, subject)
	if err != nil {
		return err
	}
	var previous string
	old, _ := b.loadOfflineAccessGrant(ctx, subject)
	if old != nil {
		previous, _ = b.offline.refreshToken(old)
	}
	g := &OfflineAccessGrant{Subject: subject, ClientID: clientID, Scopes: scopes, BackgroundClients: backgroundClients, GrantedAt: b.now().UTC()}
	err = b.offline.put(ctx, g, refreshToken)
	if err == nil && old != nil && old.key != g.key {
		if derr := b.offline.delete(ctx, old.key); derr != nil {
			b.log.offline.Warn("deleting the replaced offline access grant", zap.Error(derr))
		}
	}
	unlock()
	if err != nil {
		return err
	}
	if previous != "" && previous != refreshToken {
		b.revokeOfflineRefreshToken(ctx, d, previous)
	}
	return nil
}

// revokeOfflineAccessGrant deletes subject's offline access grant and revokes its refresh token at
// the IdP, when the IdP has a revocation endpoint. ip is the address of the client asking.
func (b *Broker) revokeOfflineAccessGrant(ctx context.Context, subject, ip string) (OfflineAccessStatus, error) {
	st := OfflineAccessStatus{Granted: false}
	// The user's Nextcloud app password (delegation mode app_password) goes with it.
	defer b.revokeAppPassword(ctx, subject, "offline_access_revoked", ip)
	unlock, err := b.offline.lock(ctx, subject)
	if err != nil {
		return st, err
	}
	g, err := b.loadOfflineAccessGrant(ctx, subject)
	if errors.Is(err, storage.ErrNotFound) {
		unlock()
		return st, nil
	}
	if err != nil {
		unlock()
		return st, err
	}
	refreshToken, openErr := b.offline.refreshToken(g)
	err = b.offline.delete(ctx, g.key)
	unlock()
	if err != nil {
		return st, fmt.Errorf("deleting offline access grant: %w", err)
	}
	b.log.offline.Info("revoked", zap.String("subject", subject))
	b.audit(auditOfflineAccessRevoked, ip, zap.String("reason", "revocation_request"), zap.String("subject", subject))
	revoked := false
	if openErr != nil {
		b.log.offline.Warn("revoked grant could not be opened for revocation at the identity provider", zap.Error(openErr))
	} else if d, derr := b.idp.Discovery(ctx); derr != nil {
		b.log.offline.Warn("identity provider unavailable for revocation", zap.Error(derr))
	} else {
		revoked = b.revokeOfflineRefreshToken(ctx, d, refreshToken)
	}
	st.RevokedAtIdP = &revoked
	return st, nil
}

// revokeOfflineRefreshToken revokes a refresh token at the IdP (RFC 7009), authenticated
// with client_secret_basic, and tells whether the IdP confirmed. Best effort: the
// grant is already gone from storage, and a client hanging up does not stop it.
func (b *Broker) revokeOfflineRefreshToken(ctx context.Context, d *idp.Discovery, token string) bool {
	if token == "" || d.RevocationEndpoint == "" {
		return false
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.IdPTimeout)
	defer cancel()
	form := url.Values{"token": {token}, "token_type_hint": {"refresh_token"}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.RevocationEndpoint, strings.NewReader(form.Encode()))
	if err != nil {
		b.log.offline.Warn("building revocation request", zap.Error(err))
		return false
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	// RFC 6749 §2.3.1: client credentials are form-encoded before Basic.
	req.SetBasicAuth(url.QueryEscape(b.cfg.ClientID), url.QueryEscape(b.cfg.ClientSecret))
	resp, err := b.cfg.HTTPClient.Do(req)
	if err != nil {
		b.log.offline.Warn("revoking refresh token at the identity provider", zap.String("token", Fingerprint(token)), zap.Error(err))
		return false
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		b.log.offline.Warn("identity provider refused the revocation", zap.String("token", Fingerprint(token)), zap.Int("status", resp.StatusCode))
		return false
	}
	return true
}

// backgroundTokenReuse is how long a stored background access token must still live to be
// handed out again; one closer to its expiry is replaced by a refresh.
const backgroundTokenReuse = time.Minute

// backgroundToken is an access token from subject's offline access grant for the
// background client worker, which the grant must name: the one the last refresh got while
// it has backgroundTokenReuse left, else a new one from the refresh grant at the IdP.
// Rotation is serialized cluster-wide, and the rotated refresh token is stored before
// the access token is handed out: a token the caller never gets costs nothing, a rotated
// refresh token that was never stored costs the grant. A grant the IdP revoked is found at
// the next refresh, when the reused token is about to expire anyway.
func (b *Broker) backgroundToken(ctx context.Context, worker, subject string) (*oauth2.Token, []string, error) {
	unlock, err := b.offline.lock(ctx, subject)
	if err != nil {
		return nil, nil, err
	}
	defer unlock()
	// From here on the worker hanging up must not cut a rotation in half.
	ctx = context.WithoutCancel(ctx)
	g, err := b.loadOfflineAccessGrant(ctx, subject)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, nil, errNoOfflineAccess
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reading offline access grant: %w", err)
	}
	if err := b.moveOfflineAccessGrant(ctx, g); err != nil {
		return nil, nil, err
	}
	if !slices.Contains(g.BackgroundClients, worker) {
		return nil, nil, errBackgroundClientNotGranted
	}
	if g.FromUpgrade {
		b.log.offline.Warn("offline access grant made before grants were bound to background clients; "+
			"every background client configured at the upgrade may use it until the user grants offline access again",
			zap.String("subject", subject), zap.Strings("background_clients", g.BackgroundClients))
	}
	if at, err := b.offline.accessToken(g); err != nil {
		b.log.offline.Warn("the stored background access token does not open; refreshing instead", zap.String("subject", subject), zap.Error(err))
	} else if at != "" && g.AccessTokenExpiry.Sub(b.now()) >= backgroundTokenReuse {
		return &oauth2.Token{AccessToken: at, TokenType: "Bearer", Expiry: g.AccessTokenExpiry}, g.AccessTokenScopes, nil
	}
	refreshToken, err := b.offline.refreshToken(g)
	if err != nil {
		return nil, nil, err
	}
	d, err := b.idp.Discovery(ctx)
	if err != nil {
		return nil, nil, err
	}
	idpCtx, cancel := b.offlineIdPContext(ctx)
	defer cancel()
	tok, err := b.offlineAccessOAuth2(d, g.Scopes).TokenSource(idpCtx, &oauth2.Token{RefreshToken: refreshToken}).Token()
	if err != nil {
		var re *oauth2.RetrieveError
		if errors.As(err, &re) && re.ErrorCode == "invalid_grant" {
			if derr := b.offline.delete(ctx, g.key); derr != nil {
				b.log.offline.Error("deleting dead offline access grant", zap.String("subject", subject), zap.Error(derr))
			}
			return nil, nil, errOfflineAccessGrantDead
		}
		return nil, nil, fmt.Errorf("%w: refreshing offline access grant: %v", idp.ErrUnavailable, oauthErrorOnly(err))
	}
	scopes := g.Scopes
	if s, ok := tok.Extra("scope").(string); ok && strings.TrimSpace(s) != "" {
		scopes = strings.Fields(s)
	}
	next := refreshToken
	if tok.RefreshToken != "" && tok.RefreshToken != refreshToken {
		g.RotatedAt, next = b.now().UTC(), tok.RefreshToken
	}
	if err := b.offline.putAccessToken(ctx, g, next, tok.AccessToken, tok.Expiry, scopes); err != nil {
		if next != refreshToken {
			return nil, nil, fmt.Errorf("storing rotated refresh token: %w", err)
		}
		// The grant is unchanged at the IdP; only the reuse of this token is lost.
		b.log.offline.Warn("storing the background access token for reuse", zap.String("subject", subject), zap.Error(err))
	}
	return tok, scopes, nil
}
