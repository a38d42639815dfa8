package flows

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-mcp/oauth-broker/idp"
)

// The one error path. A handler reads parse → validate → create and returns a
// *requestError (any other error answers 500 server_error); the Broker's writeError turns
// it into the response — JSON, a redirect to the client's redirect URI when the error
// carries one, or a page when a person's browser is at the other end — with its headers,
// and logs it once. Handlers never build an error response themselves.

// ErrStorageUnavailable means the broker's storage could not be read or written. It is a
// failure of the broker's own, never reported as the IdP's (idp.ErrUnavailable): both answer
// 503, but the log says which failed.
var ErrStorageUnavailable = errors.New("storage unavailable")

// storageFailed marks err, met while doing something with storage, as a storage failure.
func storageFailed(doing string, err error) error {
	return fmt.Errorf("%s: %w: %w", doing, ErrStorageUnavailable, err)
}

// oauthError is the RFC 6749 §5.2 error body. Descriptions are fixed, documented texts:
// never an exception message, an IdP's own description, or anything a client sent.
type oauthError struct {
	Error       string `json:"error"`
	Description string `json:"error_description,omitempty"`
}

// requestError is an OAuth error answer: its status, RFC 6749 error code and fixed
// description, and what the writer adds to it. The cause goes to the log only: it may hold
// paths, the IdP's own texts or storage details, which a client never sees (SECURITY.md W11).
type requestError struct {
	status      int
	code        string
	description string
	cause       error

	// retryAfter, when set, is sent as Retry-After in whole seconds (at least one).
	retryAfter time.Duration
	// challenge, when set, is the WWW-Authenticate value: RFC 6750 §3 at the resource,
	// Basic for a client that tried Basic authentication (RFC 6749 §5.2).
	challenge string
	// header, when set, is a header sent with the error, with value: the Allow of a 405
	// (RFC 9110 §15.5.6), the Accept-Encoding of a 415 (RFC 7694 §3).
	header, value string
	// cors, when set, makes the answer readable from any origin without credentials, for
	// these methods: a browser MCP client must read the MCP endpoint's challenge (SECURITY.md W12).
	cors string
	// page, when set, answers a person's browser with this HTML page of the error's
	// status instead of JSON (the consent and offline-access pages).
	page func(w http.ResponseWriter, status int)
	// bare answers with the status and headers only, no body: the no-token 401, which
	// carries no error information (RFC 6750 §3.1).
	bare bool
	// rpc, when set, answers with a JSON-RPC error response instead of an OAuth error:
	// the MCP transport's own refusals (HeaderMismatch), which MCP clients read.
	rpc *rpcError
	// redirect, when set, sends the error to the client's redirect URI instead of
	// answering JSON. Only the authorization endpoint sets it, and only once the redirect
	// URI is known to be the client's (RFC 6749 §4.1.2.1).
	redirect *errorRedirect
}

// rpcError is the JSON-RPC side of an MCP transport refusal: its error code, and the raw
// id of the request it answers (nil for none).
type rpcError struct {
	code int
	id   json.RawMessage
}

// jsonrpcErrorResponse is a JSON-RPC 2.0 error response; its message is the requestError's
// fixed description.
type jsonrpcErrorResponse struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id,omitempty"`
	Error   struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// errorRedirect is where an authorization error goes: the client's checked redirect URI
// with its state. page shows the user a link instead of redirecting (a URI anyone could
// have registered, RFC 9700 §4.11.2).
type errorRedirect struct {
	uri, state string
	page       bool
}

func (e *requestError) Error() string {
	s := e.code + ": " + e.description
	if e.cause != nil {
		s += ": " + e.cause.Error()
	}
	return s
}

func (e *requestError) Unwrap() error { return e.cause }

// because records what caused e, for the log.
func (e *requestError) because(cause error) *requestError {
	e.cause = cause
	return e
}

// to sends e to the client's redirect URI (see errorRedirect).
func (e *requestError) to(uri, state string, page bool) *requestError {
	e.redirect = &errorRedirect{uri: uri, state: state, page: page}
	return e
}

func newRequestError(status int, code, description string) *requestError {
	return &requestError{status: status, code: code, description: description}
}

// errInvalidRequest is 400 invalid_request: a parameter is missing, malformed or repeated.
func errInvalidRequest(description string) *requestError {
	return newRequestError(http.StatusBadRequest, "invalid_request", description)
}

// errInvalidGrant is 400 invalid_grant: a code or refresh token that is invalid, expired,
// revoked, or another client's.
func errInvalidGrant(description string) *requestError {
	return newRequestError(http.StatusBadRequest, "invalid_grant", description)
}

// errInvalidTarget is 400 invalid_target (RFC 8707 §2).
func errInvalidTarget(description string) *requestError {
	return newRequestError(http.StatusBadRequest, "invalid_target", description)
}

// errInvalidScope is 400 invalid_scope.
func errInvalidScope(description string) *requestError {
	return newRequestError(http.StatusBadRequest, "invalid_scope", description)
}

// errUnauthorizedClient is 400 unauthorized_client: the client may not use this grant.
func errUnauthorizedClient(description string) *requestError {
	return newRequestError(http.StatusBadRequest, "unauthorized_client", description)
}

// errMethodNotAllowed is 405 invalid_request with the methods allowed.
func errMethodNotAllowed(allow string) *requestError {
	e := newRequestError(http.StatusMethodNotAllowed, "invalid_request", "method not allowed")
	e.header, e.value = "Allow", allow
	return e
}

// errTooManyRequests is 429 temporarily_unavailable, retry after wait.
func errTooManyRequests(wait time.Duration, description string) *requestError {
	e := newRequestError(http.StatusTooManyRequests, "temporarily_unavailable", description)
	e.retryAfter = wait
	return e
}

// unavailableRetry is the Retry-After of a 503: soon, as a brief outage is the common case.
const unavailableRetry = 5 * time.Second

// errUnavailable is 503 when the broker cannot do its part now (storage, a client's
// metadata document): retrying may work, signing in again would not help. doing says what
// failed, for the log.
func errUnavailable(doing string, err error) *requestError {
	e := newRequestError(http.StatusServiceUnavailable, "temporarily_unavailable", "the broker cannot complete this request now; try again shortly")
	e.retryAfter = unavailableRetry
	return e.because(fmt.Errorf("%s: %w", doing, err))
}

// errStorage is errUnavailable for a storage failure: the cause wraps ErrStorageUnavailable.
func errStorage(doing string, err error) *requestError {
	e := errUnavailable(doing, err)
	e.cause = storageFailed(doing, err)
	return e
}

// errIdPUnavailable is 503 when the IdP cannot be reached or answers with a server error.
func errIdPUnavailable(err error) *requestError {
	e := newRequestError(http.StatusServiceUnavailable, "temporarily_unavailable", "the identity provider cannot be reached; try again shortly")
	e.retryAfter = unavailableRetry
	return e.because(err)
}

// errPage is an error answered with page, a person's browser being at the other end.
// Its code is for the log only.
func errPage(status int, page func(w http.ResponseWriter, status int)) *requestError {
	e := newRequestError(status, "page", "")
	e.page = page
	return e
}

// errServer is a server_error of status (500 or 502) with its cause, for the log.
func errServer(status int, description string, cause error) *requestError {
	return newRequestError(status, "server_error", description).because(cause)
}

// asRequestError is err's *requestError; any other error is a 500 server_error with err as
// its cause.
func asRequestError(err error) *requestError {
	var e *requestError
	if errors.As(err, &e) {
		return e
	}
	return errServer(http.StatusInternalServerError, "the request could not be completed", err)
}

// writeError answers err and logs it once: a failure of the broker or the IdP (a 5xx
// with a cause) at Error with its cause, anything else — a client's mistake, a limit, a
// failure already logged where it happened — at Debug.
//
// A redirect carries only the error in its query (RFC 6749 §4.1.2.1): it is the client
// that reads it, not the browser, so no header of the error goes with it.
func (b *Broker) writeError(w http.ResponseWriter, r *http.Request, err error) {
	e := asRequestError(err)
	b.logError(r, e)
	if errors.Is(e.cause, ErrStorageUnavailable) {
		b.count(StorageError)
	}
	if rd := e.redirect; rd != nil {
		q := url.Values{"error": {e.code}, "iss": {b.issuer}}
		if e.description != "" {
			q.Set("error_description", e.description)
		}
		if rd.state != "" {
			q.Set("state", rd.state)
		}
		if rd.page {
			b.showAuthorizeError(w, rd.uri, q, e)
			return
		}
		redirectWithQuery(w, r, rd.uri, q)
		return
	}
	h := w.Header()
	if e.retryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(max(1, int((e.retryAfter+time.Second-1)/time.Second))))
	}
	if e.challenge != "" {
		h.Set("WWW-Authenticate", e.challenge)
	}
	if e.header != "" {
		h.Set(e.header, e.value)
	}
	if e.cors != "" {
		allowCORS(w, e.cors)
	}
	if e.page != nil {
		e.page(w, e.status)
		return
	}
	if e.bare {
		h.Set("Cache-Control", "no-store")
		w.WriteHeader(e.status)
		return
	}
	if e.rpc != nil {
		answer := jsonrpcErrorResponse{JSONRPC: "2.0", ID: e.rpc.id}
		answer.Error.Code, answer.Error.Message = e.rpc.code, e.description
		writeJSON(w, e.status, answer)
		return
	}
	writeJSON(w, e.status, oauthError{Error: e.code, Description: e.description})
}

// logError logs an answered error once, with what failed when it was the broker or the IdP.
func (b *Broker) logError(r *http.Request, e *requestError) {
	level := zapcore.DebugLevel
	if e.status >= http.StatusInternalServerError && e.cause != nil {
		level = zapcore.ErrorLevel
	}
	ce := b.log.forPath(r.URL.Path).Check(level, "request failed")
	if ce == nil {
		return
	}
	fields := []zap.Field{zap.String("path", r.URL.Path), zap.Int("status", e.status), zap.String("code", e.code)}
	if e.bare {
		fields = append(fields, zap.String("reason", e.description))
	}
	switch {
	case errors.Is(e.cause, ErrStorageUnavailable):
		fields = append(fields, zap.String("failed", "storage"))
	case errors.Is(e.cause, idp.ErrUnavailable):
		fields = append(fields, zap.String("failed", "identity provider"))
	}
	if e.cause != nil {
		fields = append(fields, zap.Error(e.cause))
	}
	ce.Write(fields...)
}

// writeJSON answers with v as JSON, never cached: OAuth responses carry tokens or state.
func writeJSON(w http.ResponseWriter, status int, v any) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// redirectWithQuery adds q to target's query and answers 302.
func redirectWithQuery(w http.ResponseWriter, r *http.Request, target string, q url.Values) {
	u, err := url.Parse(target)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_request", Description: "redirect_uri is not a valid URI"})
		return
	}
	merged := u.Query()
	for k, vs := range q {
		merged[k] = vs
	}
	u.RawQuery = merged.Encode()
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, u.String(), http.StatusFound)
}
