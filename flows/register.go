package flows

import (
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"slices"
	"strings"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/ratelimit"
)

// Bounds of a registration request. Anyone may register, and a registration is kept, so
// these bound what a stranger can make the broker store (SECURITY.md).
const (
	maxRegistrationBytes  = 64 << 10
	maxRedirectURIs       = 5
	maxRedirectURILen     = 512
	maxClientNameRunes    = 100
	maxRegistrationScopes = 50
	// maxRegisteredClientBytes bounds the JSON of the stored RegisteredClient; with the
	// storage envelope around it (under 128 bytes) a record is at most 4 KiB on disk.
	// The caps above keep a plain registration well under it; JSON escaping (& < > are
	// six bytes each) can still push one over, and that one is refused.
	maxRegisteredClientBytes = 4<<10 - 128
)

// clientMetadata is the RFC 7591 §2 metadata the broker registers and echoes back.
// Other fields in a request are ignored (RFC 7591 §2: the server may ignore metadata
// it does not understand) and not stored.
type clientMetadata struct {
	RedirectURIs            []string `json:"redirect_uris"`
	TokenEndpointAuthMethod string   `json:"token_endpoint_auth_method"`
	GrantTypes              []string `json:"grant_types"`
	ResponseTypes           []string `json:"response_types"`
	ClientName              string   `json:"client_name,omitempty"`
	Scope                   string   `json:"scope,omitempty"`
	// ApplicationType is OpenID Connect's application_type (web or native). It only
	// widens a native client's redirect URIs to private-use schemes; an unknown value is
	// dropped (RFC 7591 §2: the server may replace what it does not accept), so the
	// response then names none.
	ApplicationType string `json:"application_type,omitempty"`
}

// clientInformation is the RFC 7591 §3.2.1 response.
type clientInformation struct {
	ClientID              string `json:"client_id"`
	ClientSecret          string `json:"client_secret,omitempty"`
	ClientIDIssuedAt      int64  `json:"client_id_issued_at"`
	ClientSecretExpiresAt *int64 `json:"client_secret_expires_at,omitempty"`
	clientMetadata
}

// serveRegister is RFC 7591 dynamic client registration at /oauth/register.
//
// Choices where the RFC leaves room:
//   - Registration switched off (Config.Registration false) answers 403 access_denied:
//     the endpoint exists, the server refuses; 404 would read as a wrong URL.
//   - grant_types defaults to [authorization_code, refresh_token], not the RFC's
//     [authorization_code]: MCP clients rarely send it and all of them refresh.
//   - token_endpoint_auth_method defaults to client_secret_basic as the RFC says; most
//     MCP clients send none and get a public client.
//   - scope, when sent, may only name configured scopes (which may include
//     offline_access, though it is not advertised); otherwise the client may ask for
//     all configured scopes.
//   - A registration nobody logs in with lives unusedRegistrationTTL (a day). A login
//     (code redemption) or a refresh renews it to registrationLifetime (the longer of the
//     session and refresh token lifetimes), so it outlives what was issued to it. Only
//     these renew it: a stranger can run /oauth/authorize with the client, but cannot
//     redeem a code without a user logging in at the IdP.
//   - One client address (Caddy's client_ip, per its trusted proxies; an IPv6 /56) may
//     register Config.RegistrationRate clients a minute, and all addresses together
//     Config.RegistrationRateTotal; past that 429 with Retry-After.
//   - Wrong Content-Type: 415; a body over 64 KiB: 413; both invalid_client_metadata.
//   - application_type (OpenID Connect Registration §2, which MCP 2026-07-28 asks
//     clients to send) is stored and echoed, and refuses nothing: native adds private-use
//     URI schemes to the redirect URIs accepted; web and none keep https and loopback
//     http, which today's clients register without a type (OIDC's web rules would refuse
//     loopback); an unknown value is dropped.
func (b *Broker) serveRegister(w http.ResponseWriter, r *http.Request) {
	allowCORS(w, "POST, OPTIONS")
	if r.Method == http.MethodOptions {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	resp, err := b.register(w, r)
	if err != nil {
		b.count(RegistrationRefused)
		b.writeError(w, r, err)
		return
	}
	b.count(RegistrationAccepted)
	writeJSON(w, http.StatusCreated, resp)
}

// register reads, checks and stores a registration request.
func (b *Broker) register(w http.ResponseWriter, r *http.Request) (clientInformation, error) {
	if r.Method != http.MethodPost {
		return clientInformation{}, errMethodNotAllowed("POST, OPTIONS")
	}
	if !b.cfg.Registration {
		return clientInformation{}, newRequestError(http.StatusForbidden, "access_denied", "dynamic client registration is disabled")
	}
	ip := clientIP(r)
	if ok, wait := b.clients.registrations.Allow(ratelimit.Key(ip), b.cfg.RegistrationRate, b.now()); !ok {
		return clientInformation{}, errTooManyRequests(wait, "too many registrations from this address; retry later")
	}
	if ok, wait := b.clients.allRegistrations.Allow("", b.cfg.RegistrationRateTotal, b.now()); !ok {
		return clientInformation{}, errTooManyRequests(wait, "too many registrations; retry later")
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return clientInformation{}, newRequestError(http.StatusUnsupportedMediaType, "invalid_client_metadata", "content type must be application/json")
	}

	var req clientMetadata
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRegistrationBytes))
	err := dec.Decode(&req)
	if err == nil {
		if _, extra := dec.Token(); extra != io.EOF {
			err = errors.New("data after the JSON object")
		}
	}
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return clientInformation{}, newRequestError(http.StatusRequestEntityTooLarge, "invalid_client_metadata", "registration request is larger than 64 KiB")
		}
		return clientInformation{}, errClientMetadata("registration request must be a JSON object of client metadata")
	}
	if err := b.checkClientMetadata(&req); err != nil {
		return clientInformation{}, err
	}

	now := b.now()
	rec := RegisteredClient{
		ClientID:                randomToken(),
		ClientName:              req.ClientName,
		RedirectURIs:            req.RedirectURIs,
		GrantTypes:              req.GrantTypes,
		ResponseTypes:           req.ResponseTypes,
		TokenEndpointAuthMethod: req.TokenEndpointAuthMethod,
		ApplicationType:         req.ApplicationType,
		IssuedAt:                now,
	}
	resp := clientInformation{ClientID: rec.ClientID, ClientIDIssuedAt: now.Unix(), clientMetadata: req}
	if req.TokenEndpointAuthMethod != AuthMethodNone {
		secret := randomToken()
		rec.ClientSecretHash = hashSecret(secret)
		resp.ClientSecret = secret
		var never int64
		resp.ClientSecretExpiresAt = &never
	}
	if stored, err := json.Marshal(&rec); err != nil || len(stored) > maxRegisteredClientBytes {
		return clientInformation{}, errClientMetadata("the client metadata is too large to register")
	}
	if err := b.registrations.register(r.Context(), &rec); err != nil {
		return clientInformation{}, errStorage("storing registered client", err)
	}
	b.log.register.Info("client registered",
		zap.String("client_id", rec.ClientID),
		zap.String("client_name", rec.ClientName),
		zap.String("token_endpoint_auth_method", rec.TokenEndpointAuthMethod),
		zap.String("client_ip", ip))
	b.audit(auditClientRegistered, ip, zap.String("client_id", rec.ClientID),
		zap.String("token_endpoint_auth_method", rec.TokenEndpointAuthMethod))
	return resp, nil
}

// errClientMetadata is 400 invalid_client_metadata (RFC 7591 §3.2.2).
func errClientMetadata(description string) *requestError {
	return newRequestError(http.StatusBadRequest, "invalid_client_metadata", description)
}

// errRedirectURIMetadata is 400 invalid_redirect_uri (RFC 7591 §3.2.2).
func errRedirectURIMetadata(description string) *requestError {
	return newRequestError(http.StatusBadRequest, "invalid_redirect_uri", description)
}

// checkClientMetadata validates md and fills in the defaults. It refuses md with the RFC
// 7591 §3.2.2 error and a fixed description.
func (b *Broker) checkClientMetadata(md *clientMetadata) error {
	md.ApplicationType = knownApplicationType(md.ApplicationType)
	switch {
	case len(md.RedirectURIs) == 0:
		return errRedirectURIMetadata("redirect_uris is required")
	case len(md.RedirectURIs) > maxRedirectURIs:
		return errRedirectURIMetadata("too many redirect_uris")
	}
	for _, u := range md.RedirectURIs {
		if len(u) > maxRedirectURILen {
			return errRedirectURIMetadata("redirect_uri is too long")
		}
		if err := checkRedirectURIFor(md.ApplicationType, u); err != nil {
			return errRedirectURIMetadata(err.Error()) // fixed texts, never the URI
		}
	}

	if len(md.GrantTypes) == 0 {
		md.GrantTypes = defaultGrantTypes
	}
	hasCode := false
	jwtBearer := len(b.enterprise) > 0 // the JWT bearer grant is offered
	for _, g := range md.GrantTypes {
		switch g {
		case grantAuthorizationCode:
			hasCode = true
		case grantRefreshToken:
		case grantJWTBearer:
			if !jwtBearer {
				return errClientMetadata("grant_types may only be authorization_code and refresh_token")
			}
		default:
			if jwtBearer {
				return errClientMetadata("grant_types may only be authorization_code, refresh_token and " + grantJWTBearer)
			}
			return errClientMetadata("grant_types may only be authorization_code and refresh_token")
		}
	}
	if !hasCode {
		return errClientMetadata("grant_types must include authorization_code")
	}
	if len(md.ResponseTypes) == 0 {
		md.ResponseTypes = []string{"code"}
	}
	for _, rt := range md.ResponseTypes {
		if rt != "code" {
			return errClientMetadata("response_types may only be code")
		}
	}
	// Repeats mean nothing and would be stored: drop them (each list now holds known
	// values only, so this is cheap).
	md.GrantTypes = uniqueStrings(md.GrantTypes)
	md.ResponseTypes = uniqueStrings(md.ResponseTypes)

	switch md.TokenEndpointAuthMethod {
	case "":
		md.TokenEndpointAuthMethod = AuthMethodBasic
	case AuthMethodNone, AuthMethodBasic, AuthMethodPost:
	default:
		return errClientMetadata("token_endpoint_auth_method must be none, client_secret_basic or client_secret_post")
	}
	if md.TokenEndpointAuthMethod == AuthMethodNone && slices.Contains(md.GrantTypes, grantJWTBearer) {
		return errClientMetadata(grantJWTBearer + " is for confidential clients: token_endpoint_auth_method must not be none")
	}

	if utf8.RuneCountInString(md.ClientName) > maxClientNameRunes {
		return errClientMetadata("client_name is longer than 100 characters")
	}
	if err := CheckClientName(md.ClientName); err != nil {
		return errClientMetadata(err.Error())
	}

	scopes := strings.Fields(md.Scope)
	if len(scopes) > maxRegistrationScopes {
		return errClientMetadata("scope names too many scopes")
	}
	known := idp.Principal{Scopes: append([]string{"openid"}, b.offer().scopes...)}
	for _, s := range scopes {
		if !known.HasScopes([]string{s}) {
			return errClientMetadata("scope names a scope this server does not offer")
		}
	}
	md.Scope = strings.Join(uniqueStrings(scopes), " ")
	return nil
}

// uniqueStrings is ss without repeats, in order of first appearance.
func uniqueStrings(ss []string) []string {
	out := make([]string, 0, len(ss))
	for _, s := range ss {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}
