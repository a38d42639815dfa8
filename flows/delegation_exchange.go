package flows

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
)

// RFC 8693 token exchange, the broker as client of the IdP's token endpoint. x/oauth2 has
// no helper for this grant (and the go-sdk's oauthex one is SEP-990-shaped and test-only
// here), so it is a small form POST with client_secret_basic, which zitadel requires for
// token exchange, and a bounded read of the answer.

// Token types of RFC 8693 §3.
const (
	rfc8693AccessToken = "urn:ietf:params:oauth:token-type:access_token"
	rfc8693JWT         = "urn:ietf:params:oauth:token-type:jwt"
)

const (
	// maxIdPTokenAnswerBytes bounds the read of a token endpoint's answer.
	maxIdPTokenAnswerBytes = 64 << 10
	// unknownIdPTokenLifetime is assumed for a token whose answer has no expires_in.
	unknownIdPTokenLifetime = 60 * time.Second
)

// exchangeSubject exchanges subject (an IdP access token) for a token for the delegation
// audience with scopes (none: the IdP's default, at most the subject's own). The token's
// Scopes are left for the caller to set to the grant it came from.
func (b *Broker) exchangeSubject(ctx context.Context, subject string, scopes []string) (IdPGrant, error) {
	form := url.Values{
		"grant_type":           {idp.GrantTypeTokenExchange},
		"subject_token":        {subject},
		"subject_token_type":   {rfc8693AccessToken},
		"requested_token_type": {rfc8693AccessToken},
	}
	if b.cfg.DelegationAudience != "" {
		// RFC 8693 `audience`, a logical name (`nextcloud`). `resource` is not sent:
		// zitadel answers it with invalid_target and Keycloak ignores it.
		form.Set("audience", b.cfg.DelegationAudience)
	}
	if len(scopes) > 0 {
		form.Set("scope", strings.Join(scopes, " "))
	}
	res, err := b.idpTokenRequest(ctx, "token exchange", form)
	if err != nil {
		return IdPGrant{}, err
	}
	if t, _ := res.Extra("issued_token_type").(string); t != "" && t != rfc8693AccessToken && t != rfc8693JWT {
		return IdPGrant{}, &delegationError{failMalformed, fmt.Errorf("token exchange: issued_token_type %q is no access token", t)}
	}
	return IdPGrant{Token: oauth2.Token{AccessToken: res.AccessToken, Expiry: res.Expiry}}, nil
}

// exchangeForSession exchanges the IdP access token of a hybrid session, refreshed first
// when it has expired. The token's Scopes are the session's grant.
func (b *Broker) exchangeForSession(ctx context.Context, session string, scopes []string) (IdPGrant, error) {
	subject, refreshed, err := b.sessionAccessToken(ctx, session, nil, "")
	if err != nil {
		return IdPGrant{}, err
	}
	tok, err := b.exchangeSubject(ctx, subject.AccessToken, scopes)
	var de *delegationError
	if err != nil && errors.As(err, &de) && de.kind == failRejected && subject.Expiry.IsZero() && !refreshed {
		// The login's answer said nothing of the token's lifetime: it may just have
		// expired. Refresh once and try again.
		if subject, _, err = b.sessionAccessToken(ctx, session, nil, subject.AccessToken); err != nil {
			return IdPGrant{}, err
		}
		tok, err = b.exchangeSubject(ctx, subject.AccessToken, scopes)
	}
	tok.Scopes = subject.Scopes
	return tok, err
}

// idpTokenAnswer is the JSON of a token endpoint's answer, success (RFC 6749 §5.1, RFC 8693
// §2.2.1) or error (§5.2).
type idpTokenAnswer struct {
	AccessToken     string       `json:"access_token"`
	TokenType       string       `json:"token_type"`
	IssuedTokenType string       `json:"issued_token_type"`
	ExpiresIn       idpExpiresIn `json:"expires_in"`
	RefreshToken    string       `json:"refresh_token"`
	IDToken         string       `json:"id_token"`
	Scope           string       `json:"scope"`
	Error           string       `json:"error"`
}

// idpExpiresIn takes a number, or a number in a string as some IdPs send it.
type idpExpiresIn int64

func (e *idpExpiresIn) UnmarshalJSON(b []byte) error {
	s := string(bytes.Trim(b, `"`))
	if s == "" || s == "null" {
		*e = 0
		return nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return fmt.Errorf("expires_in: %w", err)
	}
	*e = idpExpiresIn(f)
	return nil
}

// idpTokenRequest posts form to the IdP's token endpoint with the broker's credentials
// and reads the answer, classifying any failure. what names the grant in errors. The
// answer's id_token, scope and issued_token_type are the token's Extra, as x/oauth2 keeps
// them for its own requests.
func (b *Broker) idpTokenRequest(ctx context.Context, what string, form url.Values) (*oauth2.Token, error) {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.IdPTimeout)
	defer cancel()
	disc, err := b.idp.Discovery(ctx)
	if err != nil {
		return nil, unavailable(what, err)
	}
	if disc.TokenEndpoint == "" {
		return nil, &delegationError{failMalformed, fmt.Errorf("%s: the discovery document names no token endpoint", what)}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, disc.TokenEndpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, &delegationError{failInternal, fmt.Errorf("%s: building request: %w", what, err)}
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	// RFC 6749 §2.3.1: form-encoded, then Basic.
	req.SetBasicAuth(url.QueryEscape(b.cfg.ClientID), url.QueryEscape(b.cfg.ClientSecret))

	resp, err := b.cfg.HTTPClient.Do(req)
	if err != nil {
		// Transport errors carry the URL and the cause, never the form.
		return nil, unavailable(what, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxIdPTokenAnswerBytes+1))
	if err != nil {
		return nil, unavailable(what+": reading the answer", err)
	}
	now := b.now()
	if resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests {
		return nil, unavailable(what, fmt.Errorf("%w: token endpoint answered %s", idp.ErrUnavailable, resp.Status))
	}
	if len(body) > maxIdPTokenAnswerBytes {
		return nil, &delegationError{failMalformed, fmt.Errorf("%s: answer over %d bytes", what, maxIdPTokenAnswerBytes)}
	}
	var a idpTokenAnswer
	if err := json.Unmarshal(body, &a); err != nil {
		return nil, &delegationError{failMalformed, fmt.Errorf("%s: %s answer is not token JSON", what, resp.Status)}
	}
	if resp.StatusCode != http.StatusOK || a.Error != "" { // some IdPs refuse with 200
		return nil, tokenEndpointRefusal(what, resp.StatusCode, a.Error)
	}
	switch {
	case a.AccessToken == "":
		return nil, &delegationError{failMalformed, fmt.Errorf("%s: answer without access_token", what)}
	case !strings.EqualFold(a.TokenType, "bearer"):
		return nil, &delegationError{failMalformed, fmt.Errorf("%s: token_type %q is not Bearer", what, a.TokenType)}
	}
	life := time.Duration(a.ExpiresIn) * time.Second
	if a.ExpiresIn <= 0 {
		life = unknownIdPTokenLifetime
	}
	tok := &oauth2.Token{AccessToken: a.AccessToken, TokenType: a.TokenType, RefreshToken: a.RefreshToken, Expiry: now.Add(life)}
	return tok.WithExtra(map[string]any{"id_token": a.IDToken, "scope": a.Scope, "issued_token_type": a.IssuedTokenType}), nil
}

// tokenEndpointRefusal classifies an OAuth error answer (RFC 6749 §5.2) of the token
// endpoint. Only the error code is kept: an IdP's description is never repeated.
func tokenEndpointRefusal(what string, status int, code string) error {
	err := fmt.Errorf("%s: token endpoint answered %d %q", what, status, code)
	switch code {
	case "invalid_grant", "invalid_token", "invalid_request":
		// The subject token or refresh token is expired, revoked or not exchangeable.
		// zitadel answers invalid_request for a subject_token it cannot verify.
		return &delegationError{failRejected, err}
	case "invalid_scope":
		return &delegationError{failScope, err}
	case "temporarily_unavailable", "server_error":
		return &delegationError{failUnavailable, err}
	case "":
		return &delegationError{failMalformed, err}
	default:
		// invalid_client, unauthorized_client, unsupported_grant_type, invalid_target…:
		// the broker's configuration or the IdP's, not the user's.
		return &delegationError{failRefused, err}
	}
}
