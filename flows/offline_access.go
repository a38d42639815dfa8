package flows

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"go.uber.org/zap"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Offline access: a user grants offline access for background jobs. The
// broker logs the user in at the IdP with its own client, asking for offline_access, and
// keeps the refresh token sealed, per site and user (store_offline.go). Unlike the
// Python original (SECURITY.md W5, W8), it starts only for an authenticated user, never
// takes a user id from a parameter, sends a random single-use state with PKCE and a
// nonce, binds the login to the browser that opened the link, and stores the result only
// when the ID token names the user who started.

const (
	// offlineAccessLinkTTL bounds how long a one-time offline access link can be opened.
	offlineAccessLinkTTL = 10 * time.Minute
	// offlineAccessLinkReuse is how long a user's tool calls and starts through one client
	// are answered with the same link: a link reused has at least offlineAccessLinkTTL -
	// offlineAccessLinkReuse left, and a user has at most two live links per client
	// (SECURITY.md S1.35).
	offlineAccessLinkReuse = offlineAccessLinkTTL / 2
	// offlineAccessStateTTL bounds how long the user may take at the IdP.
	offlineAccessStateTTL = 10 * time.Minute
	// offlineAccessGrantTTL is how long an offline access grant is kept without use. The IdP decides
	// how long its refresh token really lives; the record only has to outlive it, and is
	// rewritten with this TTL on every rotation. A dead token is deleted on first use.
	offlineAccessGrantTTL = 365 * 24 * time.Hour
	// offlineAccessQueryMax bounds the query string of the browser endpoints.
	offlineAccessQueryMax = 4096
)

// OfflineAccessLinkResponse answers an authenticated start of offline access: the URL a browser
// opens to continue, good once, and the seconds it stays usable (the user's current link,
// reused, has less than offlineAccessLinkTTL left).
type OfflineAccessLinkResponse struct {
	AuthorizationURL string `json:"authorization_url"`
	ExpiresIn        int64  `json:"expires_in"`
	// BackgroundClients are the ids of the background clients that the grant will let
	// act for the user: those configured now, named again on the page that ends offline access.
	BackgroundClients []string `json:"background_clients"`
}

// OfflineAccessStatus is the answer of GET and DELETE /oauth/offline-access/status. Its
// JSON names are those of earlier releases, which scripts read.
type OfflineAccessStatus struct {
	Granted   bool       `json:"provisioned"`
	GrantedAt *time.Time `json:"provisioned_at,omitempty"`
	RotatedAt *time.Time `json:"rotated_at,omitempty"`
	Scopes    []string   `json:"scopes,omitempty"`
	ClientID  string     `json:"client_id,omitempty"`
	// BackgroundClients are the background clients the grant is for.
	BackgroundClients []string `json:"background_clients,omitempty"`
	// RevokedAtIdP tells, after a DELETE, whether the IdP confirmed the revocation.
	RevokedAtIdP *bool `json:"revoked_at_idp,omitempty"`
}

// serveOfflineAccessStart is GET /oauth/offline-access (and its old name
// /oauth/authorize-nextcloud). With a bearer token (an MCP client or script acting for
// the user) it mints a one-time link for that user and
// answers it as JSON; with ?link= (the user's browser opening it) it takes the link and
// sends the browser to the IdP. Anything else gets the 401 challenge.
func (b *Broker) serveOfflineAccessStart(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
		allowCORS(w, "GET, OPTIONS")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if err := b.offlineAccessStart(w, r); err != nil {
		b.writeError(w, r, err)
	}
}

// offlineAccessStart answers the start of offline access on success (see serveOfflineAccessStart).
func (b *Broker) offlineAccessStart(w http.ResponseWriter, r *http.Request) error {
	// Only GET: a HEAD would mint a link nobody reads, or spend one.
	if r.Method != http.MethodGet {
		return errMethodNotAllowed("GET, OPTIONS")
	}
	if len(r.URL.RawQuery) > offlineAccessQueryMax {
		return errInvalidRequest("query too long")
	}
	q := r.URL.Query()
	if q.Has("access_token") {
		return errInvalidRequest("access tokens are accepted only in the Authorization header")
	}
	if _, ok := bearerToken(r); ok {
		who, err := b.authenticateOfflineAccessUser(r)
		if err != nil {
			return err
		}
		link, expiresIn, err := b.offlineAccessLink(r.Context(), who)
		if err != nil {
			return errStorage("offline access: storing offline access link", err)
		}
		allowCORS(w, "GET, OPTIONS")
		writeJSON(w, http.StatusOK, OfflineAccessLinkResponse{
			AuthorizationURL:  link,
			ExpiresIn:         int64(expiresIn / time.Second),
			BackgroundClients: b.backgroundClientIDs(),
		})
		return nil
	}
	token := q.Get("link")
	if token == "" {
		return b.errBearer("", "a bearer token or an offline access link is required")
	}
	if err := b.allowOneTimeValue(r, b.errOfflineAccessPage(http.StatusTooManyRequests, "Try again",
		"Too many requests from your network right now. Wait a minute, then open the link again.")); err != nil {
		return err
	}
	link, err := b.offlineAccessLinks.take(r.Context(), token)
	switch {
	case errors.Is(err, errLinkIdentity):
		b.log.offline.Error("an offline access link's record does not match its binding; deleted, nothing started",
			zap.String("subject", link.Subject), zap.String("client_id", link.ClientID))
		fallthrough
	case errors.Is(err, storage.ErrNotFound):
		return b.errOfflineAccessPage(http.StatusBadRequest, "Link expired", "This offline access link is unknown, expired or already used. Ask for a new one.")
	case err != nil:
		return b.errOfflineAccessPage(http.StatusInternalServerError, "Error", "The link could not be read; try again.").
			because(storageFailed("offline access: taking offline access link", err))
	}
	return b.redirectToIdPForOfflineAccess(w, r, link.Subject, link.ClientID)
}

// authenticateOfflineAccessUser checks the request's bearer token as the MCP endpoint
// would and returns who it speaks for.
func (b *Broker) authenticateOfflineAccessUser(r *http.Request) (*idp.Principal, error) {
	who, _, err := b.authenticate(r)
	if err != nil {
		return nil, err
	}
	if who.Subject == "" {
		return nil, b.errBearer("invalid_token", "the access token names no user")
	}
	return who, nil
}

// offlineAccessLink is the full URL of who's current one-time link through who's client,
// and how long it stays usable: the one an earlier call stored while it is unused and
// younger than offlineAccessLinkReuse, else a new one. A user's tool calls and starts in a
// row thus store one link, not one each (SECURITY.md S1.35).
func (b *Broker) offlineAccessLink(ctx context.Context, who *idp.Principal) (string, time.Duration, error) {
	now := b.now().UTC()
	if token, err := b.offlineAccessCurrentLinks.get(ctx, who.Subject, who.ClientID); err == nil {
		l, err := b.offlineAccessLinks.peek(ctx, token)
		if age := now.Sub(l.CreatedAt); err == nil && age < offlineAccessLinkReuse && l.Subject == who.Subject && l.ClientID == who.ClientID {
			return b.offlineAccessLinkURL(token), offlineAccessLinkTTL - max(age, 0), nil
		}
	}
	token := randomToken()
	link := OfflineAccessLink{Subject: who.Subject, ClientID: who.ClientID, CreatedAt: now}
	if err := b.offlineAccessLinks.put(ctx, token, link); err != nil {
		return "", 0, err
	}
	if err := b.offlineAccessCurrentLinks.put(ctx, who.Subject, who.ClientID, token, now, offlineAccessLinkReuse); err != nil {
		return "", 0, err
	}
	return b.offlineAccessLinkURL(token), offlineAccessLinkTTL, nil
}

// offlineAccessLinkURL is the URL of the link token.
func (b *Broker) offlineAccessLinkURL(token string) string {
	return b.issuer + pathOfflineAccessStart + "?" + url.Values{"link": {token}}.Encode()
}

// offlineAccessScopes are asked of the IdP in offline access: openid for the ID token that proves
// who logged in, offline_access for the refresh token, then the configured ones.
func (b *Broker) offlineAccessScopes() []string {
	scopes := []string{"openid", "offline_access"}
	for _, s := range b.cfg.OfflineAccessScopes {
		scopes = appendUnique(scopes, s)
	}
	return scopes
}

// offlineAccessOAuth2 is the broker's client at the IdP for offline access; authURL is where
// browsers go.
func (b *Broker) offlineAccessOAuth2(d *idp.Discovery, scopes []string) *oauth2.Config {
	e := d.Provider.Endpoint()
	return &oauth2.Config{
		ClientID:     b.cfg.ClientID,
		ClientSecret: b.cfg.ClientSecret,
		Endpoint: oauth2.Endpoint{
			AuthURL:  d.BrowserAuthorizationEndpoint,
			TokenURL: e.TokenURL,
			// client_secret_basic, as the broker is registered; auto-detection would retry a
			// failed refresh with the other style, which rotating IdPs count as a reuse.
			AuthStyle: oauth2.AuthStyleInHeader,
		},
		RedirectURL: b.issuer + b.cfg.OfflineAccessCallbackPath,
		Scopes:      scopes,
	}
}

// offlineIdPContext makes golang.org/x/oauth2 use the broker's HTTP client, bounded by the IdP
// timeout.
func (b *Broker) offlineIdPContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.IdPTimeout)
	return context.WithValue(ctx, oauth2.HTTPClient, b.cfg.HTTPClient), cancel
}

// redirectToIdPForOfflineAccess stores the pending login under a random state and sends
// the browser to the IdP.
func (b *Broker) redirectToIdPForOfflineAccess(w http.ResponseWriter, r *http.Request, subject, clientID string) error {
	d, err := b.idp.Discovery(r.Context())
	if err != nil {
		e := b.errOfflineAccessPage(http.StatusServiceUnavailable, "Try again", "The identity provider cannot be reached; try again shortly.").
			because(fmt.Errorf("offline access: %w", err))
		e.retryAfter = unavailableRetry
		return e
	}
	state, nonce, verifier := randomToken(), randomToken(), oauth2.GenerateVerifier()
	sealed, err := b.offlineLogins.sealVerifier(state, verifier)
	if err != nil {
		return b.errOfflineAccessPage(http.StatusInternalServerError, "Error", "The login could not be started; try again.").
			because(fmt.Errorf("offline access: sealing PKCE verifier: %w", err))
	}
	scopes := b.offlineAccessScopes()
	pending := PendingOfflineAccess{
		Subject: subject, ClientID: clientID, Scopes: scopes, BackgroundClients: b.backgroundClientIDs(),
		Nonce: nonce, PKCEVerifier: sealed, CreatedAt: b.now().UTC(),
		BrowserBinding: b.bindLoginToBrowser(w, state, b.cfg.OfflineAccessCallbackPath, offlineAccessStateTTL),
	}
	if err := b.offlineLogins.put(r.Context(), state, pending); err != nil {
		return b.errOfflineAccessPage(http.StatusInternalServerError, "Error", "The login could not be started; try again.").
			because(storageFailed("offline access: storing state", err))
	}
	target := b.offlineAccessOAuth2(d, scopes).AuthCodeURL(state, b.idpAuthorizeOptions(verifier, nonce)...)
	b.log.offline.Info("sending the user to the identity provider", zap.String("subject", subject))
	b.login(LoginOfflineAccess, LoginStarted)
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Referrer-Policy", "no-referrer")
	http.Redirect(w, r, target, http.StatusFound)
	return nil
}

// serveOfflineAccessCallback is GET OfflineAccessCallback or OfflineAccessCallbackLegacy,
// where the IdP sends the browser back. The state is taken once; the ID token must name the user who started.
func (b *Broker) serveOfflineAccessCallback(w http.ResponseWriter, r *http.Request) {
	if err := b.offlineAccessCallback(w, r); err != nil {
		b.writeError(w, r, err)
	}
}

// offlineAccessCallback stores the offline access grant of a finished offline access login and shows the
// page saying so; every failure is a page too, but for a request that is not GET.
func (b *Broker) offlineAccessCallback(w http.ResponseWriter, r *http.Request) error {
	// Only GET: a HEAD would spend the state.
	if r.Method != http.MethodGet {
		return errMethodNotAllowed("GET")
	}
	if len(r.URL.RawQuery) > offlineAccessQueryMax {
		return b.errOfflineAccessPage(http.StatusBadRequest, "Bad request", "The request is too long.")
	}
	if err := b.allowOneTimeValue(r, b.errOfflineAccessPage(http.StatusTooManyRequests, "Try again",
		"Too many logins from your network right now. Wait a minute, then start again.")); err != nil {
		return err
	}
	q := r.URL.Query()
	state := q.Get("state")
	if state == "" {
		return b.errOfflineAccessPage(http.StatusBadRequest, "Bad request", "The state parameter is missing.")
	}
	ctx := r.Context()
	notFinished := func(cause error) error {
		return b.loginFailed(LoginOfflineAccess, LoginFailedStorage,
			b.errOfflineAccessPage(http.StatusInternalServerError, "Error", "The login could not be finished; start again.").because(cause))
	}
	// The browser binding is checked before the state is taken, so that another browser
	// cannot spend it (see bindLoginToBrowser).
	pending, err := b.offlineLogins.peek(ctx, state)
	switch {
	case err == nil && !b.loginBoundToBrowser(r, state, pending.BrowserBinding):
		b.log.offline.Warn("the login returned to a browser that did not start it; nothing stored", zap.String("subject", pending.Subject))
		return b.loginFailed(LoginOfflineAccess, LoginFailedWrongBrowser, b.errOfflineAccessPage(http.StatusForbidden, "Wrong browser", notThisBrowserMessage))
	case err != nil && !errors.Is(err, storage.ErrNotFound):
		return notFinished(storageFailed("offline access: loading state", err))
	}
	pending, err = b.offlineLogins.take(ctx, state)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return b.loginFailed(LoginOfflineAccess, LoginFailedUnknownState,
			b.errOfflineAccessPage(http.StatusBadRequest, "Login expired", "This login is unknown, expired or already finished. Start again."))
	case err != nil:
		return notFinished(storageFailed("offline access: taking state", err))
	}
	b.clearLoginBinding(w, state, b.cfg.OfflineAccessCallbackPath)
	if q.Get("error") != "" {
		if err := b.checkIdPResponseIssuer(ctx, q.Get("iss")); err != nil {
			return b.loginFailed(LoginOfflineAccess, LoginFailedCodeRefused,
				b.errOfflineAccessPage(http.StatusBadGateway, "Login failed", "The identity provider's answer could not be verified; start again.").
					because(fmt.Errorf("offline access: error response for subject %s: %w", pending.Subject, err)))
		}
		// The IdP's own error text is not shown (SECURITY.md W11): only that access was not granted.
		b.log.offline.Info("identity provider refused", zap.String("subject", pending.Subject), zap.String("error", q.Get("error")))
		outcome := LoginFailedIdPError
		if q.Get("error") == "access_denied" {
			outcome = LoginFailedIdPDenied
		}
		return b.loginFailed(LoginOfflineAccess, outcome, b.errOfflineAccessPage(http.StatusForbidden, "Not granted", "The identity provider did not grant offline access."))
	}
	code := q.Get("code")
	if code == "" {
		return b.loginFailed(LoginOfflineAccess, LoginFailedIdPNoCode, b.errOfflineAccessPage(http.StatusBadRequest, "Bad request", "The code parameter is missing."))
	}
	verifier, err := b.offlineLogins.openVerifier(state, pending.PKCEVerifier)
	if err != nil {
		return notFinished(fmt.Errorf("offline access: opening PKCE verifier: %w", err))
	}
	d, err := b.idp.Discovery(ctx)
	if err != nil {
		return b.loginFailed(LoginOfflineAccess, LoginFailedIdPUnreachable,
			b.errOfflineAccessPage(http.StatusServiceUnavailable, "Try again", "The identity provider cannot be reached; start again shortly.").
				because(fmt.Errorf("offline access: %w", err)))
	}
	if err := d.CheckAuthorizationResponseIssuer(q.Get("iss")); err != nil {
		// RFC 9207 (mix-up defense): the code is never sent to the token endpoint.
		return b.loginFailed(LoginOfflineAccess, LoginFailedCodeRefused,
			b.errOfflineAccessPage(http.StatusBadGateway, "Login failed", "The identity provider's answer could not be verified; start again.").
				because(fmt.Errorf("offline access: callback for subject %s: %w", pending.Subject, err)))
	}
	cfg := b.offlineAccessOAuth2(d, pending.Scopes)
	idpCtx, cancel := b.offlineIdPContext(ctx)
	defer cancel()
	tok, err := cfg.Exchange(idpCtx, code, oauth2.VerifierOption(verifier))
	if err != nil {
		return b.loginFailed(LoginOfflineAccess, LoginFailedCodeRefused,
			b.errOfflineAccessPage(http.StatusBadGateway, "Login failed", "The identity provider did not accept the login; start again.").
				because(fmt.Errorf("offline access: exchanging authorization code for subject %s: %w", pending.Subject, oauthErrorOnly(err))))
	}
	sub, err := b.verifyOfflineAccessIDToken(idpCtx, d, tok, pending.Nonce)
	if err != nil {
		b.revokeOfflineRefreshToken(ctx, d, tok.RefreshToken)
		return b.loginFailed(LoginOfflineAccess, LoginFailedCodeRefused,
			b.errOfflineAccessPage(http.StatusBadGateway, "Login failed", "The identity provider's answer could not be verified; start again.").
				because(fmt.Errorf("offline access: ID token refused for subject %s: %w", pending.Subject, err)))
	}
	if subtle.ConstantTimeCompare([]byte(sub), []byte(pending.Subject)) != 1 {
		// Someone else logged in at the IdP: their grant must not land under this user,
		// nor linger at the IdP.
		b.log.offline.Warn("a different user logged in at the identity provider; nothing stored",
			zap.String("subject", pending.Subject), zap.String("logged_in", sub))
		b.revokeOfflineRefreshToken(ctx, d, tok.RefreshToken)
		return b.loginFailed(LoginOfflineAccess, LoginFailedWrongAccount, b.errOfflineAccessPage(http.StatusForbidden, "Wrong account",
			"You logged in at the identity provider as a different user than the one who asked for offline access. Nothing was stored."))
	}
	if tok.RefreshToken == "" {
		return b.loginFailed(LoginOfflineAccess, LoginFailedNoRefreshToken,
			b.errOfflineAccessPage(http.StatusBadGateway, "No offline access", "The identity provider granted no offline access.").
				because(fmt.Errorf("offline access: the identity provider issued no refresh token for subject %s", sub)))
	}
	scopes := pending.Scopes
	if s, ok := tok.Extra("scope").(string); ok && strings.TrimSpace(s) != "" {
		scopes = strings.Fields(s)
	}
	workers := pending.BackgroundClients
	if workers == nil {
		// Started by an earlier release, which showed no list: the page below names these.
		workers = b.backgroundClientIDs()
	}
	if err := b.storeOfflineAccessGrant(ctx, d, sub, pending.ClientID, scopes, workers, tok.RefreshToken); err != nil {
		b.revokeOfflineRefreshToken(ctx, d, tok.RefreshToken)
		return b.loginFailed(LoginOfflineAccess, LoginFailedStorage,
			b.errOfflineAccessPage(http.StatusInternalServerError, "Error", "Offline access could not be stored; start again.").
				because(fmt.Errorf("offline access: storing offline access grant for subject %s: %w", sub, err)))
	}
	b.log.offline.Info("granted", zap.String("subject", sub), zap.String("client_id", pending.ClientID))
	b.audit(auditOfflineAccessGranted, clientIP(r), zap.String("subject", sub), zap.String("client_id", pending.ClientID),
		zap.Strings("background_clients", workers), zap.Strings("scopes", scopes))
	b.login(LoginOfflineAccess, LoginCompleted)
	b.offlineAccessPage(w, http.StatusOK, offlineAccessPageData{
		Title:             "Offline access granted",
		Message:           "Background jobs may now act for you with these scopes. You can close this window.",
		Scopes:            scopes,
		BackgroundClients: workers,
	})
	return nil
}

// verifyOfflineAccessIDToken verifies the ID token of an offline access code exchange (signature,
// issuer, audience, expiry, nonce) and returns its subject.
func (b *Broker) verifyOfflineAccessIDToken(ctx context.Context, d *idp.Discovery, tok *oauth2.Token, nonce string) (string, error) {
	raw, _ := tok.Extra("id_token").(string)
	if raw == "" {
		return "", errors.New("no id_token in the token response")
	}
	idt, err := d.Provider.Verifier(&oidc.Config{ClientID: b.cfg.ClientID, Now: b.now}).Verify(ctx, raw)
	if err != nil {
		return "", err
	}
	if subtle.ConstantTimeCompare([]byte(idt.Nonce), []byte(nonce)) != 1 {
		return "", errors.New("id_token nonce does not match")
	}
	if idt.Subject == "" {
		return "", errors.New("id_token has no subject")
	}
	return idt.Subject, nil
}

// oauthErrorOnly keeps an IdP error's code and drops its body and description, which
// may echo what was sent (SECURITY.md W11, W13).
func oauthErrorOnly(err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		code := re.ErrorCode
		if code == "" && re.Response != nil {
			code = re.Response.Status
		}
		return errors.New("identity provider answered " + code)
	}
	return err
}

// serveOfflineAccessStatus is /oauth/offline-access/status for the authenticated user: GET
// tells whether offline access is granted, DELETE revokes it here and at the IdP. The user
// is always the token's subject, never a parameter (SECURITY.md W8).
func (b *Broker) serveOfflineAccessStatus(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
		allowCORS(w, "GET, DELETE, OPTIONS")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	st, err := b.offlineAccessStatus(w, r)
	if err != nil {
		b.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// offlineAccessStatus reads, or for DELETE revokes, the user's offline access grant.
func (b *Broker) offlineAccessStatus(w http.ResponseWriter, r *http.Request) (OfflineAccessStatus, error) {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodDelete:
	default:
		return OfflineAccessStatus{}, errMethodNotAllowed("GET, HEAD, DELETE, OPTIONS")
	}
	who, err := b.authenticateOfflineAccessUser(r)
	if err != nil {
		return OfflineAccessStatus{}, err
	}
	allowCORS(w, "GET, DELETE, OPTIONS")
	ctx := r.Context()
	if r.Method == http.MethodDelete {
		status, err := b.revokeOfflineAccessGrant(ctx, who.Subject, clientIP(r))
		if err != nil {
			return OfflineAccessStatus{}, errServer(http.StatusInternalServerError, "offline access could not be revoked",
				fmt.Errorf("offline access: revoking offline access grant of subject %s: %w", who.Subject, err))
		}
		return status, nil
	}
	g, err := b.loadOfflineAccessGrant(ctx, who.Subject)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return OfflineAccessStatus{Granted: false}, nil
	case err != nil:
		return OfflineAccessStatus{}, errStorage("offline access: reading offline access grant of subject "+who.Subject, err)
	}
	st := OfflineAccessStatus{Granted: true, GrantedAt: &g.GrantedAt, Scopes: g.Scopes, ClientID: g.ClientID, BackgroundClients: g.BackgroundClients}
	if !g.RotatedAt.IsZero() {
		st.RotatedAt = &g.RotatedAt
	}
	return st, nil
}

// offlineAccessPageData fills the page a browser sees at the end of offline access. Every field
// is a fixed text of the broker, a scope the IdP granted or a configured background
// client id, escaped by html/template.
type offlineAccessPageData struct {
	Title             string
	Message           string
	Scopes            []string
	BackgroundClients []string
}

var offlineAccessPageTemplate = template.Must(template.New("offline_access").Parse(`<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{.Title}}</title></head>
<body>
<h1>{{.Title}}</h1>
<p>{{.Message}}</p>
{{if .Scopes}}<ul>{{range .Scopes}}<li><code>{{.}}</code></li>{{end}}</ul>{{end}}
{{if .BackgroundClients}}<p>These background clients may use it:</p>
<ul>{{range .BackgroundClients}}<li><code>{{.}}</code></li>{{end}}</ul>{{end}}
</body>
</html>
`))

// errOfflineAccessPage is an error answered with the offline access page of title and message.
func (b *Broker) errOfflineAccessPage(status int, title, message string) *requestError {
	return errPage(status, func(w http.ResponseWriter, status int) {
		b.offlineAccessPage(w, status, offlineAccessPageData{Title: title, Message: message})
	})
}

// offlineAccessPage answers a browser with an HTML page that no one may frame, cache or
// follow a referrer from.
func (b *Broker) offlineAccessPage(w http.ResponseWriter, status int, data offlineAccessPageData) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	h.Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	w.WriteHeader(status)
	if err := offlineAccessPageTemplate.Execute(w, data); err != nil {
		b.log.offline.Debug("writing page", zap.Error(err))
	}
}
