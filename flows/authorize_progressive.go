package flows

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"go.uber.org/zap"
)

// serveAuthorizeProgressive is the login of progressive consent: the MCP client logs in at
// the IdP with its own client id, and the broker only checks the request and sends the
// browser on. The checks run in the order, and with the error codes, of the broker this
// one replaces (SECURITY.md, "Lessons from the Python original"), so its clients see the same answers; the redirect
// URI is parsed instead of prefix-matched (SECURITY.md W1), and PKCE and the resource
// reach the IdP.
func (b *Broker) serveAuthorizeProgressive(w http.ResponseWriter, r *http.Request) {
	if err := b.authorizeProgressive(w, r); err != nil {
		b.writeError(w, r, err)
	}
}

// authorizeProgressive checks a Flow-1 request and sends the browser to the IdP.
func (b *Broker) authorizeProgressive(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	redirectURI := q.Get("redirect_uri")
	clientID := q.Get("client_id")
	method := q.Get("code_challenge_method")
	if method == "" {
		method = "S256"
	}
	switch {
	case q.Get("response_type") != "code":
		return newRequestError(http.StatusBadRequest, "unsupported_response_type", "Only 'code' response_type is supported")
	case redirectURI == "":
		return errInvalidRequest("redirect_uri is required")
	case CheckRedirectURI(redirectURI) != nil:
		return errInvalidRequest(CheckRedirectURI(redirectURI).Error())
	case q.Get("state") == "":
		return errInvalidRequest("state parameter is required for CSRF protection")
	case q.Get("code_challenge") == "":
		return errInvalidRequest("code_challenge is required (PKCE)")
	case method != "S256":
		return errInvalidRequest("code_challenge_method must be S256")
	case clientID == "":
		return errInvalidRequest("client_id is required in Progressive Consent mode")
	}
	client := b.clients.lookup(clientID)
	scopes := strings.Fields(q.Get("scope"))
	switch {
	case client == nil:
		return newRequestError(http.StatusUnauthorized, "unauthorized_client", "unknown client")
	case !MatchRedirectURI(client.RedirectURIs, redirectURI):
		return newRequestError(http.StatusUnauthorized, "unauthorized_client", "redirect_uri is not registered for this client")
	case !b.clientAllows(client, scopes):
		return newRequestError(http.StatusUnauthorized, "unauthorized_client", "scope is not allowed for this client")
	}
	if res := q.Get("resource"); res != "" && !sameResource(res, b.cfg.Resource) {
		return errInvalidTarget("resource is not this server")
	}

	d, err := b.idp.Discovery(r.Context())
	if err != nil {
		return errIdPUnavailable(fmt.Errorf("authorize: %w", err))
	}
	if len(scopes) == 0 {
		scopes = b.scopesOf(client)
	}
	idp := url.Values{
		"response_type":         {"code"},
		"client_id":             {clientID},
		"redirect_uri":          {redirectURI},
		"scope":                 {strings.Join(withOpenID(scopes), " ")},
		"state":                 {q.Get("state")},
		"code_challenge":        {q.Get("code_challenge")},
		"code_challenge_method": {method},
		"resource":              {b.cfg.Resource},
	}
	for _, k := range []string{"nonce", "prompt", "login_hint"} {
		if v := q.Get(k); v != "" {
			idp.Set(k, v)
		}
	}
	b.log.authorize.Info("sending client to the identity provider", zap.String("client_id", clientID))
	redirectWithQuery(w, r, d.BrowserAuthorizationEndpoint, idp)
	return nil
}

// withOpenID puts `openid` first in scopes when it is missing: the broker works with OIDC
// identities.
func withOpenID(scopes []string) []string {
	for _, s := range scopes {
		if s == "openid" {
			return scopes
		}
	}
	return append([]string{"openid"}, scopes...)
}
