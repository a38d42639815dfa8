package flows

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
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
// resource-suffixed path, readable from any origin without credentials.
func (b *Broker) serveProtectedResourceMetadata(w http.ResponseWriter, r *http.Request) {
	serveMetadata(w, r, func() any {
		return ProtectedResourceMetadata{
			Resource:               b.cfg.Resource,
			AuthorizationServers:   []string{b.authorizationServer(r.Context())},
			ScopesSupported:        advertisedScopes(b.cfg.Scopes),
			BearerMethodsSupported: []string{"header"},
			ResourceName:           b.resourceName(),
		}
	})
}

// serveMetadata answers a discovery document: GET (and HEAD) from any origin without
// credentials, with the CORS preflight.
func serveMetadata[T any](w http.ResponseWriter, r *http.Request, doc func() T) {
	allowCORS(w, "GET, OPTIONS")
	switch r.Method {
	case http.MethodOptions:
		w.WriteHeader(http.StatusNoContent)
	case http.MethodGet, http.MethodHead:
		writeJSON(w, http.StatusOK, doc())
	default:
		w.Header().Set("Allow", "GET, HEAD, OPTIONS")
		writeError(w, http.StatusMethodNotAllowed, "invalid_request", "method not allowed")
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

// allowCORS lets any origin read a public response. Credentials are never allowed (W12).
func allowCORS(w http.ResponseWriter, methods string) {
	h := w.Header()
	h.Set("Access-Control-Allow-Origin", "*")
	h.Set("Access-Control-Allow-Methods", methods)
	h.Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Mcp-Protocol-Version, Mcp-Session-Id, Last-Event-ID")
	h.Set("Access-Control-Expose-Headers", "WWW-Authenticate, Mcp-Session-Id")
	h.Set("Access-Control-Max-Age", "600")
}

// protect authenticates a request to the MCP endpoint and prepares it for the upstream.
func (b *Broker) protect(w http.ResponseWriter, r *http.Request) (*http.Request, *idp.Principal) {
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
		// A CORS preflight carries no credentials; browser MCP clients need its answer.
		allowCORS(w, "GET, POST, DELETE, OPTIONS")
		w.WriteHeader(http.StatusNoContent)
		return nil, nil
	}
	if r.URL.Query().Has("access_token") {
		writeError(w, http.StatusBadRequest, "invalid_request", "access tokens are accepted only in the Authorization header")
		return nil, nil
	}
	raw, ok := bearerToken(r)
	if !ok {
		b.challenge(w, "", "a bearer token is required")
		return nil, nil
	}
	who, err := b.verifyAccessToken(r.Context(), raw)
	switch later := idp.AsRetryLater(err); {
	case later != nil:
		// Turned away before reaching the IdP: no verdict on the token, so never 401.
		b.logger.Debug("token verification deferred", zap.String("token", Fingerprint(raw)), zap.Error(err))
		setRetryAfter(w, later.RetryAfter)
		writeError(w, later.Status, "temporarily_unavailable", "too many new tokens to verify; retry later")
		return nil, nil
	case errors.Is(err, idp.ErrUnavailable):
		b.logger.Warn("token verification unavailable", zap.Error(err))
		w.Header().Set("Retry-After", "5")
		writeError(w, http.StatusServiceUnavailable, "temporarily_unavailable", "the identity provider cannot be reached; try again shortly")
		return nil, nil
	case err != nil:
		b.logger.Debug("token refused", zap.String("token", Fingerprint(raw)), zap.Error(err))
		b.challenge(w, "invalid_token", "the access token is invalid or expired")
		return nil, nil
	}

	need, tools, refused := b.requiredScopes(w, r)
	if refused != nil {
		writeRefusal(w, refused)
		return nil, nil
	}
	if len(need) > 0 && !who.HasScopes(need) {
		b.insufficientScope(w, who, need)
		return nil, nil
	}
	if len(tools) > 0 && !b.checkProvisioning(w, r, who, tools) {
		return nil, nil
	}

	// The request is ours to change, as in any handler chain: no copy on the hot path.
	stripClientIdentity(r.Header, b.cfg.SubjectHeader)
	// Caddy's reverse_proxy forwards request trailers, whose values arrive after the body
	// and so after any stripping; an upstream merging them into its headers would read
	// identity headers the client sent. MCP uses none: none is forwarded.
	r.Trailer = nil
	if !b.delegateInto(w, r, who, raw, need) {
		return nil, nil
	}
	return r, who
}

// verifyAccessToken checks a token presented to the MCP endpoint: one the broker issued
// in hybrid mode, one the IdP issued in progressive mode.
func (b *Broker) verifyAccessToken(ctx context.Context, raw string) (*idp.Principal, error) {
	if b.cfg.Mode == ModeHybrid {
		return b.verifyBrokerToken(ctx, raw)
	}
	return b.verifier.Verify(ctx, raw)
}

// bearerToken reads the token of an `Authorization: Bearer` header, the only place an
// access token is accepted.
func bearerToken(r *http.Request) (string, bool) {
	h := r.Header.Get("Authorization")
	if len(h) < 8 || !strings.EqualFold(h[:7], "Bearer ") {
		return "", false
	}
	t := strings.TrimSpace(h[7:])
	return t, t != ""
}

// challenge answers 401 with the RFC 9728 / RFC 6750 challenge that starts discovery.
func (b *Broker) challenge(w http.ResponseWriter, code, description string) {
	v := "Bearer " + b.challengeTail
	if code != "" {
		v += `, error="` + code + `"`
	}
	w.Header().Set("WWW-Authenticate", v)
	allowCORS(w, "GET, POST, DELETE, OPTIONS")
	if code == "" {
		code = "invalid_token"
	}
	writeError(w, http.StatusUnauthorized, code, description)
}

// insufficientScope answers 403 for step-up: the scope named is what the client holds
// plus what the call needs, so re-authorizing with it loses nothing.
func (b *Broker) insufficientScope(w http.ResponseWriter, who *idp.Principal, need []string) {
	scopes := advertisedScopes(who.Scopes)
	for _, n := range need {
		if !who.HasScopes([]string{n}) {
			scopes = append(scopes, n)
		}
	}
	w.Header().Set("WWW-Authenticate", `Bearer error="insufficient_scope", scope="`+strings.Join(scopes, " ")+
		`", resource_metadata="`+b.metadataURL+`"`)
	allowCORS(w, "GET, POST, DELETE, OPTIONS")
	writeError(w, http.StatusForbidden, "insufficient_scope", "the access token lacks a scope this call needs")
}
