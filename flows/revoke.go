package flows

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// maxIdPRevocationBytes bounds what is read of the IdP's answer to a revocation.
const maxIdPRevocationBytes = 4 << 10

// serveRevoke is RFC 7009 token revocation for the broker's own tokens. Revoking an
// access or a refresh token ends everything behind it: its token family, the session,
// and the session's grant at the IdP. The answer is 200 for any token that is not a
// live token of the authenticated client (RFC 7009 §2.2): for that client such a token
// is invalid, and an error would tell a client that a token of another one exists.
func (b *Broker) serveRevoke(w http.ResponseWriter, r *http.Request) {
	if answerTokenPreflight(w, r) {
		return
	}
	if err := b.revoke(w, r); err != nil {
		b.writeError(w, r, err)
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
}

// revoke revokes what the request's token stands for, if it is a live token of the
// request's client.
func (b *Broker) revoke(w http.ResponseWriter, r *http.Request) error {
	form, client, err := b.tokenRequest(w, r)
	if err != nil {
		return err
	}
	raw := form.Get("token")
	if raw == "" {
		return errInvalidRequest("token is required")
	}
	// token_type_hint needs no reading: the prefix of a broker token says its type.
	ctx := context.WithoutCancel(r.Context()) // a revocation, once begun, is carried out whole
	var familyID, sessionID, owner, subject string
	switch {
	case isBrokerToken(raw, accessTokenPrefix):
		var at AccessToken
		at, err = b.families.accessToken(ctx, raw)
		familyID, sessionID, owner, subject = at.FamilyID, at.SessionID, at.ClientID, at.Subject
	case isBrokerToken(raw, refreshTokenPrefix):
		var rt RefreshToken
		rt, err = b.families.refreshToken(ctx, raw)
		familyID, sessionID, owner, subject = rt.FamilyID, rt.SessionID, rt.ClientID, rt.Subject
	default:
		err = storage.ErrNotFound
	}
	switch {
	case errors.Is(err, storage.ErrNotFound):
	case err != nil:
		return errStorage("reading token to revoke", err) // RFC 7009 §2.2.1 allows 503
	case owner != client.ID:
		b.log.token.Warn("revocation of another client's token ignored",
			zap.String("client_id", client.ID), zap.String("token", Fingerprint(raw)))
	default:
		b.count(TokenRevoked)
		b.log.token.Info("revoking broker tokens",
			zap.String("client_id", client.ID), zap.String("family", Fingerprint(familyID)))
		b.revokeGrant(ctx, familyID, sessionID)
		b.audit(auditSessionRevoked, clientIP(r), zap.String("reason", "revocation_request"), zap.String("subject", subject),
			zap.String("client_id", client.ID), zap.String("family", Fingerprint(familyID)))
		// The user's app password is the user's: it ends with the user's last session
		// (SECURITY.md S1.29).
		b.releaseAppPassword(ctx, subject, sessionID, "revocation_request", clientIP(r))
	}
	return nil
}

// revokeGrant ends a token family and, when sessionID is set, the session behind it with
// its IdP grant and this node's delegated tokens for it. Failures are logged: the
// revocation on this node happens anyway.
func (b *Broker) revokeGrant(ctx context.Context, familyID, sessionID string) {
	if sessionID != "" {
		// At once, before storage is touched: a request that passed its token check just
		// before the revocation must not find a delegated token cached for the session.
		b.evictDelegated(sessionID)
	}
	if err := b.revokeFamily(ctx, familyID, sessionID); err != nil {
		b.log.token.Error("revoking token family", zap.String("family", Fingerprint(familyID)), zap.Error(err))
	}
	if sessionID != "" {
		b.endSession(ctx, sessionID)
		// Again once the session is gone: a delegation that read the session after the
		// first eviction may have cached its token since. Later ones find no session.
		b.evictDelegated(sessionID)
	}
}

// endSession revokes a session's IdP grant at the IdP and deletes the session, under the
// session's lock so that the grant revoked is the current one.
func (b *Broker) endSession(ctx context.Context, id string) {
	unlock, err := b.sessions.lock(ctx, id)
	if err != nil {
		b.log.token.Error("locking session to end it", zap.Error(err))
		return
	}
	defer unlock()
	s, err := b.sessions.load(ctx, id)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return
	case err != nil:
		b.log.token.Error("reading session to end it", zap.Error(err))
		return
	}
	if s.EnterpriseIssuer != "" {
		// From an ID-JAG: no IdP grant to revoke.
	} else if g, err := b.sessions.grant(s); err != nil {
		b.log.token.Error("ending session", zap.Error(err))
	} else {
		b.revokeAtIdP(ctx, g)
	}
	if err := b.sessions.end(ctx, id); err != nil {
		b.log.token.Error("deleting session", zap.Error(err))
	}
}

// revokeAtIdP asks the IdP to revoke a grant (RFC 7009), when it advertises a revocation
// endpoint: the refresh token, which takes the access tokens with it at most IdPs, else
// the access token. Failures are logged, never fatal: the broker has forgotten the grant.
func (b *Broker) revokeAtIdP(ctx context.Context, g IdPGrant) {
	token, hint := g.RefreshToken, "refresh_token"
	if token == "" {
		token, hint = g.AccessToken, "access_token"
	}
	if token == "" {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, b.cfg.IdPTimeout)
	defer cancel()
	d, err := b.idp.Discovery(ctx)
	if err != nil {
		b.log.token.Warn("revoking the IdP grant: no discovery", zap.Error(err))
		return
	}
	if d.RevocationEndpoint == "" {
		return
	}
	form := url.Values{"token": {token}, "token_type_hint": {hint}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.RevocationEndpoint, strings.NewReader(form.Encode()))
	if err != nil {
		b.log.token.Warn("revoking the IdP grant: building request", zap.Error(err))
		return
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	// RFC 6749 §2.3.1: the credentials are form-encoded before Basic encoding.
	req.SetBasicAuth(url.QueryEscape(b.cfg.ClientID), url.QueryEscape(b.cfg.ClientSecret))
	resp, err := b.cfg.HTTPClient.Do(req)
	if err != nil {
		b.log.token.Warn("revoking the IdP grant", zap.Error(err))
		return
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxIdPRevocationBytes))
	if resp.StatusCode != http.StatusOK {
		b.log.token.Warn("revoking the IdP grant: the IdP refused", zap.Int("status", resp.StatusCode))
	}
}
