package flows

import (
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/internal/ratelimit"
)

// The hybrid authorization endpoint: the broker is the MCP client's authorization
// server. It checks the request, then asks the user on its own consent page before it
// sends anyone to the IdP with its single upstream client id (the confused-deputy rule).

const (
	// consentTicketTTL is how long the consent page stays answerable.
	consentTicketTTL = 10 * time.Minute
	// maxAuthorizeBody bounds an authorization request sent by POST.
	maxAuthorizeBody = 64 << 10
	// maxStateLen bounds the client's state, which the broker keeps and sends back.
	maxStateLen = 1024
	// maxScopes bounds how many scopes one request may name.
	maxScopes = 64
	// maxStoredAuthorizationRequest bounds the JSON of the request the broker keeps (in
	// the consent ticket, then the pending login), so that each of those records is at
	// most 7 KiB on disk: anyone may send authorization requests (SECURITY.md). Plain
	// requests stay well under it; JSON escaping (& < > are six bytes each) of a long
	// state or client_id can push one over, and that one is refused.
	maxStoredAuthorizationRequest = 6 << 10
)

// serveAuthorizeHybrid answers /oauth/authorize in hybrid mode (RFC 6749 §4.1.1 with
// PKCE, RFC 8707 and RFC 9207).
//
// Until the client and its redirect URI are known to belong together, an error is a
// JSON 400 and never a redirect: a redirect would hand the error, and the user, to
// whatever URI the request named. Afterwards errors go to the redirect URI with the
// client's state and the broker's iss (RFC 6749 §4.1.2.1).
func (b *Broker) serveAuthorizeHybrid(w http.ResponseWriter, r *http.Request) {
	if err := b.authorizeHybrid(w, r); err != nil {
		b.writeError(w, r, err)
	}
}

// authorizeHybrid reads and checks the authorization request, then asks for consent (or
// goes on to the IdP when this browser already consented). It answers only on success.
func (b *Broker) authorizeHybrid(w http.ResponseWriter, r *http.Request) error {
	// Each request stores a consent ticket for 10 minutes: bound how fast one address
	// can make the broker write.
	if ok, wait := b.authorizations.Allow(ratelimit.Key(clientIP(r)), authorizeRate, b.now()); !ok {
		return errTooManyRequests(wait, "too many authorization requests from this address; retry later")
	}
	switch r.Method {
	case http.MethodGet:
	case http.MethodPost:
		r.Body = http.MaxBytesReader(w, r.Body, maxAuthorizeBody)
	default:
		return errMethodNotAllowed("GET, POST")
	}
	if err := r.ParseForm(); err != nil {
		return errInvalidRequest("the request could not be parsed")
	}
	f := r.Form

	// Before trust: who is asking, and where would the answer go.
	if len(f["client_id"]) > 1 || len(f["redirect_uri"]) > 1 {
		return errInvalidRequest("client_id and redirect_uri may appear only once")
	}
	clientID := f.Get("client_id")
	if clientID == "" {
		return errInvalidRequest("client_id is required")
	}
	client, err := b.findClient(r.Context(), clientID)
	switch {
	case errors.Is(err, ErrMetadataDocumentsOff):
		return newRequestError(http.StatusBadRequest, "invalid_client", "this server does not accept client metadata documents (https client ids); register the client instead")
	case errors.Is(err, ErrUnknownClient):
		return newRequestError(http.StatusBadRequest, "invalid_client", "unknown client")
	case errors.Is(err, ErrStorageUnavailable):
		// Before the redirect URI is checked: the 503 goes to the browser, not the client.
		return errStorage("authorize: finding client", err)
	case err != nil:
		return errServer(http.StatusInternalServerError, "the client could not be loaded", fmt.Errorf("authorize: finding client: %w", err))
	}
	if err := CheckClientName(client.Name); err != nil {
		// Registered before names were checked, or configured so: the page cannot show it.
		return newRequestError(http.StatusBadRequest, "invalid_client", "the client's name contains control or bidirectional-formatting characters")
	}
	redirectURI := f.Get("redirect_uri")
	omitted := redirectURI == ""
	if omitted {
		// RFC 6749 §3.1.2.3: a client with a single registered URI may leave it out.
		if len(client.RedirectURIs) != 1 {
			return errInvalidRequest("redirect_uri is required")
		}
		redirectURI = client.RedirectURIs[0]
	}
	if err := checkRedirectURIFor(client.ApplicationType, redirectURI); err != nil {
		return errInvalidRequest(err.Error())
	}
	if !MatchRedirectURI(client.RedirectURIs, redirectURI) {
		return errInvalidRequest("redirect_uri is not registered for this client")
	}

	// After trust: errors go back to the client. Not automatically, though, to a URI
	// that anyone could have registered (a DCR client's or a metadata document's https
	// URI): a link to this endpoint with a deliberate error would make the broker an open
	// redirector to a phishing page (RFC 9700 §4.11.2). Those get a page naming where the
	// error goes, with a link the user may follow. Configured clients' URIs are the
	// operator's, and loopback ones stay on the user's computer: they are redirected to.
	state := f.Get("state")
	// A native app's private-use scheme (application_type native) gets the page too: any
	// app, or a browser's own scheme that opens a web page, can claim one (RFC 8252 §8.6).
	page := client.Source != ClientSourceConfig && !isLoopbackRedirectURI(redirectURI)
	if len(state) > maxStateLen {
		return errInvalidRequest("state is too long").to(redirectURI, "", page)
	}
	req, refused := b.checkAuthorizationRequest(f, client, redirectURI, state, omitted)
	if refused != nil {
		return refused.to(redirectURI, state, page)
	}
	if consentMayBeRemembered(redirectURI) && b.consentRemembered(r, client.ID, redirectURI, req.Scopes) {
		b.log.authorize.Info("consent remembered for this browser", zap.String("client_id", client.ID))
		return b.redirectToIdP(w, r, req)
	}
	ticket := randomToken()
	if err := b.consents.put(r.Context(), ticket, ConsentTicket{Request: req, CSRF: randomToken()}); err != nil {
		return errStorage("authorize: storing consent ticket", err).to(redirectURI, state, page)
	}
	b.log.authorize.Info("asking for consent", zap.String("client_id", client.ID))
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, b.issuer+pathConsent+"?"+url.Values{"ticket": {ticket}}.Encode(), http.StatusFound)
	return nil
}

// checkAuthorizationRequest checks the rest of an authorization request whose client and
// redirect URI belong together, and returns it. Its errors go to the redirect URI.
func (b *Broker) checkAuthorizationRequest(f url.Values, client *Client, redirectURI, state string, omitted bool) (AuthorizationRequest, *requestError) {
	for _, k := range []string{"state", "response_type", "code_challenge", "code_challenge_method", "scope"} {
		if len(f[k]) > 1 {
			return AuthorizationRequest{}, errInvalidRequest("a parameter appears more than once")
		}
	}
	switch rt := f.Get("response_type"); {
	case rt == "":
		return AuthorizationRequest{}, errInvalidRequest("response_type is required")
	case rt != "code":
		return AuthorizationRequest{}, newRequestError(http.StatusBadRequest, "unsupported_response_type", "only response_type code is supported")
	}
	if len(client.GrantTypes) > 0 && !client.allowsGrantType(grantAuthorizationCode) {
		return AuthorizationRequest{}, errUnauthorizedClient("the client did not register the authorization_code grant")
	}
	challenge := f.Get("code_challenge")
	switch {
	case challenge == "":
		return AuthorizationRequest{}, errInvalidRequest("code_challenge is required (PKCE with S256)")
	case f.Get("code_challenge_method") != "S256":
		// An absent method means plain (RFC 7636 §4.3), which is refused as well.
		return AuthorizationRequest{}, errInvalidRequest("code_challenge_method must be S256")
	case !validS256Challenge(challenge):
		return AuthorizationRequest{}, errInvalidRequest("code_challenge must be an S256 challenge: 43 characters of base64url")
	}
	resource := ""
	for _, res := range f["resource"] {
		if !sameResource(res, b.cfg.Resource) {
			return AuthorizationRequest{}, errInvalidTarget("resource is not this server")
		}
		resource = b.cfg.Resource // the configured spelling, which tokens are bound to
	}
	scopes, ok := b.grantableScopes(client, strings.Fields(f.Get("scope")))
	if !ok {
		return AuthorizationRequest{}, errInvalidScope("a requested scope is not allowed for this client")
	}
	req := AuthorizationRequest{
		ClientID:            client.ID,
		RedirectURI:         redirectURI,
		State:               state,
		CodeChallenge:       challenge,
		CodeChallengeMethod: "S256",
		Scopes:              scopes,
		Resource:            resource,
		RedirectURIOmitted:  omitted,
	}
	if stored, err := json.Marshal(&req); err != nil || len(stored) > maxStoredAuthorizationRequest {
		return AuthorizationRequest{}, errInvalidRequest("the authorization request is too large")
	}
	return req, nil
}

// grantableScopes decides the scopes of a request: those asked, each allowed for the
// client and configured for the broker, or by default the client's scopes among the base
// scopes (Config.BaseScopes, else every scope advertised). offline_access is dropped: the broker's refresh tokens do not
// depend on it, and the IdP is always asked for it anyway.
func (b *Broker) grantableScopes(c *Client, asked []string) ([]string, bool) {
	if len(asked) > maxScopes {
		return nil, false
	}
	offer := b.offer()
	configured := append([]string{"openid"}, offer.scopes...)
	if len(asked) == 0 {
		advertised := offer.base
		mine := b.scopesOf(c)
		out := make([]string, 0, len(mine))
		for _, s := range mine {
			if slices.Contains(advertised, s) && !slices.Contains(out, s) {
				out = append(out, s)
			}
		}
		return out, true
	}
	out := make([]string, 0, len(asked))
	for _, s := range asked {
		if s == "offline_access" || slices.Contains(out, s) {
			continue
		}
		if !b.clientAllows(c, []string{s}) || !slices.Contains(configured, s) {
			return nil, false
		}
		out = append(out, s)
	}
	return out, true
}

// validS256Challenge tells whether c can be a BASE64URL(SHA-256) challenge.
func validS256Challenge(c string) bool {
	if len(c) != 43 {
		return false
	}
	for i := 0; i < len(c); i++ {
		switch ch := c[i]; {
		case ch >= 'A' && ch <= 'Z', ch >= 'a' && ch <= 'z', ch >= '0' && ch <= '9', ch == '-', ch == '_':
		default:
			return false
		}
	}
	return true
}

// isLoopbackRedirectURI tells whether a checked redirect URI leads to the user's own
// computer.
func isLoopbackRedirectURI(raw string) bool {
	u, err := parseRedirectURI(raw)
	return err == nil && IsLoopbackHost(u.Hostname())
}

// showAuthorizeError answers an authorization error for a redirect URI the broker does
// not redirect to on its own: a page with the error, the host it would go to, and a link
// carrying it there (q: the error, state and iss) for the user to follow.
func (b *Broker) showAuthorizeError(w http.ResponseWriter, redirectURI string, q url.Values, e *requestError) {
	u, err := url.Parse(redirectURI)
	var host string
	privateUse := err == nil && isPrivateUseRedirectURI(redirectURI)
	switch {
	case privateUse:
		host = u.Scheme + ": (an application on this computer)"
	case err == nil:
		host, err = asciiHost(u.Hostname())
	}
	if err != nil {
		writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_request", Description: "redirect_uri is not a valid URI"})
		return
	}
	merged := u.Query()
	for k, vs := range q {
		merged[k] = vs
	}
	u.RawQuery = merged.Encode()
	consentHeaders(w, []string{"'none'"})
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(http.StatusBadRequest)
	// html/template would replace a private-use scheme's link by "#ZgotmplZ"; this one is a
	// registered URI that parsePrivateUseRedirectURI accepted (no javascript: or data:).
	var link any = u.String()
	if privateUse {
		link = template.URL(u.String())
	}
	_ = authorizeErrorTemplate.Execute(w, struct {
		Code, Description, Host string
		Link                    any
	}{e.code, e.description, host, link})
}

var authorizeErrorTemplate = template.Must(template.New("authorize-error").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Bad Request</title>` + pageStyle + `</head>
<body><main><h1>Bad Request</h1>
<p>The application's sign-in request could not be accepted: <code>{{.Code}}</code> ({{.Description}}).</p>
<p class="note">You followed a link that would take you on to <strong>{{.Host}}</strong>. Continue only if you trust it and just started signing in from that application.</p>
<p><a href="{{.Link}}" rel="noreferrer">Return to {{.Host}}</a></p>
</main></body></html>
`))
