// Package flows holds the OAuth and OIDC logic of mcp_oauth on plain net/http: one file
// per endpoint or grant. It knows nothing of Caddy.
package flows

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap"

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
	Clients      []ClientConfig
	Registration bool

	DelegationMode     string
	DelegationAudience string
	DelegationScopes   []string
	SubjectHeader      string

	ToolScopes   []ToolScopeRule
	MaxBodyBytes int64

	SessionTTL      time.Duration
	CodeTTL         time.Duration
	AccessTokenTTL  time.Duration
	RefreshTokenTTL time.Duration
	IdPTimeout      time.Duration

	Records    *storage.Records
	Logger     *zap.Logger
	HTTPClient *http.Client
}

// ClientConfig is an MCP client registered in the configuration.
type ClientConfig struct {
	ClientID     string
	Name         string
	RedirectURIs []string
	Scopes       []string
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

const (
	defaultMaxBodyBytes = 1 << 20
	defaultIdPTimeout   = 10 * time.Second
)

// Broker answers the broker's endpoints and authenticates protected requests.
type Broker struct {
	cfg      Config
	logger   *zap.Logger
	idp      *IdP
	verifier *TokenVerifier
	clients  *clientRegistry

	resourceURL   *url.URL
	resourcePath  string // path of the resource, "" for the root
	metadataURL   string // the resource-suffixed RFC 9728 metadata URL
	challengeTail string // `resource_metadata="…", scope="…"`, prebuilt for the hot path
	toolScopes    []ToolScopeRule
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
		cfg.MaxBodyBytes = defaultMaxBodyBytes
	}
	if cfg.IdPTimeout <= 0 {
		cfg.IdPTimeout = defaultIdPTimeout
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
	switch cfg.Mode {
	case ModeProgressive:
	case ModeHybrid:
		return nil, errors.New("mode hybrid: not available in this build yet; use mode progressive")
	default:
		return nil, fmt.Errorf("mode: unknown mode %q", cfg.Mode)
	}
	switch cfg.DelegationMode {
	case DelegationNone:
	case "", DelegationTokenExchange, DelegationRefresh:
		return nil, errors.New("delegation: only `none` is available in this build yet")
	default:
		return nil, fmt.Errorf("delegation: unknown mode %q", cfg.DelegationMode)
	}

	u, err := url.Parse(cfg.Resource)
	if err != nil {
		return nil, fmt.Errorf("resource: %w", err)
	}
	b := &Broker{
		cfg:          cfg,
		logger:       cfg.Logger,
		idp:          NewIdP(cfg.Issuer, cfg.PublicIssuer, cfg.HTTPClient),
		resourceURL:  u,
		resourcePath: strings.TrimSuffix(u.EscapedPath(), "/"),
		toolScopes:   cfg.ToolScopes,
	}
	b.clients = newClientRegistry(cfg.Clients, cfg.Scopes)
	b.metadataURL = u.Scheme + "://" + u.Host + wellKnownProtectedResource + b.resourcePath
	b.challengeTail = `resource_metadata="` + b.metadataURL + `"`
	if s := advertisedScopes(cfg.Scopes); len(s) > 0 {
		b.challengeTail += `, scope="` + strings.Join(s, " ") + `"`
	}
	audiences := append([]string{cfg.Resource}, cfg.Audience...)
	b.verifier = NewTokenVerifier(VerifierConfig{
		IdP:          b.idp,
		Audiences:    audiences,
		ClientID:     cfg.ClientID,
		ClientSecret: cfg.ClientSecret,
		HTTPClient:   cfg.HTTPClient,
	})
	return b, nil
}

// Close stops the broker's background work.
func (b *Broker) Close() {}

// Paths of the broker's own endpoints.
const (
	wellKnownProtectedResource = "/.well-known/oauth-protected-resource"
	pathAuthorize              = "/oauth/authorize"
)

// Handle answers the broker's own endpoints and authenticates every other request. It
// returns the request to pass on with the principal it speaks for, or a nil request when
// it has answered itself.
func (b *Broker) Handle(w http.ResponseWriter, r *http.Request) (*http.Request, *Principal) {
	p := r.URL.Path
	switch {
	case p == wellKnownProtectedResource || p == wellKnownProtectedResource+b.resourcePath:
		b.serveProtectedResourceMetadata(w, r)
		return nil, nil
	case p == pathAuthorize && b.cfg.Mode == ModeProgressive:
		b.serveAuthorizeProgressive(w, r)
		return nil, nil
	}
	return b.protect(w, r)
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
