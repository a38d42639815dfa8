package flows

import (
	"net/http"
	"net/url"
	"strings"

	"go.uber.org/zap"
)

// serveAuthorizeProgressive is Flow 1 of progressive consent: the MCP client logs in at
// the IdP with its own client id, and the broker only checks the request and sends the
// browser on. The checks run in the order, and with the error codes, of the Python broker
// this one replaces; the redirect URI is parsed instead of prefix-matched (SECURITY.md W1),
// and PKCE and the resource reach the IdP.
func (b *Broker) serveAuthorizeProgressive(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	redirectURI := q.Get("redirect_uri")
	clientID := q.Get("client_id")
	method := q.Get("code_challenge_method")
	if method == "" {
		method = "S256"
	}
	switch {
	case q.Get("response_type") != "code":
		writeError(w, http.StatusBadRequest, "unsupported_response_type", "Only 'code' response_type is supported")
		return
	case redirectURI == "":
		writeError(w, http.StatusBadRequest, "invalid_request", "redirect_uri is required")
		return
	case CheckRedirectURI(redirectURI) != nil:
		writeError(w, http.StatusBadRequest, "invalid_request", CheckRedirectURI(redirectURI).Error())
		return
	case q.Get("state") == "":
		writeError(w, http.StatusBadRequest, "invalid_request", "state parameter is required for CSRF protection")
		return
	case q.Get("code_challenge") == "":
		writeError(w, http.StatusBadRequest, "invalid_request", "code_challenge is required (PKCE)")
		return
	case method != "S256":
		writeError(w, http.StatusBadRequest, "invalid_request", "code_challenge_method must be S256")
		return
	case clientID == "":
		writeError(w, http.StatusBadRequest, "invalid_request", "client_id is required in Progressive Consent mode")
		return
	}
	client := b.clients.lookup(clientID)
	scopes := strings.Fields(q.Get("scope"))
	switch {
	case client == nil:
		writeError(w, http.StatusUnauthorized, "unauthorized_client", "unknown client")
		return
	case !MatchRedirectURI(client.RedirectURIs, redirectURI):
		writeError(w, http.StatusUnauthorized, "unauthorized_client", "redirect_uri is not registered for this client")
		return
	case !client.allowsScopes(scopes):
		writeError(w, http.StatusUnauthorized, "unauthorized_client", "scope is not allowed for this client")
		return
	}
	if res := q.Get("resource"); res != "" && res != b.cfg.Resource {
		writeError(w, http.StatusBadRequest, "invalid_target", "resource is not this server")
		return
	}

	d, err := b.idp.Discovery(r.Context())
	if err != nil {
		b.logger.Warn("authorize: identity provider unavailable", zap.Error(err))
		w.Header().Set("Retry-After", "5")
		writeError(w, http.StatusServiceUnavailable, "temporarily_unavailable", "the identity provider cannot be reached; try again shortly")
		return
	}
	if len(scopes) == 0 {
		scopes = client.Scopes
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
	b.logger.Info("flow 1: sending client to the identity provider", zap.String("client_id", clientID))
	redirectWithQuery(w, r, d.BrowserAuthorizationEndpoint, idp)
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
