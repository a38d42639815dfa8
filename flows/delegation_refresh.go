package flows

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// The session's IdP grant, refreshed: for the subject of a token exchange in hybrid mode
// (the whole grant, through x/oauth2), and as delegation refresh, the fallback for IdPs
// without RFC 8693 such as the Nextcloud oidc app up to 2.0.9 (narrowed with `scope`, and
// `resource` when the delegation audience is a URL: a form POST, since x/oauth2's refresh
// sends neither).
//
// Refreshes are serialized across the cluster by the session's storage lock. Whoever
// holds it re-reads the session first (another node may have rotated the grant while
// this one waited, and then its token is used as is), refreshes, and stores the rotated
// refresh token, sealed, before the new access token is used: a rotation is never lost
// to a crash between the IdP's answer and the store.

// minSubjectLife is how long a stored IdP access token must still live to be used
// rather than refreshed.
const minSubjectLife = 30 * time.Second

// refreshDelegated is delegation refresh: the session's IdP access token narrowed to
// scopes, refreshed when it is not yet narrowed or about to expire.
// The token's Scopes are the session's grant.
func (b *Broker) refreshDelegated(ctx context.Context, session string, scopes []string) (IdPGrant, error) {
	if len(scopes) == 0 {
		scopes = nil // nothing to narrow to: the whole grant
	}
	t, _, err := b.sessionAccessToken(ctx, session, scopes, "")
	if err != nil {
		return IdPGrant{}, err
	}
	expiry := t.Expiry
	if expiry.IsZero() {
		expiry = b.now().Add(unknownIdPTokenLifetime)
	}
	return IdPGrant{Token: oauth2.Token{AccessToken: t.AccessToken, Expiry: expiry}, Scopes: t.Scopes}, nil
}

// sessionAccessToken returns the access token of the session's IdP grant, narrowed to
// scopes (nil: the whole grant), refreshing the grant when the stored token is narrowed
// otherwise, expires within minSubjectLife, or is stale (the IdP just refused it). It
// returns the session's grant (a zero Expiry: the IdP did not say) and whether this call
// refreshed it.
func (b *Broker) sessionAccessToken(ctx context.Context, id string, scopes []string, stale string) (g IdPGrant, refreshed bool, err error) {
	_, g, err = b.loadSessionGrant(ctx, id)
	if err != nil {
		return IdPGrant{}, false, err
	}
	if b.grantUsable(g, scopes, stale) {
		return g, false, nil
	}

	unlock, err := b.sessions.lock(ctx, id)
	if err != nil {
		return IdPGrant{}, false, &delegationError{failStorage, fmt.Errorf("locking session for refresh: %w", err)}
	}
	defer unlock()
	// Another node, or another flight of this one, may have refreshed meanwhile.
	s, g, err := b.loadSessionGrant(ctx, id)
	if err != nil {
		return IdPGrant{}, false, err
	}
	if b.grantUsable(g, scopes, stale) {
		return g, false, nil
	}
	if g.RefreshToken == "" {
		return IdPGrant{}, false, &delegationError{failRejected, errors.New("refreshing session grant: the IdP gave no refresh token")}
	}
	next, err := b.refreshIdPGrant(ctx, g, scopes)
	if err != nil {
		return IdPGrant{}, false, err
	}
	s.ConfirmedAt = b.now() // the IdP just showed the grant alive: the broker's refresh need not ask
	if err := b.storeRotatedGrant(ctx, s, next); err != nil {
		return IdPGrant{}, false, err
	}
	return next, true, nil
}

// loadSessionGrant loads a session and opens its grant.
func (b *Broker) loadSessionGrant(ctx context.Context, id string) (*Session, IdPGrant, error) {
	s, err := b.sessions.load(ctx, id)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, IdPGrant{}, &delegationError{failSessionGone, errors.New("loading session: not found")}
	}
	if err != nil {
		return nil, IdPGrant{}, &delegationError{failStorage, fmt.Errorf("loading session: %w", err)}
	}
	if s.EnterpriseIssuer != "" {
		return nil, IdPGrant{}, errNoIdPGrant
	}
	g, err := b.sessions.grant(s)
	if err != nil {
		// Sealed under a key no longer in the ring: the session cannot be used again.
		return nil, IdPGrant{}, &delegationError{failSessionGone, err}
	}
	return s, g, nil
}

// grantUsable tells whether g's access token can be used for scopes without a refresh.
func (b *Broker) grantUsable(g IdPGrant, scopes []string, stale string) bool {
	if g.AccessToken == "" || g.AccessToken == stale || !slices.Equal(g.AccessTokenScopes, scopes) {
		return false
	}
	return g.Expiry.IsZero() || g.Expiry.Sub(b.now()) > minSubjectLife
}

// storeRotatedGrant stores the grant a refresh produced. The IdP has already rotated the
// refresh token, so the store is not left to a caller's deadline, and is tried twice.
func (b *Broker) storeRotatedGrant(ctx context.Context, s *Session, g IdPGrant) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.IdPTimeout)
	defer cancel()
	err := b.sessions.rotateGrant(ctx, s, g)
	if err != nil {
		err = b.sessions.rotateGrant(ctx, s, g)
	}
	if err != nil {
		b.log.delegation.Error("the IdP rotated a session's refresh token and storing it failed; the session will need a new login")
		return &delegationError{failStorage, fmt.Errorf("storing refreshed session grant: %w", err)}
	}
	return nil
}

// refreshIdPGrant refreshes g at the IdP: the whole grant when scopes is nil, else narrowed
// to scopes. The answer's refresh token replaces g's (the IdP may have rotated it).
func (b *Broker) refreshIdPGrant(ctx context.Context, g IdPGrant, scopes []string) (IdPGrant, error) {
	var res *oauth2.Token
	var err error
	if scopes == nil {
		res, err = b.refreshWhole(ctx, g.RefreshToken)
	} else {
		res, err = b.refreshNarrowed(ctx, g, scopes)
	}
	if err != nil {
		return IdPGrant{}, err
	}
	next := IdPGrant{
		Token:             oauth2.Token{AccessToken: res.AccessToken, RefreshToken: res.RefreshToken, Expiry: res.Expiry},
		Scopes:            g.Scopes,
		AccessTokenScopes: scopes,
	}
	next.IDToken, _ = res.Extra("id_token").(string)
	if next.RefreshToken == "" { // not rotated: the old one stays good (RFC 6749 §6)
		next.RefreshToken = g.RefreshToken
	}
	if next.IDToken == "" {
		next.IDToken = g.IDToken
	}
	answerScope, _ := res.Extra("scope").(string)
	if answered := strings.Fields(answerScope); scopes == nil && len(answered) > 0 {
		// The answer to a refresh of the whole grant names the grant as it is now: a scope
		// the IdP has withdrawn since the login is gone from it (never one added).
		next.Scopes = slices.DeleteFunc(slices.Clone(g.Scopes), func(s string) bool { return !slices.Contains(answered, s) })
	}
	return next, nil
}

// refreshNarrowed is the refresh grant with `scope` (RFC 6749 §6: at most the original
// grant) and `resource` where configured. offline_access is kept when the grant has it,
// so that an IdP narrowing the refresh token along with the access token still issues
// one next time.
func (b *Broker) refreshNarrowed(ctx context.Context, g IdPGrant, scopes []string) (*oauth2.Token, error) {
	ask := scopes
	if slices.Contains(g.Scopes, "offline_access") && !slices.Contains(ask, "offline_access") {
		ask = append(slices.Clone(ask), "offline_access")
	}
	form := url.Values{
		"grant_type":    {"refresh_token"},
		"refresh_token": {g.RefreshToken},
		"scope":         {strings.Join(ask, " ")},
	}
	if r := b.delegation.resource; r != "" {
		form.Set("resource", r)
	}
	return b.idpTokenRequest(ctx, "refreshing session grant", form)
}

// refreshWhole refreshes the whole grant with x/oauth2.
func (b *Broker) refreshWhole(ctx context.Context, refreshToken string) (*oauth2.Token, error) {
	const what = "refreshing session grant"
	ctx, cancel := context.WithTimeout(ctx, b.cfg.IdPTimeout)
	defer cancel()
	disc, err := b.idp.Discovery(ctx)
	if err != nil {
		return nil, unavailable(what, err)
	}
	conf := &oauth2.Config{
		ClientID:     b.cfg.ClientID,
		ClientSecret: b.cfg.ClientSecret,
		// Basic, stated: AuthStyleAutoDetect would retry a refused refresh with the
		// credentials in the body, spending a second attempt of a rotating token.
		Endpoint: oauth2.Endpoint{TokenURL: disc.TokenEndpoint, AuthStyle: oauth2.AuthStyleInHeader},
	}
	t, err := conf.TokenSource(context.WithValue(ctx, oauth2.HTTPClient, b.cfg.HTTPClient),
		&oauth2.Token{RefreshToken: refreshToken}).Token()
	if err != nil {
		return nil, oauth2Failure(what, err)
	}
	if t.TokenType != "" && !strings.EqualFold(t.TokenType, "bearer") {
		return nil, &delegationError{failMalformed, fmt.Errorf("%s: token_type %q is not Bearer", what, t.TokenType)}
	}
	if t.Expiry.IsZero() {
		t.Expiry = b.now().Add(unknownIdPTokenLifetime)
	}
	return t, nil
}

// oauth2Failure classifies an error of x/oauth2's token request. Its RetrieveError text
// holds the IdP's answer, so only the status and error code are kept.
func oauth2Failure(what string, err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		status := 0
		if re.Response != nil {
			status = re.Response.StatusCode
		}
		if status >= 500 || status == http.StatusTooManyRequests {
			return unavailable(what, fmt.Errorf("%w: token endpoint answered %d", idp.ErrUnavailable, status))
		}
		return tokenEndpointRefusal(what, status, re.ErrorCode)
	}
	var ue *url.Error
	if errors.As(err, &ue) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return unavailable(what, err)
	}
	// x/oauth2's own complaints about the answer: no access_token, JSON that does not parse.
	return &delegationError{failMalformed, fmt.Errorf("%s: %w", what, err)}
}
