package flows

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/storage"
)

// issueCode mints a broker authorization code for a finished login, bound to the
// request it answers, and returns it.
func (b *Broker) issueCode(ctx context.Context, s *Session, req AuthorizationRequest) (string, error) {
	code := randomToken()
	resource := req.Resource
	if resource == "" {
		resource = b.cfg.Resource
	}
	rec := AuthorizationCode{
		SessionID:           s.ID,
		FamilyID:            randomToken(),
		ClientID:            req.ClientID,
		RedirectURI:         req.RedirectURI,
		CodeChallenge:       req.CodeChallenge,
		CodeChallengeMethod: req.CodeChallengeMethod,
		Scopes:              req.Scopes,
		Resource:            resource,
		Subject:             s.Subject,
		RedirectURIOmitted:  req.RedirectURIOmitted,
		ExpiresAt:           b.now().Add(b.cfg.CodeTTL),
		FamilyStarted:       true,
	}
	// The family is stored before the code exists, while its id is known to nobody: no
	// replay of the code can be revoking it, so the write needs no storage lock (at
	// redemption it did). A code never redeemed leaves a family with no token in it.
	family := TokenFamily{ID: rec.FamilyID, SessionID: rec.SessionID, ClientID: rec.ClientID}
	if err := b.families.startFresh(ctx, family, b.cfg.CodeTTL); err != nil {
		return "", err
	}
	if err := b.codes.issue(ctx, code, rec); err != nil {
		if derr := b.families.forget(ctx, family.ID); derr != nil {
			b.log.login.Warn("deleting the family of a code not issued", zap.Error(derr))
		}
		return "", err
	}
	return code, nil
}

// exchangeCode is the authorization_code grant (RFC 6749 §4.1.3, RFC 7636 §4.6, RFC 8707).
// The code is taken once before it is checked: any failure after that consumes it.
func (b *Broker) exchangeCode(r *http.Request, form url.Values, client *Client) (TokenResponse, error) {
	code, redirectURI, verifier := form.Get("code"), form.Get("redirect_uri"), form.Get("code_verifier")
	// redirect_uri may be left out only when the authorization request left it out
	// (RFC 6749 §4.1.3); that is known once the code is read, below.
	if code == "" || verifier == "" {
		return TokenResponse{}, errInvalidRequest("code and code_verifier are required")
	}
	if !validCodeVerifier(verifier) {
		return TokenResponse{}, errInvalidRequest("code_verifier must be 43 to 128 unreserved characters")
	}
	resource, ok := singleResource(form)
	if !ok {
		return TokenResponse{}, errInvalidTarget("resource must name this server once")
	}
	ctx := context.WithoutCancel(r.Context()) // a taken code's outcome must be written whole

	if redirectURI == "" {
		// A request that is malformed for this code does not consume it: look before
		// taking (the check after taking stays the one that counts).
		if peek, err := b.codes.peek(ctx, code); err == nil && !peek.RedirectURIOmitted {
			return TokenResponse{}, errInvalidRequest("redirect_uri is required: the authorization request included it")
		}
	}
	rec, err := b.codes.take(ctx, code)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		b.codeReplayed(ctx, code, clientIP(r))
		return TokenResponse{}, errInvalidGrant("the authorization code is invalid, expired or already used")
	case err != nil:
		return TokenResponse{}, errStorage("taking authorization code", err)
	}

	now := b.now()
	switch {
	case !now.Before(rec.ExpiresAt):
		return TokenResponse{}, errInvalidGrant("the authorization code is invalid, expired or already used")
	case rec.ClientID != client.ID:
		b.log.token.Warn("authorization code presented by another client",
			zap.String("client_id", client.ID), zap.String("code", Fingerprint(code)))
		return TokenResponse{}, errInvalidGrant("the authorization code was issued to another client")
	case redirectURI == "" && !rec.RedirectURIOmitted:
		return TokenResponse{}, errInvalidRequest("redirect_uri is required: the authorization request included it")
	case redirectURI != "" && rec.RedirectURI != redirectURI:
		return TokenResponse{}, errInvalidGrant("redirect_uri does not match the authorization request")
	case !pkceMatches(b.constantTimeCompare, rec.CodeChallengeMethod, rec.CodeChallenge, verifier):
		return TokenResponse{}, errInvalidGrant("code_verifier does not match the code challenge")
	case resource != "" && !sameResource(resource, rec.Resource):
		return TokenResponse{}, errInvalidTarget("resource does not match the authorization request")
	}

	switch err := b.startCodeFamily(ctx, rec); {
	case errors.Is(err, errFamilyRevoked):
		return TokenResponse{}, errInvalidGrant("the authorization code is invalid, expired or already used")
	case err != nil:
		return TokenResponse{}, errStorage("redeeming authorization code", err)
	}
	resp, err := b.families.issue(ctx, tokenGrant{
		FamilyID:      rec.FamilyID,
		SessionID:     rec.SessionID,
		Subject:       rec.Subject,
		ClientID:      rec.ClientID,
		Resource:      rec.Resource,
		Scopes:        rec.Scopes,
		RefreshScopes: rec.Scopes,
	})
	if err != nil {
		return TokenResponse{}, errStorage("redeeming authorization code", err)
	}
	b.count(TokenIssued)
	b.log.token.Info("issued broker tokens for an authorization code",
		zap.String("client_id", client.ID), zap.String("family", Fingerprint(rec.FamilyID)))
	b.renewRegistration(ctx, client)
	return resp, nil
}

// startCodeFamily makes sure the family of the redeemed code rec is live: stored with
// the code (issueCode), it is read, since a replay of the code may have revoked it
// already; a code of an earlier release has its family started now.
func (b *Broker) startCodeFamily(ctx context.Context, rec AuthorizationCode) error {
	if rec.FamilyStarted {
		_, err := b.families.live(ctx, rec.FamilyID)
		return err
	}
	return b.families.start(ctx, TokenFamily{ID: rec.FamilyID, SessionID: rec.SessionID, ClientID: rec.ClientID})
}

// codeReplayed revokes what a code issued when the code is presented again after its
// redemption (RFC 6749 §10.5): the family and the session behind it. ip is the client's.
func (b *Broker) codeReplayed(ctx context.Context, code, ip string) {
	used, err := b.codes.used(ctx, code)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return // never issued, or long gone
	case err != nil:
		b.log.token.Error("reading authorization code replay marker", zap.Error(err))
		return
	}
	b.count(TokenReuseDetected)
	b.log.token.Warn("authorization code replayed; revoking what it issued",
		zap.String("code", Fingerprint(code)), zap.String("family", Fingerprint(used.FamilyID)))
	b.audit(auditReuseDetected, ip, zap.String("token_type", "authorization_code"), zap.String("code", Fingerprint(code)),
		zap.String("family", Fingerprint(used.FamilyID)))
	b.revokeGrant(ctx, used.FamilyID, used.SessionID)
	b.audit(auditSessionRevoked, ip, zap.String("reason", "authorization_code_replay"), zap.String("family", Fingerprint(used.FamilyID)))
}

// pkceMatches checks an RFC 7636 S256 code verifier against the stored challenge in
// constant time by compare (crypto/subtle.ConstantTimeCompare, SECURITY.md W3). Only S256 is ever
// accepted.
func pkceMatches(compare func(x, y []byte) int, method, challenge, verifier string) bool {
	if method != "S256" || challenge == "" {
		return false
	}
	sum := sha256.Sum256([]byte(verifier))
	var enc [43]byte // base64url of 32 bytes, unpadded
	base64.RawURLEncoding.Encode(enc[:], sum[:])
	return compare(enc[:], []byte(challenge)) == 1
}

// validCodeVerifier checks RFC 7636 §4.1: 43 to 128 characters of [A-Za-z0-9-._~].
func validCodeVerifier(v string) bool {
	if len(v) < 43 || len(v) > 128 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9',
			c == '-', c == '.', c == '_', c == '~':
		default:
			return false
		}
	}
	return true
}
