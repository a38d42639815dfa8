package flows

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/ratelimit"
	"github.com/caddy-mcp/oauth-broker/internal/tokencache"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Modes of the broker.
const (
	ModeHybrid      = "hybrid"
	ModeProgressive = "progressive"
)

// Delegation modes.
const (
	DelegationTokenExchange = "token_exchange"
	DelegationRefresh       = "refresh"
	DelegationNone          = "none"
)

// Which calls delegation narrows (Config.DelegationNarrow).
const (
	// DelegationNarrowToolCalls narrows a tools/call to its tool_scope scopes; other calls
	// get the client's whole grant, or delegation.scopes where configured.
	DelegationNarrowToolCalls = "tool_calls"
	// DelegationNarrowNone gives every call the client's whole grant.
	DelegationNarrowNone = "none"
)

// Config is everything the broker needs, in plain Go types. Zero values take the
// documented defaults in New.
type Config struct {
	Mode         string
	Issuer       string
	PublicIssuer string
	ClientID     string
	ClientSecret string
	Resource     string
	Audience     []string
	Scopes       []string
	// BaseScopes, when set, are the least-privilege scopes a first login is pointed to:
	// the 401 challenge's `scope`, the protected-resource metadata's `scopes_supported`
	// (MCP 2026-07-28 reads it as the minimal set for basic functionality), and what an
	// authorization request without `scope` is granted; a tool call needing more is a 403
	// step-up. Unset, all of Scopes (with the learned ones) are named there. Default: none.
	BaseScopes []string
	// RequireJWTAccessTokenType and IntrospectionCacheTTL are the idp.VerifierConfig fields
	// of the same names.
	RequireJWTAccessTokenType bool
	IntrospectionCacheTTL     time.Duration

	Clients      []ClientConfig
	Registration bool

	DelegationMode     string
	DelegationAudience string
	// DelegationScopes, when set, are delegated to calls no tool_scope rule covers;
	// unset, those calls get the client's whole grant.
	DelegationScopes []string
	// DelegationNarrow is which calls delegation narrows: DelegationNarrowToolCalls (to
	// their tool_scope scopes) or DelegationNarrowNone (every call gets the client's whole
	// grant). Default: DelegationNarrowToolCalls.
	DelegationNarrow string
	SubjectHeader    string
	// AppPassword configures DelegationAppPassword (delegation_app_password.go).
	AppPassword AppPasswordConfig

	ToolScopes   []ToolScopeRule
	MaxBodyBytes int64
	// UpstreamMetadata is the URL of the upstream's RFC 9728 protected-resource metadata,
	// whose scopes_supported join Scopes once read (upstream_scopes.go). Default: none.
	UpstreamMetadata string

	SessionTTL      time.Duration
	CodeTTL         time.Duration
	AccessTokenTTL  time.Duration
	RefreshTokenTTL time.Duration
	IdPTimeout      time.Duration
	// RefreshGrace is how long a rotated refresh token still yields its successor pair.
	RefreshGrace time.Duration
	// SessionMaxLifetime is how long a session lives at most, however often it is
	// refreshed: then the user logs in again.
	SessionMaxLifetime time.Duration
	// IdPConfirmInterval is how often, at most, a broker refresh goes without asking the
	// IdP whether the session's grant is still alive.
	IdPConfirmInterval time.Duration
	// CIMDAllowPrivate lets client metadata documents live on loopback and private
	// addresses (tests, labs); off in production.
	CIMDAllowPrivate bool
	// DisableClientMetadataDocuments refuses https client ids (Client ID Metadata
	// Documents) and stops advertising them; by default they are accepted.
	DisableClientMetadataDocuments bool
	// RegistrationRate is how many registrations one client IP may make per minute.
	RegistrationRate int
	// RegistrationRateTotal is how many registrations all clients together may make per
	// minute: with RegistrationRate and the registration record cap it bounds how fast
	// strangers can fill storage.
	RegistrationRateTotal int
	// ColdVerifyRate and ColdVerifyRateGlobal bound the token verifications that reach
	// the IdP, a minute, per client address and for all (idp.VerifierConfig).
	ColdVerifyRate, ColdVerifyRateGlobal int
	// ClientIP finds the client's address in a request's context as the server in front
	// resolved it, for limits checked on paths that NeedsClientIP does not name (cold
	// token verification). Default: the address WithClientIP recorded.
	ClientIP ClientIPFunc

	// OfflineAccessScopes are asked of the IdP for offline access (for background
	// jobs), besides openid and offline_access.
	OfflineAccessScopes []string
	// OfflineAccessTools are tool names or globs that need the user's offline access grant.
	OfflineAccessTools []string
	// OfflineAccessCallbackPath is the path of the redirect_uri the broker sends the IdP
	// in an offline access login: OfflineAccessCallbackLegacy, what admins registered at
	// their IdP for earlier releases, or OfflineAccessCallback. Both are always served.
	// Default: OfflineAccessCallbackLegacy.
	OfflineAccessCallbackPath string
	// EnterpriseIssuers are the enterprise identity providers whose Identity Assertion JWT
	// Authorization Grants (ID-JAGs) the token endpoint redeems with the JWT bearer grant
	// (Enterprise-Managed Authorization, token_jwt_bearer.go). Hybrid mode only. Default:
	// none, and the grant is not offered.
	EnterpriseIssuers []EnterpriseIssuer

	// BackgroundClients may fetch background tokens for users who granted offline access.
	BackgroundClients []BackgroundClient
	// BackgroundTokenRate is how many background tokens one background client may ask
	// for per minute (a burst of as many, then an even pace).
	BackgroundTokenRate int

	Records    *storage.Records
	Logger     *zap.Logger
	HTTPClient *http.Client
	// Metrics counts what the broker does (metrics.go). Default: nothing is counted.
	Metrics Metrics
}

// ClientConfig is an MCP client registered in the configuration.
type ClientConfig struct {
	ClientID     string
	Name         string
	RedirectURIs []string
	Scopes       []string
	// Secret makes the client confidential; New keeps only its hash. Default: none
	// (public). See CheckClientSecret.
	Secret string
	// AuthMethod is AuthMethodBasic or AuthMethodPost with a Secret, AuthMethodNone
	// without. Default: AuthMethodBasic with a Secret, AuthMethodNone without.
	AuthMethod string
}

// EnterpriseIssuer is an enterprise identity provider trusted to issue ID-JAGs for this
// broker (token_jwt_bearer.go).
type EnterpriseIssuer struct {
	// Issuer is its issuer identifier, compared exactly with an ID-JAG's `iss`.
	Issuer string
	// JWKSURI is where its signing keys are published.
	JWKSURI string
	// Algorithms are the signature algorithms accepted from it. Default:
	// DefaultEnterpriseAlgorithms.
	Algorithms []string
	// Scopes are the most it may grant: an ID-JAG's scopes beyond them are dropped.
	// Default: every scope the broker offers.
	Scopes []string
	// SubjectPrefix is put before the `sub` of its ID-JAGs to make the broker's subject,
	// so that its users cannot be taken for the IdP's. Required unless Issuer is the IdP's
	// own issuer, whose subjects are the broker's already. Default: none.
	SubjectPrefix string
}

// BackgroundClient is a background worker's credentials.
type BackgroundClient struct {
	ID     string
	Secret string
}

// ToolScopeRule demands Scopes for the tools whose name matches Tool (a path.Match glob).
type ToolScopeRule struct {
	Tool   string
	Scopes []string
}

// Defaults of Config.
var (
	DefaultScopes        = []string{"openid", "profile", "email"}
	DefaultSubjectHeader = "X-Auth-Subject"
)

// Defaults of Config, applied by New to zero fields and by the Caddy module's Provision.
const (
	DefaultMaxBodyBytes     = 1 << 20
	DefaultIdPTimeout       = 10 * time.Second
	DefaultSessionTTL       = 30 * 24 * time.Hour
	DefaultCodeTTL          = 60 * time.Second
	DefaultAccessTokenTTL   = time.Hour
	DefaultRefreshTokenTTL  = 30 * 24 * time.Hour
	DefaultRefreshGrace     = 60 * time.Second
	DefaultRegistrationRate = 10
	// DefaultRegistrationRateTotal: 30 a minute is 43,200 registrations a day, at most
	// 4 KiB each (see maxRegisteredClientBytes), and an unused one lives a day.
	DefaultRegistrationRateTotal = 30
	// DefaultSessionMaxLifetime: a month, then a new login.
	DefaultSessionMaxLifetime = 30 * 24 * time.Hour
	// DefaultIdPConfirmInterval bounds how long a grant ended at the IdP (user disabled,
	// grant revoked) keeps a broker session refreshing. Ten minutes is below the shortest
	// default refresh-token idle lifetime we know of (Nextcloud's oidc app: 15 minutes), so
	// a client that refreshes often keeps the IdP's refresh token alive too. It costs at
	// most one IdP call per broker refresh; clients refresh about once per access token.
	DefaultIdPConfirmInterval = 10 * time.Minute
	// DefaultBackgroundTokenRate is BackgroundTokenRate's default.
	DefaultBackgroundTokenRate = 60
)

// Broker answers the broker's endpoints and authenticates protected requests.
type Broker struct {
	cfg      Config
	logger   *zap.Logger
	log      loggers // the named loggers under logger (audit.go)
	metrics  Metrics // nil: nothing counted
	idp      *idp.Provider
	verifier *idp.Verifier
	clients  *clientRegistry

	now func() time.Time
	// constantTimeCompare compares client secret hashes and PKCE challenges (SECURITY.md W3):
	// crypto/subtle's, a field so that a test can count its uses.
	constantTimeCompare func(x, y []byte) int

	// authorizations limits how fast one address starts authorizations.
	authorizations *ratelimit.Limiter
	// oneTimeValues limits how fast one address presents login states and offline access
	// links (see allowOneTimeValue).
	oneTimeValues *ratelimit.Limiter
	// tokenAddresses and tokenClients limit the token and revocation endpoints per client
	// address and per registered client; refreshes limits the refreshes of one grant.
	tokenAddresses, tokenClients, refreshes *ratelimit.Limiter
	// backgroundTokens limits how fast one background client gets background tokens.
	backgroundTokens *ratelimit.Limiter

	// issuer is the broker's own issuer in hybrid mode: the origin of the resource.
	issuer string
	// site names this broker's records among those of other sites on the same storage
	// (store_offline.go).
	site         string
	resourceURL  *url.URL
	resourcePath string // path of the resource, "" for the root
	metadataURL  string // the resource-suffixed RFC 9728 metadata URL
	toolScopes   []ToolScopeRule
	delegation   *delegation // per-request delegation (delegation.go); nil for mode none
	// offered is the scopes the broker offers now: configured, and learned from the
	// upstream's metadata (upstream_scopes.go).
	offered atomic.Pointer[scopeOffer]
	// upstreamClient fetches the upstream's metadata; learnSchedule says when.
	upstreamClient *http.Client
	learnSchedule  learnSchedule
	// appPasswords is delegation mode app_password's state (delegation_app_password.go);
	// nil in the other modes.
	appPasswords *appPasswords

	// The typed record stores (store.go): the only way to storage.Records.
	sessions                  sessionStore
	families                  familyStore
	codes                     codeStore
	consents                  oneTimeStore[ConsentTicket]
	logins                    oneTimeStore[PendingLogin]
	offlineLogins             oneTimeStore[PendingOfflineAccess]
	offlineAccessLinks        linkStore[OfflineAccessLink]
	offlineAccessCurrentLinks offlineAccessCurrentLinkStore
	offline                   offlineAccessGrantStore
	registrations             clientStore
	cookies                   cookieSealer
	requestStates             requestStateTagger
	assertionIDs              assertionIDStore

	// enterprise are the trusted issuers of ID-JAGs by issuer (token_jwt_bearer.go);
	// empty: the JWT bearer grant is not offered.
	enterprise map[string]*enterpriseIssuer

	// brokerTokens caches verified broker-issued access tokens (broker_tokens.go); the
	// zero value is ready.
	brokerTokens tokencache.Cache[[sha256.Size]byte, brokerVerdict]

	// adminScanLimit bounds the admin API's and the gauges' scans (store_admin.go):
	// AdminScanLimit, smaller in tests.
	adminScanLimit int

	// readiness probes the storage and key ring for the health endpoint (health.go).
	readiness readinessProbe
}

// New builds a broker from a validated configuration. It does not touch the network.
func New(cfg Config) (*Broker, error) {
	if cfg.Mode == "" {
		cfg.Mode = ModeHybrid
	}
	if len(cfg.Scopes) == 0 {
		cfg.Scopes = DefaultScopes
	}
	if cfg.SubjectHeader == "" {
		cfg.SubjectHeader = DefaultSubjectHeader
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = DefaultMaxBodyBytes
	}
	setDefault(&cfg.IdPTimeout, DefaultIdPTimeout)
	setDefault(&cfg.SessionTTL, DefaultSessionTTL)
	setDefault(&cfg.CodeTTL, DefaultCodeTTL)
	setDefault(&cfg.AccessTokenTTL, DefaultAccessTokenTTL)
	setDefault(&cfg.RefreshTokenTTL, DefaultRefreshTokenTTL)
	setDefault(&cfg.RefreshGrace, DefaultRefreshGrace)
	setDefault(&cfg.SessionMaxLifetime, DefaultSessionMaxLifetime)
	setDefault(&cfg.IdPConfirmInterval, DefaultIdPConfirmInterval)
	if cfg.RegistrationRate <= 0 {
		cfg.RegistrationRate = DefaultRegistrationRate
	}
	if cfg.RegistrationRateTotal <= 0 {
		cfg.RegistrationRateTotal = DefaultRegistrationRateTotal
	}
	if cfg.BackgroundTokenRate <= 0 {
		cfg.BackgroundTokenRate = DefaultBackgroundTokenRate
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: cfg.IdPTimeout}
	}
	if cfg.Records == nil {
		return nil, errors.New("flows: no storage records")
	}
	switch cfg.OfflineAccessCallbackPath {
	case "":
		cfg.OfflineAccessCallbackPath = OfflineAccessCallbackLegacy
	case OfflineAccessCallbackLegacy, OfflineAccessCallback:
	default:
		return nil, fmt.Errorf("offline_access: callback_path: want %s or %s, got %q",
			OfflineAccessCallback, OfflineAccessCallbackLegacy, cfg.OfflineAccessCallbackPath)
	}
	switch cfg.Mode {
	case ModeProgressive, ModeHybrid:
	default:
		return nil, fmt.Errorf("mode: unknown mode %q; want hybrid or progressive", cfg.Mode)
	}
	switch cfg.DelegationNarrow {
	case "":
		cfg.DelegationNarrow = DelegationNarrowToolCalls
	case DelegationNarrowToolCalls:
	case DelegationNarrowNone:
		if len(cfg.DelegationScopes) > 0 {
			return nil, errors.New("delegation: scopes are never delegated with narrow none, where every call gets the client's whole grant; remove one of them")
		}
	default:
		return nil, fmt.Errorf("delegation: narrow: unknown value %q; want tool_calls or none", cfg.DelegationNarrow)
	}
	var deleg *delegation
	switch cfg.DelegationMode {
	case DelegationNone:
	case DelegationRefresh:
		if cfg.Mode == ModeProgressive {
			return nil, errors.New("delegation refresh: needs mode hybrid, where the broker holds the IdP grant")
		}
		deleg = newDelegation(&cfg)
	case "", DelegationTokenExchange: // "": token_exchange if the IdP advertises it, else refresh
		deleg = newDelegation(&cfg)
	case DelegationAppPassword:
	default:
		return nil, fmt.Errorf("delegation: unknown mode %q; want token_exchange, refresh, app_password or none", cfg.DelegationMode)
	}

	u, err := url.Parse(cfg.Resource)
	if err != nil {
		return nil, fmt.Errorf("resource: %w", err)
	}
	var timed *idpTransport
	if cfg.Metrics != nil {
		cfg.HTTPClient, timed = instrumentIdPClient(cfg.HTTPClient, cfg.Metrics)
	}
	b := &Broker{
		cfg:            cfg,
		logger:         cfg.Logger,
		log:            newLoggers(cfg.Logger),
		metrics:        cfg.Metrics,
		idp:            newProvider(&cfg, nil),
		now:            time.Now,
		authorizations: ratelimit.New(ratelimit.MaxAddresses),
		oneTimeValues:  ratelimit.New(ratelimit.MaxAddresses),
		tokenAddresses: ratelimit.New(ratelimit.MaxAddresses),
		tokenClients:   ratelimit.New(ratelimit.MaxAddresses),
		refreshes:      ratelimit.New(ratelimit.MaxAddresses),
		// Keyed by configured worker ids only, so bounded by the configuration.
		backgroundTokens: ratelimit.New(max(len(cfg.BackgroundClients), 1)),
		issuer:           u.Scheme + "://" + u.Host,
		resourceURL:      u,
		resourcePath:     strings.TrimSuffix(u.EscapedPath(), "/"),
		toolScopes:       cfg.ToolScopes,
		delegation:       deleg,
		upstreamClient:   newUpstreamClient(cfg.IdPTimeout),
		learnSchedule:    defaultLearnSchedule,
	}
	if timed != nil {
		timed.broker = b
	}
	b.constantTimeCompare = subtle.ConstantTimeCompare
	b.site = storage.Hash(b.issuer + "\n" + cfg.Resource)
	if b.clients, err = newClientRegistry(cfg.Clients, cfg.Scopes, len(cfg.EnterpriseIssuers) > 0); err != nil {
		return nil, err
	}
	// Their secrets are kept only as hashes, in b.clients.
	b.cfg.Clients = slices.Clone(cfg.Clients)
	for i := range b.cfg.Clients {
		b.cfg.Clients[i].Secret = ""
	}
	if cfg.DelegationMode == DelegationAppPassword {
		if b.appPasswords, err = newAppPasswords(&cfg, func() time.Time { return b.now() }); err != nil {
			return nil, err
		}
	}
	if b.enterprise, err = newEnterpriseIssuers(&cfg, func() time.Time { return b.now() }); err != nil {
		return nil, err
	}
	b.adminScanLimit = AdminScanLimit
	b.openStores()
	b.metadataURL = u.Scheme + "://" + u.Host + wellKnownProtectedResource + b.resourcePath
	b.offered.Store(b.newScopeOffer(&b.cfg, nil))
	b.verifier = newVerifier(&cfg, b.idp, nil)
	return b, nil
}

// newProvider is the IdP cfg names, on the clock now (nil: time.Now).
func newProvider(cfg *Config, now func() time.Time) *idp.Provider {
	return idp.NewProvider(idp.ProviderConfig{
		Issuer:       cfg.Issuer,
		PublicIssuer: cfg.PublicIssuer,
		HTTPClient:   cfg.HTTPClient,
		Timeout:      cfg.IdPTimeout,
		Now:          now,
	})
}

// newVerifier is the verifier of the access tokens p issues for the resource, on the
// clock now (nil: time.Now).
func newVerifier(cfg *Config, p *idp.Provider, now func() time.Time) *idp.Verifier {
	clientIP := cfg.ClientIP
	if clientIP == nil {
		clientIP = contextClientIP
	}
	return idp.NewVerifier(idp.VerifierConfig{
		Provider:     p,
		Audiences:    append([]string{cfg.Resource}, cfg.Audience...),
		ClientID:     cfg.ClientID,
		ClientSecret: cfg.ClientSecret,
		HTTPClient:   cfg.HTTPClient,
		Now:          now,

		RequireAccessTokenType: cfg.RequireJWTAccessTokenType,
		IntrospectionCacheTTL:  cfg.IntrospectionCacheTTL,
		ColdVerifyRate:         cfg.ColdVerifyRate,
		ColdVerifyRateGlobal:   cfg.ColdVerifyRateGlobal,
		ClientIP:               clientIP,
		Logger:                 cfg.Logger.Named("verify"),
		// Discovery and introspection (or the JWKS), each within idp_timeout, and room.
		Timeout: 3 * cfg.IdPTimeout,
	})
}

func setDefault(d *time.Duration, def time.Duration) {
	if *d <= 0 {
		*d = def
	}
}

// Paths of the broker's own endpoints.
const (
	wellKnownProtectedResource   = "/.well-known/oauth-protected-resource"
	wellKnownAuthorizationServer = "/.well-known/oauth-authorization-server"
	wellKnownOpenIDConfiguration = "/.well-known/openid-configuration"
	pathAuthorize                = "/oauth/authorize"
	pathConsent                  = "/oauth/consent"
	pathCallback                 = "/oauth/callback"
	pathToken                    = "/oauth/token"
	pathRegister                 = "/oauth/register"
	pathRevoke                   = "/oauth/revoke"
	pathOfflineAccessStart       = "/oauth/offline-access"
	pathOfflineAccessStatus      = "/oauth/offline-access/status"
	pathBackgroundToken          = "/oauth/background-token"

	// The offline access endpoints' names of earlier releases, still served the same way.
	pathOfflineAccessStartLegacy  = "/oauth/authorize-nextcloud"
	pathOfflineAccessStatusLegacy = "/oauth/provisioning"
)

// The paths an offline access login may return to from the IdP (Config.OfflineAccessCallbackPath).
const (
	// OfflineAccessCallback is the callback path without a vendor name.
	OfflineAccessCallback = "/oauth/offline-access/callback"
	// OfflineAccessCallbackLegacy is the callback path of earlier releases, which admins
	// registered at their IdP; still the redirect_uri sent unless configured otherwise.
	OfflineAccessCallbackLegacy = "/oauth/callback-nextcloud"
)

// Handle answers the broker's own endpoints and authenticates every other request. It
// returns the request to pass on with the principal it speaks for, or a nil request when
// it has answered itself.
func (b *Broker) Handle(w http.ResponseWriter, r *http.Request) (*http.Request, *idp.Principal) {
	p := r.URL.Path
	switch {
	case isProtectedResourceMetadata(p, b.resourcePath):
		b.serveProtectedResourceMetadata(w, r)
		return nil, nil
	case p == pathAuthorize && b.cfg.Mode == ModeProgressive:
		b.serveAuthorizeProgressive(w, r)
		return nil, nil
	}
	switch p {
	case pathOfflineAccessStart, pathOfflineAccessStartLegacy:
		b.serveOfflineAccessStart(w, r)
		return nil, nil
	case OfflineAccessCallback, OfflineAccessCallbackLegacy:
		b.serveOfflineAccessCallback(w, r)
		return nil, nil
	case pathOfflineAccessStatus, pathOfflineAccessStatusLegacy:
		b.serveOfflineAccessStatus(w, r)
		return nil, nil
	case pathBackgroundToken:
		b.serveBackgroundToken(w, r)
		return nil, nil
	case pathHealth:
		b.serveHealth(w, r)
		return nil, nil
	case pathAppPasswordStart:
		if b.appPasswords != nil {
			b.serveAppPasswordStart(w, r)
			return nil, nil
		}
	}
	if b.cfg.Mode == ModeHybrid {
		if serve := b.hybridEndpoint(p); serve != nil {
			serve(w, r)
			return nil, nil
		}
	}
	return b.protect(w, r)
}

// isProtectedResourceMetadata tells whether path is the RFC 9728 document's, at the root
// or suffixed with the resource's path: the comparison of path with the joined string,
// without building it on every request.
func isProtectedResourceMetadata(path, resourcePath string) bool {
	rest, ok := strings.CutPrefix(path, wellKnownProtectedResource)
	return ok && (rest == "" || rest == resourcePath)
}

// NeedsClientIP tells whether requests to path use the client's IP, so that the server in
// front should resolve it (WithClientIP): the endpoints rate-limited per client address
// (registration, authorization, the browser endpoints that redeem a login state or an
// offline access link, token and revocation) and those whose audit events name it
// (consent, offline access status, background tokens).
func NeedsClientIP(path string) bool {
	switch path {
	case pathRegister, pathAuthorize, pathCallback, OfflineAccessCallback, OfflineAccessCallbackLegacy,
		pathOfflineAccessStart, pathOfflineAccessStartLegacy, pathToken, pathRevoke,
		pathConsent, pathOfflineAccessStatus, pathOfflineAccessStatusLegacy, pathBackgroundToken, pathAppPasswordStart:
		return true
	}
	return false
}

// authorizeRate is how many authorization requests one client address may start per
// minute (each stores a consent ticket).
const authorizeRate = 60

// hybridEndpoint finds the handler of one of the authorization server's endpoints.
func (b *Broker) hybridEndpoint(path string) http.HandlerFunc {
	switch path {
	case wellKnownAuthorizationServer, wellKnownOpenIDConfiguration:
		return b.serveAuthorizationServerMetadata
	case pathAuthorize:
		return b.serveAuthorizeHybrid
	case pathConsent:
		return b.serveConsent
	case pathCallback:
		return b.serveCallback
	case pathToken:
		return b.serveToken
	case pathRegister:
		return b.serveRegister
	case pathRevoke:
		return b.serveRevoke
	}
	return nil
}

// advertisedScopes are the scopes offered to clients: never offline_access, which MCP
// 2026-07-28 keeps out of challenges and metadata.
func advertisedScopes(scopes []string) []string {
	out := make([]string, 0, len(scopes))
	for _, s := range scopes {
		if s != "offline_access" {
			out = append(out, s)
		}
	}
	return out
}
