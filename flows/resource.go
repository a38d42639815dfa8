package flows

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/mcprequest"
)

// ProtectedResourceMetadata is the RFC 9728 document.
type ProtectedResourceMetadata struct {
	Resource               string   `json:"resource"`
	AuthorizationServers   []string `json:"authorization_servers"`
	ScopesSupported        []string `json:"scopes_supported,omitempty"`
	BearerMethodsSupported []string `json:"bearer_methods_supported"`
	ResourceName           string   `json:"resource_name,omitempty"`
}

// serveProtectedResourceMetadata answers RFC 9728 discovery, at the root and at the
// resource-suffixed path, readable from any origin without credentials. Its
// scopes_supported are the base scopes (Config.BaseScopes, else every scope offered): MCP
// 2026-07-28 reads them as the minimal set for basic functionality, what a client asks
// for when a challenge names none. The authorization server's metadata lists them all.
func (b *Broker) serveProtectedResourceMetadata(w http.ResponseWriter, r *http.Request) {
	serveMetadata(b, w, r, func() any {
		return ProtectedResourceMetadata{
			Resource:               b.cfg.Resource,
			AuthorizationServers:   []string{b.authorizationServer(r.Context())},
			ScopesSupported:        b.offer().base,
			BearerMethodsSupported: []string{"header"},
			ResourceName:           b.resourceName(),
		}
	})
}

// serveMetadata answers a discovery document: GET (and HEAD) from any origin without
// credentials, with the CORS preflight.
func serveMetadata[T any](b *Broker, w http.ResponseWriter, r *http.Request, doc func() T) {
	allowCORS(w, "GET, OPTIONS")
	switch r.Method {
	case http.MethodOptions:
		w.WriteHeader(http.StatusNoContent)
	case http.MethodGet, http.MethodHead:
		writeJSON(w, http.StatusOK, doc())
	default:
		b.writeError(w, r, errMethodNotAllowed("GET, HEAD, OPTIONS"))
	}
}

// authorizationServer is the issuer MCP clients log in with: the broker itself in hybrid
// mode. In progressive mode that is
// the IdP, named exactly as its discovery document names itself (clients compare), or the
// configured browser-facing address while the IdP cannot be reached.
func (b *Broker) authorizationServer(ctx context.Context) string {
	if b.cfg.Mode == ModeHybrid {
		return b.issuer
	}
	if d, err := b.idp.Discovery(ctx); err == nil && d.Issuer != "" {
		return d.Issuer
	}
	if b.cfg.PublicIssuer != "" {
		return b.cfg.PublicIssuer
	}
	return b.cfg.Issuer
}

func (b *Broker) resourceName() string {
	return "MCP server at " + b.resourceURL.Host
}

// corsAllowHeaders are the request headers any origin may send: the bearer token, the
// body's media type, and the MCP transport's headers of every revision (MCP-Protocol-
// Version, and Mcp-Method and Mcp-Name from 2026-07-28; Mcp-Session-Id and Last-Event-ID
// before). A preflight of the MCP endpoint adds the Mcp-Param-* headers it asks for.
const corsAllowHeaders = "Authorization, Content-Type, MCP-Protocol-Version, Mcp-Method, Mcp-Name, Mcp-Session-Id, Last-Event-ID"

// corsExposeHeaders are the response headers a browser client may read.
const corsExposeHeaders = "WWW-Authenticate, Mcp-Session-Id"

// allowCORS lets any origin read a public response. Credentials are never allowed (SECURITY.md W12).
func allowCORS(w http.ResponseWriter, methods string) {
	h := w.Header()
	h.Set("Access-Control-Allow-Origin", "*")
	h.Set("Access-Control-Allow-Methods", methods)
	h.Set("Access-Control-Allow-Headers", corsAllowHeaders)
	h.Set("Access-Control-Expose-Headers", corsExposeHeaders)
	h.Set("Access-Control-Max-Age", "600")
}

// Bounds of the Mcp-Param-* headers a preflight may ask for: how many are allowed, and
// how long a name may be. Others are left out of the answer, and the browser then refuses
// to send them.
const (
	maxPreflightParamHeaders  = 32
	maxPreflightParamNameSize = 128
)

// answerMCPPreflight answers a CORS preflight of the MCP endpoint. It carries no
// credentials; browser MCP clients need its answer. Besides the fixed headers it allows
// the Mcp-Param-{Name} headers the browser asks for (2026-07-28 mirrors annotated tool
// arguments into them, and which exist only the tool list knows): each a well-formed
// field name (RFC 9110 §5.1), at most maxPreflightParamHeaders of them.
func answerMCPPreflight(w http.ResponseWriter, r *http.Request) {
	allowCORS(w, mcpMethods)
	h := w.Header()
	h.Add("Vary", "Access-Control-Request-Headers")
	if params := requestedParamHeaders(r.Header.Values("Access-Control-Request-Headers")); params != "" {
		h.Set("Access-Control-Allow-Headers", corsAllowHeaders+", "+params)
	}
	w.WriteHeader(http.StatusNoContent)
}

// requestedParamHeaders lists, comma-separated, the Mcp-Param-* names of a preflight's
// Access-Control-Request-Headers that are well-formed field names, bounded in number and
// length.
func requestedParamHeaders(values []string) string {
	var b strings.Builder
	n := 0
	for _, v := range values {
		for name := range strings.SplitSeq(v, ",") {
			name = strings.TrimSpace(name)
			if n == maxPreflightParamHeaders {
				return b.String()
			}
			if len(name) <= len(mcprequest.HeaderParamPrefix) || len(name) > maxPreflightParamNameSize ||
				!strings.EqualFold(name[:len(mcprequest.HeaderParamPrefix)], mcprequest.HeaderParamPrefix) || !fieldName(name) {
				continue
			}
			if n > 0 {
				b.WriteString(", ")
			}
			b.WriteString(name)
			n++
		}
	}
	return b.String()
}

// fieldName tells whether s is an RFC 9110 §5.1 field name: one or more tchar.
func fieldName(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return s != ""
}

// protect authenticates a request to the MCP endpoint and prepares it for the upstream.
func (b *Broker) protect(w http.ResponseWriter, r *http.Request) (*http.Request, *idp.Principal) {
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
		answerMCPPreflight(w, r)
		return nil, nil
	}
	who, err := b.admit(w, r)
	if err != nil {
		if b.metrics != nil {
			b.metrics.Count(requestOutcome(asRequestError(err)))
		}
		b.writeError(w, r, err)
		return nil, nil
	}
	if who == nil {
		return nil, nil // answered with a URL elicitation, counted by admit
	}
	b.count(RequestPassed)
	return r, who
}

// admit authenticates a request to the MCP endpoint, checks the scopes and offline access
// its tool calls need, and puts in place of the client's token what the upstream gets. It
// returns nil and no error when it answered the request itself.
func (b *Broker) admit(w http.ResponseWriter, r *http.Request) (*idp.Principal, error) {
	who, tok, err := b.authenticate(r)
	if err != nil {
		return nil, err
	}
	need, msg, refused := b.requiredScopes(w, r)
	if refused != nil {
		return nil, refused
	}
	tools := msg.Tools
	if len(need) > 0 && !who.HasScopes(need) {
		return nil, b.errInsufficientScope(who, need)
	}
	in := inputRound{msg: msg} // the broker's own input requests (input_request.go)
	if err := b.readInputRound(who, &in); err != nil {
		return nil, err
	}
	if len(tools) > 0 {
		if answered, err := b.checkOfflineAccess(w, r, who, tools, &in); err != nil || answered {
			if err == nil {
				b.count(RequestOfflineAccessNeeded) // answered with a URL elicitation (offline_access_elicitation.go)
			}
			return nil, err
		}
	}

	// The request is ours to change, as in any handler chain: no copy on the hot path.
	stripClientIdentity(r.Header, b.cfg.SubjectHeader)
	// Caddy's reverse_proxy forwards request trailers, whose values arrive after the body
	// and so after any stripping; an upstream merging them into its headers would read
	// identity headers the client sent. MCP uses none: none is forwarded.
	r.Trailer = nil
	if b.appPasswords != nil {
		if answered, err := b.delegateAppPassword(w, r, who, tok.raw, tools, &in); err != nil || answered {
			if err == nil {
				b.count(RequestAppPasswordNeeded) // answered with a URL elicitation (delegation_app_password.go)
			}
			return nil, err
		}
	} else if err := b.delegateInto(r, who, tok, need); err != nil {
		return nil, err
	}
	stripOwnInput(r, &in)
	// Checked first: the fields are built only when DEBUG is on (the warm path allocates nothing).
	if ce := b.log.resource.Check(zap.DebugLevel, "request admitted"); ce != nil {
		ce.Write(zap.String("subject", who.Subject), zap.String("client_id", who.ClientID),
			zap.String("session", fingerprintOrEmpty(who.SessionID)), zap.Int("tools", len(tools)))
	}
	return who, nil
}

// presentedToken is the access token a request presented and, in progressive mode, its
// SHA-256 (tokencache.Key), which keys the delegated token: the verifier computes it on
// the token's first request and its cached verdict hands it on, so that a warm request
// does not hash the token with SHA-256.
type presentedToken struct {
	raw    string
	digest [sha256.Size]byte
}

// authenticate verifies the bearer token of a request to the MCP endpoint and returns
// who presented it, and the token.
func (b *Broker) authenticate(r *http.Request) (*idp.Principal, presentedToken, error) {
	if r.URL.RawQuery != "" && r.URL.Query().Has("access_token") { // parsed only when there is a query
		// RFC 6750 §3.1: a request using a method the resource does not accept is
		// invalid_request, named in the challenge too.
		e := errInvalidRequest("access tokens are accepted only in the Authorization header")
		e.challenge, e.cors = "Bearer "+b.offer().challengeTail+`, error="invalid_request"`, mcpMethods
		return nil, presentedToken{}, e
	}
	raw, ok := bearerToken(r)
	if !ok {
		return nil, presentedToken{}, b.errBearer("", "a bearer token is required")
	}
	who, digest, err := b.verifyAccessToken(r.Context(), raw)
	switch later := idp.AsRetryLater(err); {
	case err == nil:
		return who, presentedToken{raw: raw, digest: digest}, nil
	case later != nil:
		// Turned away before reaching the IdP: no verdict on the token, so never 401.
		e := newRequestError(later.Status, "temporarily_unavailable", "too many new tokens to verify; retry later")
		e.retryAfter = later.RetryAfter
		return nil, presentedToken{}, e
	case errors.Is(err, ErrStorageUnavailable):
		return nil, presentedToken{}, errUnavailable("verifying a broker access token", err)
	case errors.Is(err, idp.ErrUnavailable):
		return nil, presentedToken{}, errIdPUnavailable(fmt.Errorf("verifying an access token: %w", err))
	default:
		return nil, presentedToken{}, b.errBearer("invalid_token", "the access token is invalid or expired").
			because(fmt.Errorf("token %s refused: %w", Fingerprint(raw), err))
	}
}

// verifyAccessToken checks a token presented to the MCP endpoint: one the broker issued
// in hybrid mode, one the IdP issued in progressive mode. The digest is the token's
// SHA-256 in progressive mode (delegation keys its cache with it), zero in hybrid mode
// (delegation keys it with the session).
func (b *Broker) verifyAccessToken(ctx context.Context, raw string) (*idp.Principal, [sha256.Size]byte, error) {
	if b.cfg.Mode == ModeHybrid {
		p, err := b.verifyBrokerToken(ctx, raw)
		return p, [sha256.Size]byte{}, err
	}
	return b.verifier.VerifyDigest(ctx, raw)
}

// bearerToken reads the token of an `Authorization: Bearer` header, the only place an
// access token is accepted.
func bearerToken(r *http.Request) (string, bool) {
	// Header.Get without canonicalising a name that already is: the first value.
	v := r.Header["Authorization"]
	if len(v) == 0 {
		return "", false
	}
	h := v[0]
	if len(h) < 8 || !strings.EqualFold(h[:7], "Bearer ") {
		return "", false
	}
	t := strings.TrimSpace(h[7:])
	return t, t != ""
}

// mcpMethods are the methods of the MCP endpoint, for the CORS headers of its answers.
const mcpMethods = "GET, POST, DELETE, OPTIONS"

// errBearer is 401 with the RFC 9728 / RFC 6750 §3 challenge that starts discovery; code
// is empty when the request carried no token, and then the answer carries no error
// information at all (RFC 6750 §3.1): the challenge alone, without a body. description
// is then for the log only.
func (b *Broker) errBearer(code, description string) *requestError {
	v := "Bearer " + b.offer().challengeTail
	if code != "" {
		v += `, error="` + code + `"`
	}
	e := newRequestError(http.StatusUnauthorized, code, description)
	e.challenge, e.cors, e.bare = v, mcpMethods, code == ""
	return e
}

// errInsufficientScope is 403 for step-up (RFC 6750 §3.1): the scope named is what the
// client holds plus what the call needs, so re-authorizing with it loses nothing.
func (b *Broker) errInsufficientScope(who *idp.Principal, need []string) *requestError {
	scopes := advertisedScopes(who.Scopes)
	for _, n := range need {
		if !who.HasScopes([]string{n}) {
			scopes = append(scopes, n)
		}
	}
	e := newRequestError(http.StatusForbidden, "insufficient_scope", "the access token lacks a scope this call needs")
	e.challenge = `Bearer error="insufficient_scope", scope="` + strings.Join(scopes, " ") +
		`", resource_metadata="` + b.metadataURL + `"`
	e.cors = mcpMethods
	return e
}
