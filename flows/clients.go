package flows

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/internal/ratelimit"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Token endpoint authentication methods (RFC 7591 §2).
const (
	AuthMethodNone  = "none"
	AuthMethodBasic = "client_secret_basic"
	AuthMethodPost  = "client_secret_post"
	// AuthMethodPrivateKeyJWT: RFC 7523 client assertions signed with the client's keys;
	// metadata document clients only (client_assertion.go).
	AuthMethodPrivateKeyJWT = "private_key_jwt"
)

// Where a client comes from.
const (
	ClientSourceConfig           = "config"            // the Caddy configuration
	ClientSourceRegistered       = "registered"        // RFC 7591 dynamic registration
	ClientSourceMetadataDocument = "metadata_document" // an https client_id (CIMD)
)

// Grant types an MCP client may use at the broker's token endpoint.
const (
	grantAuthorizationCode = "authorization_code"
	grantRefreshToken      = "refresh_token"
)

// defaultGrantTypes are the grants of config and CIMD clients, and of registrations
// that name none (see serveRegister for why refresh_token is included).
var defaultGrantTypes = []string{grantAuthorizationCode, grantRefreshToken}

// ErrMetadataDocumentsOff: the client id is an https URL, and this broker takes no
// Client ID Metadata Documents. It wraps ErrUnknownClient.
var ErrMetadataDocumentsOff = fmt.Errorf("%w: client metadata documents are turned off", ErrUnknownClient)

// maxClientIDLen bounds a client_id before it is hashed or fetched.
const maxClientIDLen = 2048

// Client is an MCP client the broker knows. A *Client returned by findClient may be
// shared with other requests: read it, never change it.
type Client struct {
	ID           string
	Name         string
	RedirectURIs []string
	// Scopes the client may ask for (`openid` is always allowed besides).
	Scopes []string
	// offered: Scopes were not set for this client, which may ask for every scope the
	// broker offers at the moment, learned ones included (Broker.scopesOf).
	offered bool
	// AuthMethod is how the client authenticates at the token and revocation endpoints:
	// AuthMethodNone (public), AuthMethodBasic or AuthMethodPost.
	AuthMethod string
	// GrantTypes the client may use at the token endpoint.
	GrantTypes []string
	// Source tells where the client comes from: ClientSourceConfig, ClientSourceRegistered
	// or ClientSourceMetadataDocument.
	Source string

	// renewedAt is when a registered client's lifetime was last renewed (zero: never
	// used); see renewRegistration.
	renewedAt time.Time

	// secretHash is storage.Hash of the client secret; empty for public clients.
	secretHash string

	// ApplicationType is the client's OpenID Connect application_type (web or native),
	// "" when it named none or an unknown one; it widens the redirect URIs a native client
	// may use (redirecturi.go) and decides nothing else.
	ApplicationType string

	// keys verify a private_key_jwt client's assertions when its document carries them
	// (jwks); jwksURI names them otherwise.
	keys    *jose.JSONWebKeySet
	jwksURI string
}

// allowsGrantType tells whether the client registered grant type gt.
func (c *Client) allowsGrantType(gt string) bool {
	for _, g := range c.GrantTypes {
		if g == gt {
			return true
		}
	}
	return false
}

// clientRegistry finds clients by id: the clients of the configuration, and the state
// behind registered and metadata-document clients (registration rate limit, document
// cache).
type clientRegistry struct {
	static        map[string]*Client
	defaultScopes []string

	registrations *ratelimit.Limiter // per client address
	// allRegistrations is one bucket for every address together.
	allRegistrations *ratelimit.Limiter
	documents        *metadataDocuments
	// registered are the registered clients read from storage lately (registeredClient).
	registered *registrationCache
}

func newClientRegistry(cfg []ClientConfig, defaultScopes []string, jwtBearer bool) (*clientRegistry, error) {
	reg := &clientRegistry{
		static:           make(map[string]*Client, len(cfg)),
		defaultScopes:    defaultScopes,
		registrations:    ratelimit.New(ratelimit.MaxAddresses),
		allRegistrations: ratelimit.New(1),
		documents:        newMetadataDocuments(maxCachedDocuments),
		registered:       newRegistrationCache(maxCachedRegistrations),
	}
	for _, c := range cfg {
		method, err := CheckClientSecret(c.AuthMethod, c.Secret)
		if err != nil {
			return nil, fmt.Errorf("clients %q: %w", c.ClientID, err)
		}
		cl := &Client{
			ID:           c.ClientID,
			Name:         c.Name,
			RedirectURIs: c.RedirectURIs,
			Scopes:       c.Scopes,
			AuthMethod:   method,
			GrantTypes:   defaultGrantTypes,
			Source:       ClientSourceConfig,
		}
		if c.Secret != "" {
			cl.secretHash = hashSecret(c.Secret)
			if jwtBearer {
				// An admin who gave the client a secret pre-registered it as confidential,
				// which is what the JWT bearer grant for ID-JAGs asks (token_jwt_bearer.go).
				cl.GrantTypes = append(slices.Clone(defaultGrantTypes), grantJWTBearer)
			}
		}
		if cl.Name == "" {
			cl.Name = cl.ID
		}
		if len(cl.Scopes) == 0 {
			cl.Scopes, cl.offered = defaultScopes, true
		}
		reg.static[c.ClientID] = cl
	}
	return reg, nil
}

// MinClientSecretBytes is the shortest secret a configured client may have: as long as
// the 32 random bytes the broker issues to registered clients. The secret is kept as a
// plain SHA-256 (hashSecret), which only a secret too long to guess may be (RFC 6749
// §10.10).
const MinClientSecretBytes = 32

// CheckClientSecret checks a configured client's token endpoint authentication method
// against its secret and returns the method in effect: client_secret_basic or
// client_secret_post with a secret (basic when method is empty), none without. The
// error never holds the secret.
func CheckClientSecret(method, secret string) (string, error) {
	if secret == "" {
		switch method {
		case "", AuthMethodNone:
			return AuthMethodNone, nil
		case AuthMethodBasic, AuthMethodPost:
			return "", fmt.Errorf("token_endpoint_auth_method: %s needs a secret; set secret, or remove token_endpoint_auth_method for a public client", method)
		}
		return "", fmt.Errorf("token_endpoint_auth_method: want none, client_secret_basic or client_secret_post, got %q", method)
	}
	switch method {
	case "":
		method = AuthMethodBasic
	case AuthMethodBasic, AuthMethodPost:
	case AuthMethodNone:
		return "", errors.New("secret: set on a public client (token_endpoint_auth_method none); remove one of them")
	default:
		return "", fmt.Errorf("token_endpoint_auth_method: want client_secret_basic or client_secret_post, got %q", method)
	}
	if len(secret) < MinClientSecretBytes {
		return "", fmt.Errorf("secret: want at least %d bytes, got %d; generate one with `openssl rand -hex 32`", MinClientSecretBytes, len(secret))
	}
	return method, nil
}

// lookup returns the configured client with id, or nil. Progressive mode knows only
// these.
func (c *clientRegistry) lookup(id string) *Client {
	return c.static[id]
}

// ErrUnknownClient means no client has the id asked for, or its metadata document
// could not be fetched or was refused.
var ErrUnknownClient = errors.New("unknown client")

// findClient finds a client of hybrid mode by id: configured, registered (RFC 7591), or
// a Client ID Metadata Document URL. It returns an error wrapping ErrUnknownClient when
// there is none; any other error is the broker's own (storage) and deserves a 500.
func (b *Broker) findClient(ctx context.Context, id string) (*Client, error) {
	if id == "" || len(id) > maxClientIDLen {
		return nil, ErrUnknownClient
	}
	if c := b.clients.lookup(id); c != nil {
		return c, nil
	}
	// Registered ids are random tokens, never URLs: an https id can only be a document.
	if strings.HasPrefix(id, "https://") {
		if b.cfg.DisableClientMetadataDocuments {
			return nil, ErrMetadataDocumentsOff
		}
		return b.metadataDocumentClient(ctx, id)
	}
	return b.registeredClient(ctx, id)
}

// registeredClient finds a dynamically registered client: from memory when this node read
// its registration less than registrationCacheTTL ago, else from storage. A login asks for
// its client at three steps (authorize, the consent page, the token endpoint), each of
// which would otherwise read and decode the registration again.
func (b *Broker) registeredClient(ctx context.Context, id string) (*Client, error) {
	cache := b.clients.registered
	now := b.now()
	c, gen := cache.get(id, now)
	if c != nil {
		return c, nil
	}
	rec, expires, err := b.registrations.loadExpiring(ctx, id)
	if err != nil {
		if errors.Is(err, storage.ErrNotFound) {
			return nil, ErrUnknownClient
		}
		return nil, storageFailed("loading registered client", err)
	}
	c = clientFromRegistration(rec, b.clients.defaultScopes)
	// Never beyond the record's own expiry: an expired registration is unknown at once.
	if until := now.Add(registrationCacheTTL); until.Before(expires) {
		expires = until
	}
	cache.put(id, c, expires, now, gen)
	return c, nil
}

const (
	// registrationCacheTTL is how long a node keeps a registered client it read from
	// storage: the bound within which a registration deleted on another node sharing the
	// storage stops being served here (the node that deletes it forgets it at once). The
	// same 30 s as a broker token's revocation reaching the other nodes.
	registrationCacheTTL = 30 * time.Second
	// maxCachedRegistrations bounds that memory: anyone may register clients. A full
	// cache drops the entry closest to expiry, which costs a storage read, nothing more.
	maxCachedRegistrations = 1000
)

// registrationCache holds registered clients by id, each until registrationCacheTTL
// after it was read or its record's expiry, whichever comes first (expiringMap, as
// metadata documents are held).
type registrationCache struct {
	mu      sync.Mutex
	entries expiringMap[*Client]
	// gen counts the forgets: a client read from storage while one happened may be
	// the one forgotten, and is not kept.
	gen uint64
}

func newRegistrationCache(max int) *registrationCache {
	return &registrationCache{entries: newExpiringMap[*Client](max)}
}

// get returns the client id if held and still good at now, and the count of forgets so
// far, to pass to put after a miss.
func (rc *registrationCache) get(id string, now time.Time) (*Client, uint64) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	c, _ := rc.entries.get(id, now)
	return c, rc.gen
}

// put keeps c until expires, unless a forget came after generation gen was read.
func (rc *registrationCache) put(id string, c *Client, expires, now time.Time, gen uint64) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.gen != gen {
		return
	}
	rc.entries.put(id, c, expires, now)
}

// forget drops the client id, and any read of a registration under way.
func (rc *registrationCache) forget(id string) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.gen++
	rc.entries.forget(id)
}

func (rc *registrationCache) len() int {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.entries.len()
}

const (
	// unusedRegistrationTTL is how long a registration lives until a login renews it.
	// Anyone may register: what nobody uses must not stay for a month (SECURITY.md).
	unusedRegistrationTTL = 24 * time.Hour
	// registrationRenewInterval: a registration in use is rewritten at most this often,
	// and stored for this much longer than its lifetime, so that right after any use it
	// still has a whole lifetime to live.
	registrationRenewInterval = time.Hour
)

// renewRegistration gives a registered client that has just redeemed a code or refreshed
// a whole registrationLifetime again. It writes at most once per
// registrationRenewInterval per client; failures are logged, the grant stands.
func (b *Broker) renewRegistration(ctx context.Context, c *Client) {
	now := b.now()
	if c.Source != ClientSourceRegistered || (!c.renewedAt.IsZero() && now.Sub(c.renewedAt) < registrationRenewInterval) {
		return
	}
	if err := b.registrations.renew(ctx, c.ID, now); err != nil {
		b.log.register.Warn("renewing client registration", zap.String("client_id", c.ID), zap.Error(err))
	}
	// The copy in memory still has the old renewal time; the next login reads the new one.
	b.clients.registered.forget(c.ID)
}

// registrationLifetime is how long a registration lives after its last login or refresh:
// the longer of the session and refresh token lifetimes. Nextcloud's own DCR clients
// expire after an hour and break logins; ours outlive every token issued to them.
func (b *Broker) registrationLifetime() time.Duration {
	return max(b.cfg.SessionTTL, b.cfg.RefreshTokenTTL)
}

// clientFromRegistration makes a registered client. Its registered `scope` does not limit
// what it may ask for later: MCP clients register with the scope of their first challenge
// and must still be able to step up (the user consents to every new scope on the consent
// page, and RFC 7591 lets the server decide).
func clientFromRegistration(rec *RegisteredClient, defaultScopes []string) *Client {
	c := &Client{
		ID:           rec.ClientID,
		Name:         rec.ClientName,
		RedirectURIs: rec.RedirectURIs,
		Scopes:       defaultScopes,
		offered:      true,
		AuthMethod:   rec.TokenEndpointAuthMethod,
		GrantTypes:   rec.GrantTypes,
		Source:       ClientSourceRegistered,
		renewedAt:    rec.RenewedAt,
		secretHash:   rec.ClientSecretHash,

		ApplicationType: rec.ApplicationType,
	}
	if c.Name == "" {
		c.Name = c.ID
	}
	return c
}

// errClientAuth means the client's credentials were missing or wrong.
var errClientAuth = errors.New("client authentication failed")

// errClientAuthMultiple means the client sent credentials both in the Authorization
// header and in the body (RFC 6749 §2.3: one method per request). It comes wrapped
// together with errClientAuth; a caller may answer invalid_request for it.
var errClientAuthMultiple = errors.New("client credentials sent by more than one method")

// authenticateClient identifies the client of a token or revocation request by the
// method it registered (none, client_secret_basic, client_secret_post, or for metadata
// document clients private_key_jwt, client_assertion.go). form is the
// parsed request body. It returns an error wrapping ErrUnknownClient, or wrapping
// errClientAuth when authentication fails (also errClientAuthMultiple when the client
// used two methods at once), or another error when storage failed.
//
// Public clients (method none) must not send a secret at all: a public client holding
// a secret is misconfigured, and refusing says so instead of silently ignoring it.
func (b *Broker) authenticateClient(r *http.Request, form url.Values) (*Client, error) {
	basicUser, basicSecret, hasBasic := r.BasicAuth()
	if hasBasic {
		// RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
		var err1, err2 error
		basicUser, err1 = url.QueryUnescape(basicUser)
		basicSecret, err2 = url.QueryUnescape(basicSecret)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("decoding basic credentials: %w", errClientAuth)
		}
	}
	formID, formSecret := form.Get("client_id"), form.Get("client_secret")
	assertionType, assertion := form.Get("client_assertion_type"), form.Get("client_assertion")
	hasAssertion := assertionType != "" || assertion != ""

	id := formID
	switch {
	case hasAssertion && (hasBasic || formSecret != ""):
		return nil, fmt.Errorf("%w: %w", errClientAuth, errClientAuthMultiple)
	case hasAssertion:
		return b.assertedClient(r.Context(), formID, assertionType, assertion)
	case hasBasic && formSecret != "":
		return nil, fmt.Errorf("%w: %w", errClientAuth, errClientAuthMultiple)
	case hasBasic && formID != "" && formID != basicUser:
		return nil, fmt.Errorf("client_id differs from the basic credentials: %w", errClientAuth)
	case hasBasic:
		id = basicUser
	}
	if id == "" {
		return nil, fmt.Errorf("no client_id: %w", errClientAuth)
	}
	c, err := b.findClient(r.Context(), id)
	if err != nil {
		return nil, err
	}

	switch c.AuthMethod {
	case AuthMethodNone:
		if basicSecret != "" || formSecret != "" {
			return nil, fmt.Errorf("public client sent a secret: %w", errClientAuth)
		}
		return c, nil
	case AuthMethodBasic:
		if !hasBasic {
			return nil, fmt.Errorf("client_secret_basic client sent no basic credentials: %w", errClientAuth)
		}
		return c.withSecret(basicSecret, b.constantTimeCompare)
	case AuthMethodPost:
		if hasBasic || formSecret == "" {
			return nil, fmt.Errorf("client_secret_post client sent no client_secret: %w", errClientAuth)
		}
		return c.withSecret(formSecret, b.constantTimeCompare)
	case AuthMethodPrivateKeyJWT:
		return nil, assertionRefusal("this client must authenticate with a client_assertion (private_key_jwt)")
	}
	return nil, fmt.Errorf("client has unsupported auth method: %w", errClientAuth)
}

// withSecret returns c when the hash of the presented secret equals the stored one,
// compared in constant time by compare (crypto/subtle.ConstantTimeCompare).
func (c *Client) withSecret(presented string, compare func(x, y []byte) int) (*Client, error) {
	if c.secretHash == "" || presented == "" ||
		compare([]byte(hashSecret(presented)), []byte(c.secretHash)) != 1 {
		return nil, fmt.Errorf("wrong client secret: %w", errClientAuth)
	}
	return c, nil
}

// hashSecret is what the broker stores of a client secret: its SHA-256, base64url. The
// secret is 256 random bits (registered clients) or at least MinClientSecretBytes long
// (configured ones), so a plain hash is enough.
func hashSecret(secret string) string { return storage.Hash(secret) }
