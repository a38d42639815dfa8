package flows

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"go.uber.org/zap"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// Offline grants (Flow 2) in storage. The refresh token inside is sealed with the
// record's key and is read only here: to mint background tokens for background clients
// (background.go) and to revoke it. The session path never reads an OfflineGrant.

var (
	// errNotProvisioned: the user has no offline grant.
	errNotProvisioned = errors.New("the user has not provisioned offline access")
	// errOfflineGrantDead: the IdP no longer honours the user's refresh token; the grant
	// has been deleted.
	errOfflineGrantDead = errors.New("the identity provider refused the offline grant")
)

func offlineGrantKey(subject string) string { return recordKey(kindProvisioning, subject) }

// offlineLockName is the cluster-wide lock serializing changes to a user's offline grant
// (rotation, replacement, revocation).
func offlineLockName(subject string) string { return "offline/" + storage.Hash(subject) }

// loadOfflineGrant returns subject's offline grant, or storage.ErrNotFound.
func (b *Broker) loadOfflineGrant(ctx context.Context, subject string) (*OfflineGrant, error) {
	var g OfflineGrant
	if err := b.cfg.Records.Get(ctx, offlineGrantKey(subject), &g); err != nil {
		return nil, err
	}
	return &g, nil
}

// putOfflineGrant seals refreshToken into g and stores it. The caller holds the lock.
func (b *Broker) putOfflineGrant(ctx context.Context, g *OfflineGrant, refreshToken string) error {
	key := offlineGrantKey(g.Subject)
	sealed, err := b.cfg.Records.Seal(key, []byte(refreshToken))
	if err != nil {
		return fmt.Errorf("sealing refresh token: %w", err)
	}
	g.RefreshToken = sealed
	if err := b.cfg.Records.Put(ctx, key, g, offlineGrantTTL); err != nil {
		return fmt.Errorf("storing offline grant: %w", err)
	}
	return nil
}

// openOfflineRefreshToken opens the refresh token sealed in g.
func (b *Broker) openOfflineRefreshToken(g *OfflineGrant) (string, error) {
	plain, err := b.cfg.Records.Open(offlineGrantKey(g.Subject), g.RefreshToken)
	if err != nil {
		return "", fmt.Errorf("opening offline refresh token: %w", err)
	}
	return string(plain), nil
}

// storeOfflineGrant stores a freshly provisioned grant for subject, replacing (and
// revoking at the IdP) any earlier one.
func (b *Broker) storeOfflineGrant(ctx context.Context, d *Discovery, subject, clientID string, scopes []string, refreshToken string) error {
	unlock, err := b.cfg.Records.Lock(ctx, offlineLockName(subject))
	if err != nil {
		return err
	}
	var previous string
	if old, err := b.loadOfflineGrant(ctx, subject); err == nil {
		previous, _ = b.openOfflineRefreshToken(old)
	}
	g := &OfflineGrant{Subject: subject, ClientID: clientID, Scopes: scopes, ProvisionedAt: b.now().UTC()}
	err = b.putOfflineGrant(ctx, g, refreshToken)
	unlock()
	if err != nil {
		return err
	}
	if previous != "" && previous != refreshToken {
		b.revokeOfflineRefreshToken(ctx, d, previous)
	}
	return nil
}

// revokeOfflineGrant deletes subject's offline grant and revokes its refresh token at
// the IdP, when the IdP has a revocation endpoint.
func (b *Broker) revokeOfflineGrant(ctx context.Context, subject string) (ProvisioningStatus, error) {
	st := ProvisioningStatus{Provisioned: false}
	unlock, err := b.cfg.Records.Lock(ctx, offlineLockName(subject))
	if err != nil {
		return st, err
	}
	g, err := b.loadOfflineGrant(ctx, subject)
	if errors.Is(err, storage.ErrNotFound) {
		unlock()
		return st, nil
	}
	if err != nil {
		unlock()
		return st, err
	}
	refreshToken, openErr := b.openOfflineRefreshToken(g)
	err = b.cfg.Records.Delete(ctx, offlineGrantKey(subject))
	unlock()
	if err != nil {
		return st, fmt.Errorf("deleting offline grant: %w", err)
	}
	b.logger.Info("flow 2: offline access revoked", zap.String("subject", subject))
	revoked := false
	if openErr != nil {
		b.logger.Warn("flow 2: revoked grant could not be opened for revocation at the identity provider", zap.Error(openErr))
	} else if d, derr := b.idp.Discovery(ctx); derr != nil {
		b.logger.Warn("flow 2: identity provider unavailable for revocation", zap.Error(derr))
	} else {
		revoked = b.revokeOfflineRefreshToken(ctx, d, refreshToken)
	}
	st.RevokedAtIdP = &revoked
	return st, nil
}

// revokeOfflineRefreshToken revokes a refresh token at the IdP (RFC 7009), authenticated
// with client_secret_basic, and tells whether the IdP confirmed. Best effort: the
// grant is already gone from storage, and a client hanging up does not stop it.
func (b *Broker) revokeOfflineRefreshToken(ctx context.Context, d *Discovery, token string) bool {
	if token == "" || d.RevocationEndpoint == "" {
		return false
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.IdPTimeout)
	defer cancel()
	form := url.Values{"token": {token}, "token_type_hint": {"refresh_token"}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.RevocationEndpoint, strings.NewReader(form.Encode()))
	if err != nil {
		b.logger.Warn("flow 2: building revocation request", zap.Error(err))
		return false
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	// RFC 6749 §2.3.1: client credentials are form-encoded before Basic.
	req.SetBasicAuth(url.QueryEscape(b.cfg.ClientID), url.QueryEscape(b.cfg.ClientSecret))
	resp, err := b.cfg.HTTPClient.Do(req)
	if err != nil {
		b.logger.Warn("flow 2: revoking refresh token at the identity provider", zap.String("token", Fingerprint(token)), zap.Error(err))
		return false
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		b.logger.Warn("flow 2: identity provider refused the revocation", zap.String("token", Fingerprint(token)), zap.Int("status", resp.StatusCode))
		return false
	}
	return true
}

// backgroundToken mints an access token from subject's offline grant with the refresh
// grant at the IdP. Rotation is serialized cluster-wide, and the rotated refresh token
// is stored before the access token is handed out: a token the caller never gets costs
// nothing, a rotated refresh token that was never stored costs the grant.
func (b *Broker) backgroundToken(ctx context.Context, subject string) (*oauth2.Token, []string, error) {
	unlock, err := b.cfg.Records.Lock(ctx, offlineLockName(subject))
	if err != nil {
		return nil, nil, err
	}
	defer unlock()
	// From here on the worker hanging up must not cut a rotation in half.
	ctx = context.WithoutCancel(ctx)
	g, err := b.loadOfflineGrant(ctx, subject)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, nil, errNotProvisioned
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reading offline grant: %w", err)
	}
	refreshToken, err := b.openOfflineRefreshToken(g)
	if err != nil {
		return nil, nil, err
	}
	d, err := b.idp.Discovery(ctx)
	if err != nil {
		return nil, nil, err
	}
	idpCtx, cancel := b.offlineIdPContext(ctx)
	defer cancel()
	tok, err := b.provisioningOAuth2(d, g.Scopes).TokenSource(idpCtx, &oauth2.Token{RefreshToken: refreshToken}).Token()
	if err != nil {
		var re *oauth2.RetrieveError
		if errors.As(err, &re) && re.ErrorCode == "invalid_grant" {
			if derr := b.cfg.Records.Delete(ctx, offlineGrantKey(subject)); derr != nil {
				b.logger.Error("flow 2: deleting dead offline grant", zap.String("subject", subject), zap.Error(derr))
			}
			return nil, nil, errOfflineGrantDead
		}
		return nil, nil, fmt.Errorf("%w: refreshing offline grant: %v", ErrIdPUnavailable, oauthErrorOnly(err))
	}
	if tok.RefreshToken != refreshToken {
		g.RotatedAt = b.now().UTC()
		if err := b.putOfflineGrant(ctx, g, tok.RefreshToken); err != nil {
			return nil, nil, fmt.Errorf("storing rotated refresh token: %w", err)
		}
	}
	scopes := g.Scopes
	if s, ok := tok.Extra("scope").(string); ok && strings.TrimSpace(s) != "" {
		scopes = strings.Fields(s)
	}
	return tok, scopes, nil
}
