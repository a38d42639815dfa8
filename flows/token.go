package flows

import (
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"

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
// (token_code.go), the refresh_token grant (token_refresh.go) and, with trusted
// enterprise issuers, the JWT bearer grant for ID-JAGs (token_jwt_bearer.go), for authenticated
// clients, readable by browser clients (CORS without credentials).
func (b *Broker) serveToken(w http.ResponseWriter, r *http.Request) {
	if answerTokenPreflight(w, r) {
		return
	}
	resp, err := b.token(w, r)
	if err != nil {
		b.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// token reads, authenticates and limits a token request, and runs its grant.
func (b *Broker) token(w http.ResponseWriter, r *http.Request) (TokenResponse, error) {
	form, client, err := b.tokenRequest(w, r)
	if err != nil {
		return TokenResponse{}, err
	}
	gt := form.Get("grant_type")
	switch gt {
	case grantAuthorizationCode, grantRefreshToken:
	case grantJWTBearer:
		if len(b.enterprise) == 0 {
			return TokenResponse{}, newRequestError(http.StatusBadRequest, "unsupported_grant_type", "the grant type is not supported")
		}
	case "":
		return TokenResponse{}, errInvalidRequest("grant_type is required")
	default:
		return TokenResponse{}, newRequestError(http.StatusBadRequest, "unsupported_grant_type", "the grant type is not supported")
	}
	if !client.allowsGrantType(gt) {
		return TokenResponse{}, errUnauthorizedClient("the client did not register this grant type")
	}
	switch gt {
	case grantAuthorizationCode:
		return b.exchangeCode(r, form, client)
	case grantJWTBearer:
		return b.jwtBearerGrant(r, form, client)
	}
	return b.refreshGrant(r, form, client)
}

// tokenRequest reads the form of a token or revocation request and authenticates its
// client, within the address's and the client's rate limits.
func (b *Broker) tokenRequest(w http.ResponseWriter, r *http.Request) (url.Values, *Client, error) {
	form, err := readTokenForm(w, r)
	if err != nil {
		return nil, nil, err
	}
	if err := b.allowTokenRequest(r); err != nil {
		return nil, nil, err
	}
	client, err := b.tokenClient(r, form)
	if err != nil {
		return nil, nil, err
	}
	if err := b.allowClientRequest(client); err != nil {
		return nil, nil, err
	}
	return form, client, nil
}

// answerTokenPreflight sets the CORS headers of the token and revocation endpoints and
// answers their preflight, telling whether it did.
func answerTokenPreflight(w http.ResponseWriter, r *http.Request) bool {
	allowCORS(w, "POST, OPTIONS")
	if r.Method != http.MethodOptions {
		return false
	}
	w.WriteHeader(http.StatusNoContent)
	return true
}

// readTokenForm refuses other methods than POST and reads the bounded form body of a
// token or revocation request. Parameters in the query string are never read:
// credentials and codes belong in the body.
func readTokenForm(w http.ResponseWriter, r *http.Request) (url.Values, error) {
	if r.Method != http.MethodPost {
		return nil, errMethodNotAllowed("POST, OPTIONS")
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/x-www-form-urlencoded" {
		return nil, errInvalidRequest("the request body must be application/x-www-form-urlencoded")
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxTokenRequestBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return nil, newRequestError(http.StatusRequestEntityTooLarge, "invalid_request", "request body too large")
		}
		return nil, errInvalidRequest("request body could not be read").because(err)
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		return nil, errInvalidRequest("the request body is not a valid form")
	}
	for k, vs := range form {
		// RFC 6749 §3.2; only RFC 8707's resource may repeat, and is checked where read.
		if len(vs) > 1 && k != "resource" {
			return nil, errInvalidRequest("a parameter is repeated")
		}
	}
	return form, nil
}

// tokenClient authenticates the client of a token or revocation request by its
// registered method. A failure is 401 invalid_client, with a Basic challenge when the
// client tried Basic (RFC 6749 §5.2).
func (b *Broker) tokenClient(r *http.Request, form url.Values) (*Client, error) {
	c, err := b.authenticateClient(r, form)
	switch {
	case err == nil && c != nil:
		return c, nil
	case errors.Is(err, errClientAuthMultiple):
		return nil, errInvalidRequest("client credentials must be sent by one method only")
	case err == nil, errors.Is(err, ErrUnknownClient), errors.Is(err, errClientAuth):
		description := "client authentication failed"
		var refusal assertionRefusal
		if errors.As(err, &refusal) {
			description = "client authentication failed: " + string(refusal)
		}
		e := newRequestError(http.StatusUnauthorized, "invalid_client", description).because(err)
		if _, _, basic := r.BasicAuth(); basic {
			e.challenge = `Basic realm="` + b.issuer + `"`
		}
		return nil, e
	default:
		return nil, errUnavailable("authenticating client", err)
	}
}

// allowTokenRequest takes a token from the bucket of the request's client address, or
// refuses with 429.
func (b *Broker) allowTokenRequest(r *http.Request) error {
	if ok, wait := b.tokenAddresses.Allow(ratelimit.Key(clientIP(r)), tokenRatePerAddress, b.now()); !ok {
		return errTooManyRequests(wait, "too many requests from this address; retry later")
	}
	return nil
}

// allowClientRequest takes a token from a confidential registered client's bucket, or
// refuses with 429. Other clients' ids are shared by all their users (see
// tokenRatePerClient), and a public client's id authenticates it alone: a hosted client
// sharing one registration among its users shows the id to each of them.
func (b *Broker) allowClientRequest(c *Client) error {
	if c.Source != ClientSourceRegistered || c.AuthMethod == AuthMethodNone {
		return nil
	}
	if ok, wait := b.tokenClients.Allow(c.ID, tokenRatePerClient, b.now()); !ok {
		return errTooManyRequests(wait, "too many requests from this client; retry later").
			because(fmt.Errorf("client %s over its rate limit", c.ID))
	}
	return nil
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
