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

// Flow 2 (offline access): a user provisions offline access for background jobs. The
// broker logs the user in at the IdP with its own client, asking for offline_access, and
// keeps the refresh token sealed, per site and user (store_offline.go). Unlike the
// Python original (SECURITY.md W5, W8), it starts only for an authenticated user, never
// takes a user id from a parameter, sends a random single-use state with PKCE and a
// nonce, binds the login to the browser that opened the link, and stores the result only
// when the ID token names the user who started.

const (
	// provisioningLinkTTL bounds how long a one-time provisioning link can be opened.
	provisioningLinkTTL = 10 * time.Minute
	// provisioningStateTTL bounds how long the user may take at the IdP.
	provisioningStateTTL = 10 * time.Minute
	// offlineGrantTTL is how long an offline grant is kept without use. The IdP decides
	// how long its refresh token really lives; the record only has to outlive it, and is
	// rewritten with this TTL on every rotation. A dead token is deleted on first use.
	offlineGrantTTL = 365 * 24 * time.Hour
	// provisioningQueryMax bounds the query string of the browser endpoints.
	provisioningQueryMax = 4096
)

// ProvisioningLinkResponse answers an authenticated start of Flow 2: the URL a browser
// opens to continue, good once.
type ProvisioningLinkResponse struct {
	AuthorizationURL string `json:"authorization_url"`
	ExpiresIn        int64  `json:"expires_in"`
	// BackgroundClients are the ids of the background clients that the grant will let
	// act for the user: those configured now, named again on the page that ends Flow 2.
	BackgroundClients []string `json:"background_clients"`
}

// ProvisioningStatus is the answer of GET and DELETE /oauth/provisioning.
type ProvisioningStatus struct {
	Provisioned   bool       `json:"provisioned"`
	ProvisionedAt *time.Time `json:"provisioned_at,omitempty"`
	RotatedAt     *time.Time `json:"rotated_at,omitempty"`
	Scopes        []string   `json:"scopes,omitempty"`
	ClientID      string     `json:"client_id,omitempty"`
	// BackgroundClients are the background clients the grant is for.
	BackgroundClients []string `json:"background_clients,omitempty"`
	// RevokedAtIdP tells, after a DELETE, whether the IdP confirmed the revocation.
	RevokedAtIdP *bool `json:"revoked_at_idp,omitempty"`
}

// serveProvisioningStart is GET /oauth/authorize-nextcloud. With a bearer token (an MCP
// client or script acting for the user) it mints a one-time link for that user and
// answers it as JSON; with ?link= (the user's browser opening it) it takes the link and
// sends the browser to the IdP. Anything else gets the 401 challenge.
func (b *Broker) serveProvisioningStart(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
		allowCORS(w, "GET, OPTIONS")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if err := b.provisioningStart(w, r); err != nil {
		b.writeError(w, r, err)
	}
}

// provisioningStart answers the start of Flow 2 on success (see serveProvisioningStart).
func (b *Broker) provisioningStart(w http.ResponseWriter, r *http.Request) error {
	// Only GET: a HEAD would mint a link nobody reads, or spend one.
	if r.Method != http.MethodGet {
		return errMethodNotAllowed("GET, OPTIONS")
	}
	if len(r.URL.RawQuery) > provisioningQueryMax {
		return errInvalidRequest("query too long")
	}
	q := r.URL.Query()
	if q.Has("access_token") {
		return errInvalidRequest("access tokens are accepted only in the Authorization header")
	}
	if _, ok := bearerToken(r); ok {
		who, err := b.authenticateProvisioningUser(r)
		if err != nil {
			return err
		}
		link, err := b.mintProvisioningLink(r.Context(), who)
		if err != nil {
			return errServer(http.StatusInternalServerError, "the provisioning link could not be stored", storageFailed("flow 2: storing provisioning link", err))
		}
		allowCORS(w, "GET, OPTIONS")
		writeJSON(w, http.StatusOK, ProvisioningLinkResponse{
			AuthorizationURL:  link,
			ExpiresIn:         int64(provisioningLinkTTL / time.Second),
			BackgroundClients: b.backgroundClientIDs(),
		})
		return nil
	}
	token := q.Get("link")
	if token == "" {
		return b.errBearer("", "a bearer token or a provisioning link is required")
	}
	if err := b.allowOneTimeValue(r, b.errProvisioningPage(http.StatusTooManyRequests, "Try again",
		"Too many requests from your network right now. Wait a minute, then open the link again.")); err != nil {
		return err
	}
	link, err := b.provisioningLinks.take(r.Context(), token)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return b.errProvisioningPage(http.StatusBadRequest, "Link expired", "This provisioning link is unknown, expired or already used. Ask for a new one.")
	case err != nil:
		return b.errProvisioningPage(http.StatusInternalServerError, "Error", "The link could not be read; try again.").
			because(storageFailed("flow 2: taking provisioning link", err))
	}
	return b.redirectToIdPForProvisioning(w, r, link.Subject, link.ClientID)
}

// authenticateProvisioningUser checks the request's bearer token as the MCP endpoint
// would and returns who it speaks for.
func (b *Broker) authenticateProvisioningUser(r *http.Request) (*idp.Principal, error) {
	who, _, err := b.authenticate(r)
	if err != nil {
		return nil, err
	}
	if who.Subject == "" {
		return nil, b.errBearer("invalid_token", "the access token names no user")
	}
	return who, nil
}

// mintProvisioningLink stores a one-time link for who and returns its full URL.
func (b *Broker) mintProvisioningLink(ctx context.Context, who *idp.Principal) (string, error) {
	token := randomToken()
	link := ProvisioningLink{Subject: who.Subject, ClientID: who.ClientID, CreatedAt: b.now().UTC()}
	if err := b.provisioningLinks.put(ctx, token, link); err != nil {
		return "", err
	}
	return b.issuer + pathProvisioningStart + "?" + url.Values{"link": {token}}.Encode(), nil
}

// provisioningScopes are asked of the IdP in Flow 2: openid for the ID token that proves
// who logged in, offline_access for the refresh token, then the configured ones.
func (b *Broker) provisioningScopes() []string {
	scopes := []string{"openid", "offline_access"}
	for _, s := range b.cfg.ProvisioningScopes {
		scopes = appendUnique(scopes, s)
	}
	return scopes
}

// provisioningOAuth2 is the broker's client at the IdP for Flow 2; authURL is where
// browsers go.
func (b *Broker) provisioningOAuth2(d *idp.Discovery, scopes []string) *oauth2.Config {
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
		RedirectURL: b.issuer + pathProvisioningCallback,
		Scopes:      scopes,
	}
}

// offlineIdPContext makes golang.org/x/oauth2 use the broker's HTTP client, bounded by the IdP
// timeout.
func (b *Broker) offlineIdPContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.IdPTimeout)
	return context.WithValue(ctx, oauth2.HTTPClient, b.cfg.HTTPClient), cancel
}

// redirectToIdPForProvisioning stores the pending login under a random state and sends
// the browser to the IdP.
func (b *Broker) redirectToIdPForProvisioning(w http.ResponseWriter, r *http.Request, subject, clientID string) error {
	d, err := b.idp.Discovery(r.Context())
	if err != nil {
		e := b.errProvisioningPage(http.StatusServiceUnavailable, "Try again", "The identity provider cannot be reached; try again shortly.").
			because(fmt.Errorf("flow 2: %w", err))
		e.retryAfter = unavailableRetry
		return e
	}
	state, nonce, verifier := randomToken(), randomToken(), oauth2.GenerateVerifier()
	sealed, err := b.offlineLogins.sealVerifier(state, verifier)
	if err != nil {
		return b.errProvisioningPage(http.StatusInternalServerError, "Error", "The login could not be started; try again.").
			because(fmt.Errorf("flow 2: sealing PKCE verifier: %w", err))
	}
	scopes := b.provisioningScopes()
	pending := PendingProvisioning{
		Subject: subject, ClientID: clientID, Scopes: scopes, BackgroundClients: b.backgroundClientIDs(),
		Nonce: nonce, PKCEVerifier: sealed, CreatedAt: b.now().UTC(),
		BrowserBinding: b.bindLoginToBrowser(w, state, pathProvisioningCallback, provisioningStateTTL),
	}
	if err := b.offlineLogins.put(r.Context(), state, pending); err != nil {
		return b.errProvisioningPage(http.StatusInternalServerError, "Error", "The login could not be started; try again.").
			because(storageFailed("flow 2: storing state", err))
	}
	target := b.provisioningOAuth2(d, scopes).AuthCodeURL(state,
		oauth2.S256ChallengeOption(verifier),
		oidc.Nonce(nonce),
		oauth2.SetAuthURLParam("prompt", "consent"),
	)
	b.logger.Info("flow 2: sending the user to the identity provider", zap.String("subject", subject))
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Referrer-Policy", "no-referrer")
	http.Redirect(w, r, target, http.StatusFound)
	return nil
}

// serveProvisioningCallback is GET /oauth/callback-nextcloud, where the IdP sends the
// browser back. The state is taken once; the ID token must name the user who started.
func (b *Broker) serveProvisioningCallback(w http.ResponseWriter, r *http.Request) {
	if err := b.provisioningCallback(w, r); err != nil {
		b.writeError(w, r, err)
	}
}

// provisioningCallback stores the offline grant of a finished Flow-2 login and shows the
// page saying so; every failure is a page too, but for a request that is not GET.
func (b *Broker) provisioningCallback(w http.ResponseWriter, r *http.Request) error {
	// Only GET: a HEAD would spend the state.
	if r.Method != http.MethodGet {
		return errMethodNotAllowed("GET")
	}
	if len(r.URL.RawQuery) > provisioningQueryMax {
		return b.errProvisioningPage(http.StatusBadRequest, "Bad request", "The request is too long.")
	}
	if err := b.allowOneTimeValue(r, b.errProvisioningPage(http.StatusTooManyRequests, "Try again",
		"Too many logins from your network right now. Wait a minute, then start again.")); err != nil {
		return err
	}
	q := r.URL.Query()
	state := q.Get("state")
	if state == "" {
		return b.errProvisioningPage(http.StatusBadRequest, "Bad request", "The state parameter is missing.")
	}
	ctx := r.Context()
	notFinished := func(cause error) error {
		return b.errProvisioningPage(http.StatusInternalServerError, "Error", "The login could not be finished; start again.").because(cause)
	}
	// The browser binding is checked before the state is taken, so that another browser
	// cannot spend it (see bindLoginToBrowser).
	pending, err := b.offlineLogins.peek(ctx, state)
	switch {
	case err == nil && !b.loginBoundToBrowser(r, state, pending.BrowserBinding):
		b.logger.Warn("flow 2: the login returned to a browser that did not start it; nothing stored", zap.String("subject", pending.Subject))
		return b.errProvisioningPage(http.StatusForbidden, "Wrong browser", notThisBrowserMessage)
	case err != nil && !errors.Is(err, storage.ErrNotFound):
		return notFinished(storageFailed("flow 2: loading state", err))
	}
	pending, err = b.offlineLogins.take(ctx, state)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return b.errProvisioningPage(http.StatusBadRequest, "Login expired", "This login is unknown, expired or already finished. Start again.")
	case err != nil:
		return notFinished(storageFailed("flow 2: taking state", err))
	}
	b.clearLoginBinding(w, state, pathProvisioningCallback)
	if q.Get("error") != "" {
		// The IdP's own error text is not shown (W11): only that access was not granted.
		b.logger.Info("flow 2: identity provider refused", zap.String("subject", pending.Subject), zap.String("error", q.Get("error")))
		return b.errProvisioningPage(http.StatusForbidden, "Not granted", "The identity provider did not grant offline access.")
	}
	code := q.Get("code")
	if code == "" {
		return b.errProvisioningPage(http.StatusBadRequest, "Bad request", "The code parameter is missing.")
	}
	verifier, err := b.offlineLogins.openVerifier(state, pending.PKCEVerifier)
	if err != nil {
		return notFinished(fmt.Errorf("flow 2: opening PKCE verifier: %w", err))
	}
	d, err := b.idp.Discovery(ctx)
	if err != nil {
		return b.errProvisioningPage(http.StatusServiceUnavailable, "Try again", "The identity provider cannot be reached; start again shortly.").
			because(fmt.Errorf("flow 2: %w", err))
	}
	cfg := b.provisioningOAuth2(d, pending.Scopes)
	idpCtx, cancel := b.offlineIdPContext(ctx)
	defer cancel()
	tok, err := cfg.Exchange(idpCtx, code, oauth2.VerifierOption(verifier))
	if err != nil {
		return b.errProvisioningPage(http.StatusBadGateway, "Login failed", "The identity provider did not accept the login; start again.").
			because(fmt.Errorf("flow 2: exchanging authorization code for subject %s: %w", pending.Subject, oauthErrorOnly(err)))
	}
	sub, err := b.verifyProvisioningIDToken(idpCtx, d, tok, pending.Nonce)
	if err != nil {
		b.revokeOfflineRefreshToken(ctx, d, tok.RefreshToken)
		return b.errProvisioningPage(http.StatusBadGateway, "Login failed", "The identity provider's answer could not be verified; start again.").
			because(fmt.Errorf("flow 2: ID token refused for subject %s: %w", pending.Subject, err))
	}
	if subtle.ConstantTimeCompare([]byte(sub), []byte(pending.Subject)) != 1 {
		// Someone else logged in at the IdP: their grant must not land under this user,
		// nor linger at the IdP.
		b.logger.Warn("flow 2: a different user logged in at the identity provider; nothing stored",
			zap.String("subject", pending.Subject), zap.String("logged_in", sub))
		b.revokeOfflineRefreshToken(ctx, d, tok.RefreshToken)
		return b.errProvisioningPage(http.StatusForbidden, "Wrong account",
			"You logged in at the identity provider as a different user than the one who asked for offline access. Nothing was stored.")
	}
	if tok.RefreshToken == "" {
		return b.errProvisioningPage(http.StatusBadGateway, "No offline access", "The identity provider granted no offline access.").
			because(fmt.Errorf("flow 2: the identity provider issued no refresh token for subject %s", sub))
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
	if err := b.storeOfflineGrant(ctx, d, sub, pending.ClientID, scopes, workers, tok.RefreshToken); err != nil {
		b.revokeOfflineRefreshToken(ctx, d, tok.RefreshToken)
		return b.errProvisioningPage(http.StatusInternalServerError, "Error", "Offline access could not be stored; start again.").
			because(fmt.Errorf("flow 2: storing offline grant for subject %s: %w", sub, err))
	}
	b.logger.Info("flow 2: offline access provisioned", zap.String("subject", sub), zap.String("client_id", pending.ClientID))
	b.provisioningPage(w, http.StatusOK, provisioningPageData{
		Title:             "Offline access granted",
		Message:           "Background jobs may now act for you with these scopes. You can close this window.",
		Scopes:            scopes,
		BackgroundClients: workers,
	})
	return nil
}

// verifyProvisioningIDToken verifies the ID token of a Flow-2 code exchange (signature,
// issuer, audience, expiry, nonce) and returns its subject.
func (b *Broker) verifyProvisioningIDToken(ctx context.Context, d *idp.Discovery, tok *oauth2.Token, nonce string) (string, error) {
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
// may echo what was sent (W11, W13).
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

// serveProvisioningStatus is /oauth/provisioning for the authenticated user: GET tells
// whether offline access is provisioned, DELETE revokes it here and at the IdP. The user
// is always the token's subject, never a parameter (W8).
func (b *Broker) serveProvisioningStatus(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
		allowCORS(w, "GET, DELETE, OPTIONS")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	st, err := b.provisioningStatus(w, r)
	if err != nil {
		b.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// provisioningStatus reads, or for DELETE revokes, the user's offline grant.
func (b *Broker) provisioningStatus(w http.ResponseWriter, r *http.Request) (ProvisioningStatus, error) {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodDelete:
	default:
		return ProvisioningStatus{}, errMethodNotAllowed("GET, HEAD, DELETE, OPTIONS")
	}
	who, err := b.authenticateProvisioningUser(r)
	if err != nil {
		return ProvisioningStatus{}, err
	}
	allowCORS(w, "GET, DELETE, OPTIONS")
	ctx := r.Context()
	if r.Method == http.MethodDelete {
		status, err := b.revokeOfflineGrant(ctx, who.Subject)
		if err != nil {
			return ProvisioningStatus{}, errServer(http.StatusInternalServerError, "offline access could not be revoked",
				fmt.Errorf("flow 2: revoking offline grant of subject %s: %w", who.Subject, err))
		}
		return status, nil
	}
	g, err := b.loadOfflineGrant(ctx, who.Subject)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return ProvisioningStatus{Provisioned: false}, nil
	case err != nil:
		return ProvisioningStatus{}, errServer(http.StatusInternalServerError, "the provisioning status could not be read",
			storageFailed("flow 2: reading offline grant of subject "+who.Subject, err))
	}
	st := ProvisioningStatus{Provisioned: true, ProvisionedAt: &g.ProvisionedAt, Scopes: g.Scopes, ClientID: g.ClientID, BackgroundClients: g.BackgroundClients}
	if !g.RotatedAt.IsZero() {
		st.RotatedAt = &g.RotatedAt
	}
	return st, nil
}

// provisioningPageData fills the page a browser sees at the end of Flow 2. Every field
// is a fixed text of the broker, a scope the IdP granted or a configured background
// client id, escaped by html/template.
type provisioningPageData struct {
	Title             string
	Message           string
	Scopes            []string
	BackgroundClients []string
}

var provisioningPageTemplate = template.Must(template.New("provisioning").Parse(`<!doctype html>
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

// errProvisioningPage is an error answered with the Flow-2 page of title and message.
func (b *Broker) errProvisioningPage(status int, title, message string) *requestError {
	return errPage(status, func(w http.ResponseWriter, status int) {
		b.provisioningPage(w, status, provisioningPageData{Title: title, Message: message})
	})
}

// provisioningPage answers a browser with an HTML page that no one may frame, cache or
// follow a referrer from.
func (b *Broker) provisioningPage(w http.ResponseWriter, status int, data provisioningPageData) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	h.Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	w.WriteHeader(status)
	if err := provisioningPageTemplate.Execute(w, data); err != nil {
		b.logger.Debug("flow 2: writing page", zap.Error(err))
	}
}
