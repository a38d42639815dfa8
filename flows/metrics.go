package flows

import (
	"net/http"
	"strings"
	"time"

	"github.com/caddy-mcp/oauth-broker/idp"
)

// Metrics receives what the broker counts: request outcomes, logins, tokens, delegations,
// the IdP's latency. Every label is one of the small enumerations below, never a client
// id, subject or tool name, so the series stay bounded. An implementation resolves its
// series once, so that counting on the hot path (RequestPassed, DelegationCacheHit) costs
// an atomic add and no allocation. Config.Metrics nil counts nothing.
type Metrics interface {
	// Count adds one to e's counter.
	Count(e Event)
	// Login counts a login of flow ending in (or, for LoginStarted, reaching) outcome.
	Login(flow LoginFlow, outcome LoginOutcome)
	// IdPRequest observes one HTTP request to the IdP, how it ended and how long it took.
	IdPRequest(endpoint IdPEndpoint, result IdPResult, took time.Duration)
}

// Event is a counted event of the broker.
type Event uint8

// The events. Their metric names and labels are the Metrics implementation's.
const (
	// Requests to the MCP endpoint, by outcome.
	RequestPassed              Event = iota // authenticated and passed on
	RequestNoToken                          // 401 without a bearer token (the discovery challenge)
	RequestInvalidToken                     // 401 invalid_token
	RequestInsufficientScope                // 403 insufficient_scope (step-up)
	RequestRefused                          // another 4xx: framing, a token in the query, method
	RequestOfflineAccessNeeded              // answered with the offline access elicitation
	RequestAppPasswordNeeded                // answered with the app password elicitation (delegation app_password)
	RequestRateLimited                      // 429
	RequestUnavailable                      // 503: storage or the IdP
	RequestFailed                           // another 5xx

	// Broker tokens.
	TokenIssued           // a token family started by an authorization code
	TokenRefreshed        // a refresh rotated a pair
	TokenReuseDetected    // a replayed code or reused refresh token revoked its family
	TokenRevoked          // a token family revoked at the revocation endpoint
	BackgroundTokenIssued // a background token from an offline access grant

	// Delegation to the upstream.
	DelegationCacheHit  // a delegated token served from memory
	DelegationCacheMiss // none in memory: obtained (or joined) from the IdP
	DelegationExchanged // an RFC 8693 token exchange succeeded
	DelegationRefreshed // a refresh of the session's IdP grant succeeded
	DelegationFailed    // no delegated token: the request was refused
	// DelegationRefusedUpstream is an upstream's 401 to a delegated token, answered 502.
	DelegationRefusedUpstream

	// Clients.
	RegistrationAccepted    // an RFC 7591 registration stored
	RegistrationRefused     // a registration refused (metadata, rate limit, storage)
	MetadataDocumentFetched // a client metadata document fetched and accepted
	MetadataDocumentRefused // a client metadata document unreachable or refused

	// StorageError is an answer that failed because storage could not be read or written.
	StorageError

	// NumEvents is the number of events, for implementations that keep them in an array.
	NumEvents
)

// LoginFlow is which login a LoginOutcome belongs to.
type LoginFlow uint8

const (
	LoginHybrid        LoginFlow = iota // the hybrid login of an MCP client
	LoginOfflineAccess                  // the offline access login
	NumLoginFlows
)

// String is the flow's label value.
func (f LoginFlow) String() string {
	if f == LoginOfflineAccess {
		return "offline_access"
	}
	return "hybrid"
}

// LoginOutcome is how far a login got: started, completed, or why it failed. Each
// failure belongs to one step (Step) and says why (Reason), both bounded label values.
type LoginOutcome uint8

const (
	LoginStarted   LoginOutcome = iota // the browser was sent to the IdP
	LoginCompleted                     // a session (or an offline access grant) was stored

	// Failures at the consent page.
	LoginFailedConsentDenied // the user denied consent
	// Failures the IdP answered with on the callback.
	LoginFailedIdPDenied      // the user or the IdP denied the login (access_denied)
	LoginFailedIdPUnavailable // the IdP said it cannot serve now (temporarily_unavailable)
	LoginFailedIdPError       // another error from the IdP
	LoginFailedIdPNoCode      // a callback without a code
	// Failures of the callback itself.
	LoginFailedWrongBrowser // the callback came to a browser that did not start the login
	LoginFailedUnknownState // an unknown, expired or replayed state
	// Failures redeeming the IdP's code.
	LoginFailedIdPUnreachable // the IdP's token endpoint did not answer
	LoginFailedCodeRefused    // the IdP refused the code, or its ID token was refused
	LoginFailedWrongAccount   // another user logged in than the one who started the flow
	LoginFailedNoRefreshToken // the IdP granted no refresh token for offline access
	// Failures storing what the login made.
	LoginFailedStorage // the pending login, session or grant could not be read or stored
	NumLoginOutcomes
)

// loginOutcomeLabels are each outcome's step and reason label values.
var loginOutcomeLabels = [NumLoginOutcomes][2]string{
	LoginStarted:              {"started", ""},
	LoginCompleted:            {"completed", ""},
	LoginFailedConsentDenied:  {"consent", "denied"},
	LoginFailedIdPDenied:      {"idp", "denied"},
	LoginFailedIdPUnavailable: {"idp", "unavailable"},
	LoginFailedIdPError:       {"idp", "error"},
	LoginFailedIdPNoCode:      {"idp", "no_code"},
	LoginFailedWrongBrowser:   {"callback", "wrong_browser"},
	LoginFailedUnknownState:   {"callback", "unknown_state"},
	LoginFailedIdPUnreachable: {"code_exchange", "unreachable"},
	LoginFailedCodeRefused:    {"code_exchange", "refused"},
	LoginFailedWrongAccount:   {"code_exchange", "wrong_account"},
	LoginFailedNoRefreshToken: {"code_exchange", "no_refresh_token"},
	LoginFailedStorage:        {"storage", "storage"},
}

// Failed tells whether o is a failure.
func (o LoginOutcome) Failed() bool { return o >= LoginFailedConsentDenied }

// Step is the outcome's step label value: started, completed, or the step that failed.
func (o LoginOutcome) Step() string { return loginOutcomeLabels[o][0] }

// Reason is a failure's reason label value; empty for started and completed.
func (o LoginOutcome) Reason() string { return loginOutcomeLabels[o][1] }

// IdPEndpoint is which of the IdP's endpoints a request went to.
type IdPEndpoint uint8

const (
	IdPDiscovery IdPEndpoint = iota
	IdPToken
	IdPIntrospection
	IdPJWKS
	IdPRevocation
	IdPOther
	NumIdPEndpoints
)

// String is the endpoint's label value.
func (e IdPEndpoint) String() string {
	return [...]string{"discovery", "token", "introspection", "jwks", "revocation", "other"}[e]
}

// IdPResult is how a request to the IdP ended.
type IdPResult uint8

const (
	IdPOK          IdPResult = iota // a 2xx or 3xx answer
	IdPClientError                  // a 4xx answer (an invalid grant, a refused token)
	IdPServerError                  // a 5xx answer
	IdPUnreachable                  // no answer: connection, TLS or timeout
	NumIdPResults
)

// String is the result's label value.
func (r IdPResult) String() string {
	return [...]string{"ok", "client_error", "server_error", "unreachable"}[r]
}

// count adds one to e when the broker has metrics.
func (b *Broker) count(e Event) {
	if b.metrics != nil {
		b.metrics.Count(e)
	}
}

// login counts a login of flow with outcome when the broker has metrics.
func (b *Broker) login(flow LoginFlow, outcome LoginOutcome) {
	if b.metrics != nil {
		b.metrics.Login(flow, outcome)
	}
}

// loginFailed counts a login of flow failing with outcome and returns err.
func (b *Broker) loginFailed(flow LoginFlow, outcome LoginOutcome, err *requestError) *requestError {
	b.login(flow, outcome)
	return err
}

// requestOutcome is the event of an MCP endpoint request answered with e.
func requestOutcome(e *requestError) Event {
	switch {
	case e.status == http.StatusUnauthorized && strings.Contains(e.challenge, "error="):
		return RequestInvalidToken
	case e.status == http.StatusUnauthorized:
		return RequestNoToken
	case e.code == "insufficient_scope":
		return RequestInsufficientScope
	case e.status == http.StatusTooManyRequests:
		return RequestRateLimited
	case e.status == http.StatusServiceUnavailable:
		return RequestUnavailable
	case e.status >= http.StatusInternalServerError:
		return RequestFailed
	}
	return RequestRefused
}

// idpTransport times the broker's requests to the IdP (discovery, token, introspection,
// JWKS, revocation) for Metrics. It knows an endpoint by the discovery document already
// fetched, never fetching it itself.
type idpTransport struct {
	next    http.RoundTripper
	metrics Metrics
	// broker is set once New has built it, before any request.
	broker *Broker
}

// instrumentIdPClient is c with its requests timed for m, and its transport, whose broker
// the caller sets.
func instrumentIdPClient(c *http.Client, m Metrics) (*http.Client, *idpTransport) {
	next := c.Transport
	if next == nil {
		next = http.DefaultTransport
	}
	t := &idpTransport{next: next, metrics: m}
	out := *c
	out.Transport = t
	return &out, t
}

func (t *idpTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.next.RoundTrip(r)
	result := IdPUnreachable
	if err == nil {
		switch {
		case resp.StatusCode >= http.StatusInternalServerError:
			result = IdPServerError
		case resp.StatusCode >= http.StatusBadRequest:
			result = IdPClientError
		default:
			result = IdPOK
		}
	}
	t.metrics.IdPRequest(t.endpoint(r), result, time.Since(start))
	return resp, err
}

// endpoint names the IdP endpoint r goes to.
func (t *idpTransport) endpoint(r *http.Request) IdPEndpoint {
	if strings.HasSuffix(r.URL.Path, "/.well-known/openid-configuration") {
		return IdPDiscovery
	}
	var d *idp.Discovery
	if t.broker != nil {
		d = t.broker.idp.Known()
	}
	if d == nil {
		return IdPOther
	}
	u := *r.URL
	u.RawQuery, u.Fragment = "", ""
	switch u.String() {
	case d.TokenEndpoint:
		return IdPToken
	case d.IntrospectionEndpoint:
		return IdPIntrospection
	case d.JWKSURI:
		return IdPJWKS
	case d.RevocationEndpoint:
		return IdPRevocation
	}
	return IdPOther
}
