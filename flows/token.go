package flows

import (
	"errors"
	"io"
	"mime"
	"net/http"
	"net/url"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/internal/ratelimit"
)

// maxTokenRequestBytes bounds the form of a token or revocation request: a few tokens
// and URIs, never more.
const maxTokenRequestBytes = 64 << 10

// Rate limits of the token and revocation endpoints, per minute, far above what clients
// do: a client refreshes once per access-token lifetime, a login takes one code exchange.
// Hosted clients reach the broker from a few shared egress addresses, so the address
// limit is the generous one. Configured and metadata-document client ids are shared by
// every user of that client and known to anyone, and so is a public client's id to anyone
// it was shown to: limiting them would let a stranger lock all those users out, so they
// are limited per address and per grant only.
const (
	tokenRatePerAddress = 120 // token and revocation requests together, per client address
	tokenRatePerClient  = 60  // per confidential registered (RFC 7591) client
	refreshRatePerGrant = 30  // rotations of one token family; repeats do not count
)

// serveToken is the token endpoint (hybrid mode): the authorization_code grant
// (token_code.go) and the refresh_token grant (token_refresh.go), for authenticated
// clients, readable by browser clients (CORS without credentials).
func (b *Broker) serveToken(w http.ResponseWriter, r *http.Request) {
	form, ok := readTokenForm(w, r)
	if !ok || !b.allowTokenRequest(w, r) {
		return
	}
	client, ok := b.tokenClient(w, r, form)
	if !ok || !b.allowClientRequest(w, client) {
		return
	}
	gt := form.Get("grant_type")
	switch gt {
	case grantAuthorizationCode, grantRefreshToken:
	case "":
		writeError(w, http.StatusBadRequest, "invalid_request", "grant_type is required")
		return
	default:
		writeError(w, http.StatusBadRequest, "unsupported_grant_type", "the grant type is not supported")
		return
	}
	if !client.allowsGrantType(gt) {
		writeError(w, http.StatusBadRequest, "unauthorized_client", "the client did not register this grant type")
		return
	}
	if gt == grantAuthorizationCode {
		b.exchangeCode(w, r, form, client)
	} else {
		b.refreshGrant(w, r, form, client)
	}
}

// readTokenForm answers the CORS preflight of the token and revocation endpoints,
// refuses other methods than POST, and reads the bounded form body. Parameters in the
// query string are never read: credentials and codes belong in the body. It returns false
// when it has answered.
func readTokenForm(w http.ResponseWriter, r *http.Request) (url.Values, bool) {
	allowCORS(w, "POST, OPTIONS")
	switch r.Method {
	case http.MethodOptions:
		w.WriteHeader(http.StatusNoContent)
		return nil, false
	case http.MethodPost:
	default:
		w.Header().Set("Allow", "POST, OPTIONS")
		writeError(w, http.StatusMethodNotAllowed, "invalid_request", "method not allowed")
		return nil, false
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/x-www-form-urlencoded" {
		writeError(w, http.StatusBadRequest, "invalid_request", "the request body must be application/x-www-form-urlencoded")
		return nil, false
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxTokenRequestBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			writeError(w, http.StatusRequestEntityTooLarge, "invalid_request", "request body too large")
		} else {
			writeError(w, http.StatusBadRequest, "invalid_request", "request body could not be read")
		}
		return nil, false
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request", "the request body is not a valid form")
		return nil, false
	}
	for k, vs := range form {
		// RFC 6749 §3.2; only RFC 8707's resource may repeat, and is checked where read.
		if len(vs) > 1 && k != "resource" {
			writeError(w, http.StatusBadRequest, "invalid_request", "a parameter is repeated")
			return nil, false
		}
	}
	return form, true
}

// tokenClient authenticates the client of a token or revocation request by its
// registered method, or answers 401 invalid_client (with a Basic challenge when the
// client tried Basic, RFC 6749 §5.2) and returns false.
func (b *Broker) tokenClient(w http.ResponseWriter, r *http.Request, form url.Values) (*Client, bool) {
	c, err := b.authenticateClient(r, form)
	switch {
	case err == nil && c != nil:
		return c, true
	case errors.Is(err, errClientAuthMultiple):
		writeError(w, http.StatusBadRequest, "invalid_request", "client credentials must be sent by one method only")
	case err == nil, errors.Is(err, ErrUnknownClient), errors.Is(err, errClientAuth):
		if _, _, basic := r.BasicAuth(); basic {
			w.Header().Set("WWW-Authenticate", `Basic realm="`+b.issuer+`"`)
		}
		b.logger.Debug("client authentication failed", zap.String("path", r.URL.Path), zap.Error(err))
		writeError(w, http.StatusUnauthorized, "invalid_client", "client authentication failed")
	default:
		b.unavailable(w, "authenticating client", err)
	}
	return nil, false
}

// allowTokenRequest takes a token from the bucket of the request's client address, or
// answers 429 and returns false.
func (b *Broker) allowTokenRequest(w http.ResponseWriter, r *http.Request) bool {
	ok, wait := b.tokenAddresses.Allow(ratelimit.Key(clientIP(r)), tokenRatePerAddress, b.now())
	if !ok {
		b.logger.Debug("token endpoint: address over its rate limit", zap.String("path", r.URL.Path))
		tooManyRequests(w, wait, "too many requests from this address; retry later")
	}
	return ok
}

// allowClientRequest takes a token from a confidential registered client's bucket, or
// answers 429 and returns false. Other clients' ids are shared by all their users (see
// tokenRatePerClient), and a public client's id authenticates it alone: a hosted client
// sharing one registration among its users shows the id to each of them.
func (b *Broker) allowClientRequest(w http.ResponseWriter, c *Client) bool {
	if c.Source != ClientSourceRegistered || c.AuthMethod == AuthMethodNone {
		return true
	}
	ok, wait := b.tokenClients.Allow(c.ID, tokenRatePerClient, b.now())
	if !ok {
		b.logger.Debug("token endpoint: client over its rate limit", zap.String("client_id", c.ID))
		tooManyRequests(w, wait, "too many requests from this client; retry later")
	}
	return ok
}

// unavailable answers 503 when the broker cannot do its part now (storage, a client's
// metadata document): retrying may work, signing in again would not help.
func (b *Broker) unavailable(w http.ResponseWriter, what string, err error) {
	b.logger.Error(what, zap.Error(err))
	w.Header().Set("Retry-After", "5")
	writeError(w, http.StatusServiceUnavailable, "temporarily_unavailable", "the broker cannot complete this request now; try again shortly")
}

// singleResource reads the optional RFC 8707 resource parameter: absent (""), or one
// value; several values are refused, as the broker serves one resource per token.
func singleResource(form url.Values) (string, bool) {
	switch vs := form["resource"]; len(vs) {
	case 0:
		return "", true
	case 1:
		return vs[0], vs[0] != ""
	default:
		return "", false
	}
}
