package flows

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"go.uber.org/zap"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// The IdP leg of a hybrid login: after consent the broker sends the browser to the IdP
// as its own confidential client (PKCE S256, nonce, a random single-use state), and the
// callback turns the IdP's code into a session and a broker code for the MCP client.

// idpStateTTL is how long a login may take at the IdP.
const idpStateTTL = 10 * time.Minute

// redirectToIdP stores the approved request under a fresh state and sends the browser
// to the IdP's (public) authorization endpoint. Its errors go to the client's redirect URI.
func (b *Broker) redirectToIdP(w http.ResponseWriter, r *http.Request, req AuthorizationRequest) error {
	d, err := b.idp.Discovery(r.Context())
	if err != nil {
		return errIdPUnavailable(fmt.Errorf("login: %w", err)).to(req.RedirectURI, req.State, false)
	}
	state, nonce, verifier := randomToken(), randomToken(), oauth2.GenerateVerifier()
	sealed, err := b.logins.sealVerifier(state, verifier)
	if err == nil {
		// A cookie set but not stored (Put failing) is harmless: it binds nothing.
		binding := b.bindLoginToBrowser(w, state, pathCallback, idpStateTTL)
		err = b.logins.put(r.Context(), state, PendingLogin{Request: req, Nonce: nonce, PKCEVerifier: sealed, BrowserBinding: binding})
	}
	if err != nil {
		return errStorage("login: storing pending login", err).to(req.RedirectURI, req.State, false)
	}
	conf := b.idpOAuthConfig(oauth2.Endpoint{AuthURL: d.BrowserAuthorizationEndpoint}, req.Scopes)
	// prompt=consent: Nextcloud and Keycloak issue a refresh token for offline_access
	// only with consent.
	target := conf.AuthCodeURL(state, b.idpAuthorizeOptions(verifier, nonce)...)
	b.log.login.Info("sending the browser to the identity provider", zap.String("client_id", req.ClientID))
	b.login(LoginHybrid, LoginStarted)
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, target, http.StatusFound)
	return nil
}

// idpOAuthConfig is the broker as a client of the IdP at endpoint, for a login of a
// client granted granted: see idpLoginScopes.
func (b *Broker) idpOAuthConfig(endpoint oauth2.Endpoint, granted []string) *oauth2.Config {
	return &oauth2.Config{
		ClientID:     b.cfg.ClientID,
		ClientSecret: b.cfg.ClientSecret,
		Endpoint:     endpoint,
		RedirectURL:  b.issuer + pathCallback,
		Scopes:       idpLoginScopes(granted),
	}
}

// idpLoginScopes are what the IdP is asked for in the login of a client granted granted
// (the scopes of its authorization request, as the broker decided them): openid for the
// ID token, offline_access for the refresh token that delegation and the confirmation
// of the grant use, and the client's scopes; never a configured scope the client was not
// granted. An IdP that ignores `scope` on refresh (the Nextcloud oidc app) would put
// every scope of the login into each delegated token (SECURITY.md S1.20).
func idpLoginScopes(granted []string) []string {
	scopes := []string{"openid", "offline_access"}
	for _, s := range granted {
		scopes = appendUnique(scopes, s)
	}
	return scopes
}

// idpAuthorizeOptions are the parameters of a login at the IdP's authorization endpoint
// besides those of oauth2.Config: PKCE S256, the nonce, prompt=consent, and RFC 8707
// `resource` when the delegation audience is a URL (the Nextcloud oidc app fixes the
// `aud` of every token of the grant from it at authorization).
func (b *Broker) idpAuthorizeOptions(verifier, nonce string) []oauth2.AuthCodeOption {
	opts := []oauth2.AuthCodeOption{
		oauth2.S256ChallengeOption(verifier),
		oauth2.SetAuthURLParam("nonce", nonce),
		oauth2.SetAuthURLParam("prompt", "consent"),
	}
	if b.delegation != nil && b.delegation.resource != "" {
		opts = append(opts, oauth2.SetAuthURLParam("resource", b.delegation.resource))
	}
	return opts
}

// serveCallback finishes a hybrid login at /oauth/callback.
func (b *Broker) serveCallback(w http.ResponseWriter, r *http.Request) {
	if err := b.callback(w, r); err != nil {
		b.writeError(w, r, err)
	}
}

// callback takes the pending login of the IdP's answer, redeems the IdP's code and sends
// the browser back to the client with a broker code. Until the pending login is read,
// errors are JSON; afterwards they go to the client's redirect URI. It answers only on
// success and for the pages a person reads.
func (b *Broker) callback(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return errMethodNotAllowed("GET")
	}
	if err := b.allowOneTimeValue(r, errConsentPage(http.StatusTooManyRequests,
		"Too many logins from your network right now. Wait a minute, then start again from the application.")); err != nil {
		return err
	}
	q := r.URL.Query()
	state := q.Get("state")
	if state == "" || len(state) > maxTicketLen {
		return errInvalidRequest("unknown or expired login state")
	}
	// The browser binding is checked before the pending login is taken: a browser that
	// did not start this login must not spend it for the one that did.
	pending, err := b.logins.peek(r.Context(), state)
	switch {
	case err == nil && !b.loginBoundToBrowser(r, state, pending.BrowserBinding):
		b.log.login.Warn("the login returned to a browser that did not start it; nothing issued",
			zap.String("client_id", pending.Request.ClientID), zap.String("state", Fingerprint(state)))
		return b.loginFailed(LoginHybrid, LoginFailedWrongBrowser, errConsentPage(http.StatusForbidden, notThisBrowserMessage))
	case err != nil && !errors.Is(err, storage.ErrNotFound):
		return b.loginFailed(LoginHybrid, LoginFailedStorage,
			errStorage("callback: loading pending login", err))
	}
	if pending, err = b.logins.take(r.Context(), state); err != nil {
		if !errors.Is(err, storage.ErrNotFound) {
			return b.loginFailed(LoginHybrid, LoginFailedStorage,
				errStorage("callback: taking pending login", err))
		}
		b.log.login.Info("unknown, replayed or expired state", zap.String("state", Fingerprint(state)))
		return b.loginFailed(LoginHybrid, LoginFailedUnknownState, errInvalidRequest("unknown or expired login state"))
	}
	b.clearLoginBinding(w, state, pathCallback)
	req := pending.Request
	if err := b.finishLogin(w, r, q, state, pending); err != nil {
		return err.to(req.RedirectURI, req.State, false)
	}
	return nil
}

// finishLogin redeems the IdP's code of a pending login and sends the browser back to the
// client with a broker code. Its errors go to the client's redirect URI.
func (b *Broker) finishLogin(w http.ResponseWriter, r *http.Request, q url.Values, state string, pending PendingLogin) *requestError {
	outcome, err := b.finishLoginOutcome(w, r, q, state, pending)
	if err != nil {
		b.login(LoginHybrid, outcome)
		return err
	}
	b.login(LoginHybrid, LoginCompleted)
	return nil
}

// finishLoginOutcome is finishLogin, saying why it failed.
func (b *Broker) finishLoginOutcome(w http.ResponseWriter, r *http.Request, q url.Values, state string, pending PendingLogin) (LoginOutcome, *requestError) {
	req := pending.Request
	if idpErr := q.Get("error"); idpErr != "" {
		if err := b.checkIdPResponseIssuer(r.Context(), q.Get("iss")); errors.Is(err, idp.ErrUnavailable) {
			return LoginFailedIdPUnreachable, errIdPUnavailable(fmt.Errorf("callback: client %s: %w", req.ClientID, err))
		} else if err != nil {
			return LoginFailedCodeRefused, errServer(http.StatusBadGateway, "the login at the identity provider could not be verified",
				fmt.Errorf("callback: error response refused for client %s: %w", req.ClientID, err))
		}
		// The IdP's words stay in the log (SECURITY.md W11); the client gets a fixed code.
		b.log.login.Info("the identity provider refused the login",
			zap.String("client_id", req.ClientID), zap.String("idp_error", truncateForLog(idpErr, 64)))
		switch idpErr {
		case "access_denied":
			return LoginFailedIdPDenied, newRequestError(http.StatusBadRequest, "access_denied", "the user or the identity provider denied the request")
		case "temporarily_unavailable":
			return LoginFailedIdPUnavailable, newRequestError(http.StatusServiceUnavailable, "temporarily_unavailable", "the identity provider cannot be reached; try again shortly")
		default:
			return LoginFailedIdPError, newRequestError(http.StatusBadRequest, "server_error", "the identity provider refused the login")
		}
	}
	code := q.Get("code")
	if code == "" {
		return LoginFailedIdPNoCode, newRequestError(http.StatusBadGateway, "server_error", "the identity provider returned no code")
	}
	verifier, err := b.logins.openVerifier(state, pending.PKCEVerifier)
	if err != nil {
		return LoginFailedStorage, errServer(http.StatusInternalServerError, "the login could not be finished", fmt.Errorf("callback: opening PKCE verifier: %w", err))
	}

	ctx, cancel := context.WithTimeout(r.Context(), b.cfg.IdPTimeout)
	defer cancel()
	grant, err := b.exchangeIdPCode(ctx, code, verifier, pending.Nonce, q.Get("iss"), req.Scopes)
	if err != nil {
		if errors.Is(err, idp.ErrUnavailable) {
			return LoginFailedIdPUnreachable, errIdPUnavailable(fmt.Errorf("callback: client %s: %w", req.ClientID, err))
		}
		return LoginFailedCodeRefused, errServer(http.StatusBadGateway, "the login at the identity provider could not be verified",
			fmt.Errorf("callback: login refused for client %s: %w", req.ClientID, err))
	}

	// The session, its code and tokens carry what the client asked for and the IdP granted.
	var dropped []string
	if req.Scopes, dropped = b.narrowToGrant(req.Scopes, grant.Scopes); len(dropped) > 0 {
		b.log.login.Info("the identity provider did not grant scopes the client asked for",
			zap.String("client_id", req.ClientID), zap.String("subject", grant.Subject), zap.Strings("scopes", dropped))
	}
	s, err := b.sessions.create(r.Context(), grant.Subject, req.ClientID, req.Scopes, grant)
	if err != nil {
		return LoginFailedStorage, errStorage("callback: creating session", err)
	}
	brokerCode, err := b.issueCode(r.Context(), s, req)
	if err != nil {
		if derr := b.sessions.end(r.Context(), s.ID); derr != nil {
			b.log.login.Warn("deleting unused session", zap.Error(derr))
		}
		return LoginFailedStorage, errStorage("callback: issuing code", err)
	}
	b.noteAppPasswordSession(r.Context(), grant.Subject, s.ID)
	b.log.login.Info("login finished", zap.String("client_id", req.ClientID), zap.String("subject", grant.Subject))
	b.audit(auditSessionCreated, clientIP(r), zap.String("subject", grant.Subject), zap.String("client_id", req.ClientID),
		zap.String("session", Fingerprint(s.ID)))
	q = url.Values{"code": {brokerCode}, "iss": {b.issuer}}
	if req.State != "" {
		q.Set("state", req.State)
	}
	redirectWithQuery(w, r, req.RedirectURI, q)
	return LoginCompleted, nil
}

// exchangeIdPCode redeems an IdP authorization code with its PKCE verifier at the token
// endpoint and verifies the ID token that comes with it: signature, issuer, audience =
// the broker's client id (and azp when there are several), expiry, nonce, and at_hash
// when present. iss is the callback's RFC 9207 parameter ("" when absent): checked when
// the IdP sent one, and required when the IdP advertises it (mix-up defense).
// clientScopes are the client's scopes the login was asked for. Errors wrap
// idp.ErrUnavailable when the IdP could not be reached or failed.
func (b *Broker) exchangeIdPCode(ctx context.Context, code, verifier, nonce, iss string, clientScopes []string) (IdPGrant, error) {
	d, err := b.idp.Discovery(ctx)
	if err != nil {
		return IdPGrant{}, fmt.Errorf("%w: %w", idp.ErrUnavailable, err)
	}
	if err := d.CheckAuthorizationResponseIssuer(iss); err != nil {
		return IdPGrant{}, fmt.Errorf("callback: %w", err)
	}
	conf := b.idpOAuthConfig(d.Provider.Endpoint(), clientScopes)
	tok, err := conf.Exchange(context.WithValue(ctx, oauth2.HTTPClient, b.cfg.HTTPClient), code, oauth2.VerifierOption(verifier))
	if err != nil {
		var re *oauth2.RetrieveError
		if errors.As(err, &re) && re.Response != nil && re.Response.StatusCode < 500 {
			return IdPGrant{}, fmt.Errorf("exchanging authorization code: identity provider answered %d %s", re.Response.StatusCode, re.ErrorCode)
		}
		return IdPGrant{}, fmt.Errorf("%w: exchanging authorization code: %v", idp.ErrUnavailable, err)
	}
	rawID, _ := tok.Extra("id_token").(string)
	if rawID == "" {
		return IdPGrant{}, errors.New("exchanging authorization code: no id_token in the response")
	}
	idt, err := d.Provider.Verifier(&oidc.Config{ClientID: b.cfg.ClientID, Now: b.now}).Verify(ctx, rawID)
	if err != nil {
		return IdPGrant{}, fmt.Errorf("verifying id token: %w", err)
	}
	if len(idt.Audience) > 1 {
		// OIDC Core §3.1.3.7: with several audiences, azp must name the broker.
		var c struct {
			AuthorizedParty string `json:"azp"`
		}
		if err := idt.Claims(&c); err != nil || c.AuthorizedParty != b.cfg.ClientID {
			return IdPGrant{}, errors.New("verifying id token: azp is not the broker's client id")
		}
	}
	if !constantTimeEqual(idt.Nonce, nonce) {
		return IdPGrant{}, errors.New("verifying id token: nonce mismatch")
	}
	if idt.AccessTokenHash != "" {
		if err := idt.VerifyAccessToken(tok.AccessToken); err != nil {
			return IdPGrant{}, fmt.Errorf("verifying id token: %w", err)
		}
	}
	if idt.Subject == "" {
		return IdPGrant{}, errors.New("verifying id token: no subject")
	}
	answerScope, _ := tok.Extra("scope").(string)
	granted, err := b.grantedScopes(ctx, d, answerScope, tok.AccessToken, conf.Scopes)
	if err != nil {
		return IdPGrant{}, err
	}
	return IdPGrant{
		Token:   oauth2.Token{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, Expiry: tok.Expiry},
		IDToken: rawID,
		Subject: idt.Subject,
		Scopes:  granted,
	}, nil
}

// truncateForLog bounds text from outside before it reaches a log line.
func truncateForLog(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
