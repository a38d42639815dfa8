package flows

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
)

// What the IdP granted. The broker's tokens carry what the client asked for and the IdP
// granted, never more (SECURITY.md: broker tokens and the IdP grant); and the tokens the
// IdP delegates are checked, where they can be read, against the user and the grant they
// were asked for.
//
// Only the scopes the broker manages are compared: the configured scopes, the tool_scope
// scopes, the delegation scopes and those learned from the upstream, less the identity scopes (openid, profile, …), which
// grant nothing upstream and which an IdP's access token need not list. Scopes an IdP
// adds of its own (Keycloak's default client scopes: roles, web-origins, …) never become
// broker scopes and never fail a check.

// managedScopes returns the scopes of cfg the broker compares with what the IdP granted,
// sorted.
func managedScopes(cfg *Config) []string {
	var all []string
	all = append(all, cfg.Scopes...)
	all = append(all, cfg.DelegationScopes...)
	for _, rule := range cfg.ToolScopes {
		all = append(all, rule.Scopes...)
	}
	return sortedSet(nil, slices.DeleteFunc(all, func(s string) bool { return slices.Contains(identityScopes, s) }))
}

// grantedScopes learns which scopes the IdP granted at login, from the first source that
// says: the token answer's `scope`; else the access token's `scope` (or `scp`) claim when
// it is a JWT (decoded, not verified: it came over the back channel from the IdP's token
// endpoint); else RFC 7662 introspection of the access token. Only when the IdP says
// nothing at all is the grant what was asked (RFC 6749 §5.1). An IdP that cannot be
// reached for introspection fails the login with an error wrapping idp.ErrUnavailable.
func (b *Broker) grantedScopes(ctx context.Context, d *idp.Discovery, answerScope, accessToken string, requested []string) ([]string, error) {
	if s := strings.Fields(answerScope); len(s) > 0 {
		return s, nil
	}
	if idp.LooksLikeJWS(accessToken) {
		var c delegatedTokenClaims
		if readJWTPayload(accessToken, &c) {
			if s, ok := c.scopes(); ok {
				return s, nil
			}
		}
	}
	if d.IntrospectionEndpoint != "" {
		s, ok, err := b.introspectScopes(ctx, d.IntrospectionEndpoint, accessToken)
		if err != nil {
			return nil, err
		}
		if ok {
			return s, nil
		}
	}
	b.log.login.Info("the identity provider says nothing of the scopes it granted; taking those asked for (RFC 6749 §5.1)")
	return requested, nil
}

// introspectScopes asks the IdP which scopes an access token of the broker's carries. ok
// is false when the IdP does not say: it refuses the broker, calls the token inactive, or
// names no scope.
func (b *Broker) introspectScopes(ctx context.Context, endpoint, token string) (scopes []string, ok bool, err error) {
	status, body, err := idp.PostIntrospection(ctx, b.cfg.HTTPClient, endpoint, b.cfg.ClientID, b.cfg.ClientSecret, token)
	switch {
	case err != nil:
		return nil, false, fmt.Errorf("%w: introspecting the login's access token: %w", idp.ErrUnavailable, err)
	case status >= 500 || status == http.StatusTooManyRequests:
		return nil, false, fmt.Errorf("%w: introspecting the login's access token: the IdP answered %d", idp.ErrUnavailable, status)
	case status != http.StatusOK:
		b.log.login.Warn("the identity provider refused to introspect the broker's access token", zap.Int("status", status))
		return nil, false, nil
	case len(body) > idp.MaxIntrospectionBytes:
		return nil, false, fmt.Errorf("introspecting the login's access token: answer over %d bytes", idp.MaxIntrospectionBytes)
	}
	var ir idp.IntrospectionResponse
	if err := json.Unmarshal(body, &ir); err != nil {
		return nil, false, fmt.Errorf("introspecting the login's access token: %w", err)
	}
	if !ir.Active || ir.Scope == nil {
		return nil, false, nil
	}
	return *ir.Scope, true, nil
}

// narrowToGrant returns requested less the managed scopes the IdP did not grant, and
// those it dropped.
func (b *Broker) narrowToGrant(requested, granted []string) (kept, dropped []string) {
	managed := b.offer().managed
	for _, s := range requested {
		if slices.Contains(managed, s) && !slices.Contains(granted, s) {
			dropped = append(dropped, s)
			continue
		}
		kept = append(kept, s)
	}
	return kept, dropped
}

// delegatedTokenClaims are the claims of a delegated JWT the broker checks.
type delegatedTokenClaims struct {
	Subject  string         `json:"sub"`
	Audience idp.Audience   `json:"aud"`
	Scope    *idp.ScopeList `json:"scope"`
	Scp      *idp.ScopeList `json:"scp"`
}

// scopes returns the token's scopes, and whether it names any claim for them.
func (c *delegatedTokenClaims) scopes() ([]string, bool) {
	switch {
	case c.Scope != nil:
		return *c.Scope, true
	case c.Scp != nil:
		return *c.Scp, true
	}
	return nil, false
}

// readJWTPayload decodes the payload of a compact JWS into v, unverified.
func readJWTPayload(raw string, v any) bool {
	parts := strings.SplitN(raw, ".", 3)
	if len(parts) != 3 {
		return false
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	return err == nil && json.Unmarshal(payload, v) == nil
}

// errDelegatedToken marks a delegated token the IdP should not have issued.
var errDelegatedToken = errors.New("delegated token refused")

// checkDelegatedToken checks a delegated token the IdP just issued, when it is a JWT
// (an opaque token cannot be read, and is passed on unchecked): its `sub`, when present,
// must be subject; with token exchange its `aud` must name the delegation audience (with
// refresh delegation the IdP fixed `aud` at login: the `oidc` app's is the `resource` of
// the authorization request, else the client's resource identifier, else its client id);
// and its managed scopes must lie within granted, the grant the token was obtained from
// (nil: not known). A refresh that cannot narrow is no error: the per-tool check narrows.
// The payload is decoded, not verified: it came over the back channel from the IdP's
// token endpoint.
func (b *Broker) checkDelegatedToken(tok IdPGrant, subject string, exchanged bool, granted []string) error {
	if !idp.LooksLikeJWS(tok.AccessToken) {
		return nil
	}
	var c delegatedTokenClaims
	if !readJWTPayload(tok.AccessToken, &c) {
		return &delegationError{failMalformed, fmt.Errorf("%w: undecodable JWT claims", errDelegatedToken)}
	}
	if c.Subject != "" && c.Subject != subject {
		return &delegationError{failMalformed, fmt.Errorf("%w: sub is not the user's", errDelegatedToken)}
	}
	if exchanged && b.cfg.DelegationAudience != "" && !slices.Contains(c.Audience, b.cfg.DelegationAudience) {
		return &delegationError{failMalformed, fmt.Errorf("%w: aud %q does not name the delegation audience %q",
			errDelegatedToken, []string(c.Audience), b.cfg.DelegationAudience)}
	}
	if granted == nil {
		return nil
	}
	scopes, _ := c.scopes()
	managed := b.offer().managed
	var wider []string
	for _, s := range scopes {
		if slices.Contains(managed, s) && !slices.Contains(granted, s) {
			wider = append(wider, s)
		}
	}
	if len(wider) > 0 {
		return &delegationError{failMalformed, fmt.Errorf("%w: scope %q exceeds the user's grant",
			errDelegatedToken, strings.Join(wider, " "))}
	}
	return nil
}
