// Package caddyoauthbroker is the Caddy glue of mcp_oauth: the http.handlers.mcp_oauth
// module. module.go holds its JSON configuration (each field's doc comment states its
// default), Provision (defaults, the key ring, storage, the record janitor on Caddy's
// context), Validate, Cleanup and ServeHTTP, which hands every request to a flows.Broker
// and passes the ones it admits to the next handler; caddyfile.go parses the mcp_oauth
// directive into that configuration. Everything OAuth is in package flows.
package caddyoauthbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/flows"
	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/nextcloud"
	"github.com/caddy-mcp/oauth-broker/storage"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler puts OAuth 2.1 in front of an MCP server. It serves the protected-resource and
// authorization-server endpoints of the MCP authorization spec, authenticates every other
// request it matches, and hands the next handler a delegated upstream token instead of the
// client's own.
//
// It writes its refusals itself and returns nil, rather than returning a caddyhttp.Error:
// 401 and 403 with the RFC 6750 §3 `WWW-Authenticate` challenge, the OAuth JSON error body
// (RFC 6749 §5.2), 429 and 503 with `Retry-After`, and errors redirected to the client in
// the query (RFC 6749 §4.1.2.1). A returned error would go to the server's `handle_errors`
// routes, which answer with a body and headers of their own, or with a bare status when
// there are none; but MCP clients depend on the exact answer: they find the authorization
// server only through the challenge's `resource_metadata` (RFC 9728 §5.1), and step up
// or log in again by its `error` and `scope`. ServeHTTP returns an error only when the next
// handler does, so `handle_errors` sees the upstream's failures and never the broker's
// refusals.
//
// On a request it passes on, it sets the placeholders `{http.auth.user.id}` (the token's
// subject at the IdP, which Caddy's access log records as `user_id`),
// `{http.auth.user.scopes}` (the token's scopes, space-separated) and
// `{http.auth.user.client_id}` (the MCP client the token was issued to; empty when the
// token does not say), for later handlers such as `reverse_proxy`'s `header_up`.
type Handler struct {
	// How MCP clients obtain tokens. `hybrid`: the broker is the clients' authorization
	// server and issues its own tokens after the user logs in at the IdP. `progressive`:
	// clients log in at the IdP directly and the broker validates their tokens.
	// Default: hybrid.
	Mode string `json:"mode,omitempty"`

	// The upstream identity provider's issuer URL, as the broker reaches it. OIDC discovery
	// is fetched from here lazily and cached. Required.
	Issuer string `json:"issuer,omitempty"`

	// The IdP's base URL as browsers reach it, when it differs from `issuer` (an IdP on an
	// internal container address). Every browser redirect to the IdP uses it. Default: `issuer`.
	PublicIssuer string `json:"public_issuer,omitempty"`

	// The broker's own confidential client at the IdP. Required.
	ClientID string `json:"client_id,omitempty"`

	// The secret of `client_id`. Supports `{env.*}` and `{file.*}` placeholders.
	// Default: none.
	ClientSecret string `json:"client_secret,omitempty"`

	// The canonical URL of the protected MCP endpoint, e.g. `https://mcp.example.com/mcp`:
	// an absolute https URL (http only on a loopback host), without query or fragment.
	// It is the `resource` of the protected-resource metadata and the audience of the
	// broker's tokens. Required.
	Resource string `json:"resource,omitempty"`

	// The `aud` values accepted in client tokens in progressive mode, besides `resource`.
	// It must not list `client_id`: tokens issued to the broker itself (its ID tokens,
	// background and delegated tokens) are never accepted from MCP clients.
	// Default: none (only `resource`).
	Audience []string `json:"audience,omitempty"`

	// Accept a JWT in progressive mode only with RFC 9068's header `typ: at+jwt`, for IdPs
	// that set it on every access token. Without it a JWT must still look like an access
	// token: no ID-token markers, and a `client_id`, `scope` or `scp` claim. Default: false.
	RequireJWTAccessTokenType bool `json:"require_jwt_access_token_type,omitempty"`

	// How long the IdP's introspection answer about an opaque access token is trusted in
	// progressive mode, so that revoking the token at the IdP takes effect within it
	// (never past the token's `exp`). Default: 5m.
	IntrospectionCacheTTL caddy.Duration `json:"introspection_cache_ttl,omitempty"`

	// The scopes the broker advertises to MCP clients and lets them ask for; a login asks
	// the IdP for those a client was granted, with `openid` and `offline_access` always.
	// Default: `openid profile email`.
	Scopes []string `json:"scopes,omitempty"`

	// Least-privilege scopes for a first login, each one of `scopes` (or, with
	// `upstream_metadata`, learned from the upstream). When set, the 401 challenge's `scope`
	// and the protected-resource metadata's `scopes_supported` name these alone (MCP
	// 2026-07-28 reads `scopes_supported` as the minimal set for basic functionality; the
	// authorization server metadata still lists every scope it grants), and an authorization
	// request without `scope` is granted them; a tool call that needs more gets a 403
	// `insufficient_scope` naming what the token holds plus what the call needs, and the
	// client steps up. `offline_access` is never one of them. Default: none (every scope of
	// `scopes` is named, so clients ask for everything at once; see the README on why that
	// stays the default).
	BaseScopes []string `json:"base_scopes,omitempty"`

	// AES-256 keys, base64 of 32 bytes each, that seal secrets at rest. The first encrypts;
	// all decrypt, so a new key goes first and old ones stay until their records expire.
	// Supports `{env.*}` and `{file.*}` placeholders. Required.
	EncryptionKeys []string `json:"encryption_keys,omitempty"`

	// MCP clients registered in configuration. Default: none.
	Clients []*Client `json:"clients,omitempty"`

	// Turns off RFC 7591 dynamic client registration at `/oauth/register`.
	// Default: false (registration is on).
	DisableRegistration bool `json:"disable_registration,omitempty"`

	// How the upstream MCP server is given a token of its own. Default: token exchange
	// (RFC 8693) where the IdP advertises it, otherwise the refresh-grant fallback.
	Delegation *Delegation `json:"delegation,omitempty"`

	// Per-tool scope requirements, checked on every JSON-RPC `tools/call`.
	// The first rule whose tool pattern matches applies. In hybrid mode each scope named must
	// be one the broker can grant (`openid` or one of `scopes`), else the configuration is
	// refused naming the rule; with `upstream_metadata` set, the scopes learned later may
	// supply it, so a missing one is only logged at WARN when the configuration loads. In
	// progressive mode the IdP grants scopes, so any is accepted. Default: none.
	ToolScopes []*ToolScope `json:"tool_scopes,omitempty"`

	// The URL of the upstream MCP server's RFC 9728 protected-resource metadata, e.g.
	// `http://mcp-internal:8000/.well-known/oauth-protected-resource/mcp`. Its
	// `scopes_supported` join `scopes` once read: advertised in the broker's metadata and
	// challenges, allowed to clients whose scopes are not configured, and so asked of the
	// IdP when a client asks for them. Read in the background after start (never during
	// `caddy validate`), again every hour, retried with backoff; until then `scopes` alone
	// apply. Fetched within `idp_timeout`, at most 64 KiB, no redirects, at most 100 scope
	// tokens of at most 128 bytes each, or refused whole. Default: none (nothing learned).
	UpstreamMetadata string `json:"upstream_metadata,omitempty"`

	// How long an authenticated session (the IdP grant behind the broker's tokens) lives
	// without use. Default: 720h (30 days).
	SessionTTL caddy.Duration `json:"session_ttl,omitempty"`

	// How long an authorization code stays redeemable. Default: 60s.
	CodeTTL caddy.Duration `json:"code_ttl,omitempty"`

	// The lifetime of broker-issued access tokens. Default: 1h.
	AccessTokenTTL caddy.Duration `json:"access_token_ttl,omitempty"`

	// The lifetime of broker-issued refresh tokens. Default: 720h (30 days).
	RefreshTokenTTL caddy.Duration `json:"refresh_token_ttl,omitempty"`

	// How long a rotated refresh token still returns the same new token pair, for clients
	// that retry or fail to store the rotated token. Default: 60s.
	RefreshGrace caddy.Duration `json:"refresh_grace,omitempty"`

	// How long a session lives at most after the login, however often its client
	// refreshes; then the user logs in again. No broker token outlives it.
	// Default: 720h (30 days).
	SessionMaxLifetime caddy.Duration `json:"session_max_lifetime,omitempty"`

	// How long a broker refresh may go without asking the IdP whether the session's grant
	// is still alive. A refresh after that refreshes the grant at the IdP first; if the IdP
	// refuses it (user disabled, grant revoked), the session and its tokens end. An IdP
	// that does not answer does not end sessions. Default: 10m.
	IdPConfirmInterval caddy.Duration `json:"idp_confirm_interval,omitempty"`

	// How long the broker waits for the IdP on any back-channel call. Default: 10s.
	IdPTimeout caddy.Duration `json:"idp_timeout,omitempty"`

	// How many dynamic registrations one client IP may make per minute. The client IP is
	// the one Caddy resolves, honouring the server's trusted proxies. Default: 10.
	RegistrationRate int `json:"registration_rate,omitempty"`

	// How many dynamic registrations all client IPs together may make per minute, so that
	// strangers with many addresses still cannot fill the storage. Default: 30.
	RegistrationRateTotal int `json:"registration_rate_total,omitempty"`
	// How many cold token verifications (an introspection of a token not yet seen, a JWKS
	// fetch for an unknown key ID) one client IP may cause per minute, which is also its
	// burst; past it the answer is 429 with Retry-After, never 401. Tokens already
	// verified never count. The client IP is the one Caddy resolves, honouring the
	// server's trusted proxies: behind a load balancer, set trusted_proxies or every
	// client shares one budget. Default: 60.
	ColdVerifyRate int `json:"cold_verify_rate,omitempty"`

	// How many cold token verifications all clients together may cause per minute, and
	// the burst; past it the answer is 503 with Retry-After. Default: 600.
	ColdVerifyRateGlobal int `json:"cold_verify_rate_global,omitempty"`
	// Whether MCP clients may use the https URL of a Client ID Metadata Document as their
	// client_id. Off, the authorization server metadata stops advertising
	// client_id_metadata_document_supported and https client_ids are refused; it is
	// independent of disable_registration. Default: true (on).
	ClientMetadataDocuments *bool `json:"client_metadata_documents,omitempty"`

	// Lets Client ID Metadata Documents be fetched from loopback and private addresses.
	// Only for labs and tests: it opens the broker to SSRF. Default: false.
	ClientMetadataAllowPrivate bool `json:"client_metadata_allow_private,omitempty"`

	// Offline access for background jobs, granted by each user explicitly.
	// Default: no tools need it.
	OfflineAccess *OfflineAccess `json:"offline_access,omitempty"`

	// Deprecated: the name of offline_access in earlier releases, still read (with a
	// warning at load) and moved to offline_access; giving both is an error. Default: none.
	Provisioning *OfflineAccess `json:"provisioning,omitempty"`

	// Enterprise-Managed Authorization (the MCP extension): the enterprise identity
	// providers trusted to grant access to this MCP server with Identity Assertion JWT
	// Authorization Grants (ID-JAGs), redeemed at the token endpoint with the JWT bearer
	// grant by confidential clients. Hybrid mode, with delegation none or app_password
	// only. Default: none (the grant is not offered).
	EnterpriseManaged *EnterpriseManaged `json:"enterprise_managed,omitempty"`

	// Background workers allowed to fetch background tokens for users who granted
	// offline access. Default: none.
	BackgroundClients []*BackgroundClient `json:"background_clients,omitempty"`

	// How many background tokens one background client may fetch per minute, as a burst
	// of as many and then an even pace; past it the worker gets 429 with Retry-After.
	// Default: 60.
	BackgroundTokenRate int `json:"background_token_rate,omitempty"`

	// The largest request body read to find a JSON-RPC `tools/call`; larger bodies of
	// requests that need that check are refused with 413. Default: 1 MiB.
	MaxBodyBytes int64 `json:"max_body_bytes,omitempty"`

	// Storage for this handler's records, overriding Caddy's configured storage.
	// Default: Caddy's storage.
	StorageRaw json.RawMessage `json:"storage,omitempty" caddy:"namespace=caddy.storage inline_key=module"`

	broker  *flows.Broker
	records *storage.Records
	logger  *zap.Logger
	// now is the records' clock, for tests that open records written long ago; nil is
	// time.Now.
	now func() time.Time

	// stopJanitor ends the janitor's goroutine, which closes janitorDone as it exits, and
	// the goroutine learning the upstream's scopes, which closes learnerDone. Caddy
	// cancels the Provision context first anyway; Cleanup also stops them when it runs
	// while that context lives, as in tests.
	stopJanitor context.CancelFunc
	janitorDone chan struct{}
	learnerDone chan struct{}
	// metrics are the site's series; nil without a metrics registry.
	metrics *siteMetrics
}

// Client is an MCP client registered in the configuration.
type Client struct {
	// The client's identifier. Required.
	ClientID string `json:"client_id,omitempty"`

	// The name shown on the consent page. Default: the client id.
	Name string `json:"name,omitempty"`

	// The redirect URIs the client may use: https, or http on a loopback host
	// (any port matches at run time, RFC 8252 §7.3). At least one is required, unless
	// the client has a secret: an agent that only redeems ID-JAGs (`enterprise_managed`)
	// needs none, and the authorization endpoint refuses a client without one.
	RedirectURIs []string `json:"redirect_uris,omitempty"`

	// The scopes this client may ask for. Default: all of the handler's `scopes`.
	Scopes []string `json:"scopes,omitempty"`

	// The client's secret, which makes it a confidential client: it must then
	// authenticate at the token and revocation endpoints, and may use the JWT bearer
	// grant of `enterprise_managed`. At least 32 bytes; the broker keeps only its
	// SHA-256. Supports `{env.*}` and `{file.*}` placeholders, which are better than a
	// literal secret in the configuration. Default: none (a public client).
	Secret string `json:"secret,omitempty"`

	// How the client sends its secret: `client_secret_basic` (HTTP Basic) or
	// `client_secret_post` (in the form), or `none` for a public client, which must not
	// have a secret. Default: client_secret_basic with a secret, none without.
	TokenEndpointAuthMethod string `json:"token_endpoint_auth_method,omitempty"`

	// secretWritten: Secret was set before its placeholders were resolved, so an empty
	// one is an unset variable or an empty file, not a public client.
	secretWritten bool
}

// Delegation configures the token the upstream MCP server receives.
type Delegation struct {
	// `token_exchange` (RFC 8693 at the IdP), `refresh` (the refresh grant on the
	// session's IdP grant, for IdPs without RFC 8693), `app_password` (the user's
	// Nextcloud app password, obtained through Login Flow v2, as `Authorization: Basic`:
	// for the Nextcloud MCP server's multi_user_basic mode), or `none` (no token at all:
	// the authenticated subject goes in `subject_header`). Default: token_exchange when
	// the IdP's discovery advertises it, otherwise refresh.
	Mode string `json:"mode,omitempty"`

	// The audience requested for delegated tokens, e.g. `nextcloud`. Default: none.
	Audience string `json:"audience,omitempty"`

	// The scopes of a delegated token when no `tool_scopes` rule applies; never more
	// than the client was granted. Configured, they keep the meaning of earlier releases
	// (which defaulted to the handler's `scopes` without the identity scopes). Default:
	// the client's whole grant, `openid` and the other identity scopes included, for an
	// upstream that shows its tools by the token's scopes (the Nextcloud MCP server).
	Scopes []string `json:"scopes,omitempty"`

	// Which calls get a token narrowed to what they need: `tool_calls` (a `tools/call`
	// gets its `tool_scopes` scopes, any other call the client's whole grant or
	// `scopes`) or `none` (every call gets the client's whole grant, for an upstream
	// that checks each tool's scopes itself; `scopes` must then be unset). With mode
	// `refresh` every call of a session gets one token whatever this says. Default:
	// tool_calls.
	Narrow string `json:"narrow,omitempty"`

	// The request header that carries the authenticated subject to the upstream when
	// mode is `none`. Default: `X-Auth-Subject`.
	SubjectHeader string `json:"subject_header,omitempty"`

	// Mode app_password: where the broker reaches Nextcloud (its base URL, e.g.
	// `http://nextcloud:80` inside a container network). Required in that mode.
	// Default: none.
	NextcloudURL string `json:"nextcloud_url,omitempty"`

	// Mode app_password: where users' browsers reach Nextcloud; the login URL Nextcloud
	// answers is rewritten to it. Default: `nextcloud_url`.
	NextcloudPublicURL string `json:"nextcloud_public_url,omitempty"`

	// Mode app_password: the claim of the user's token that holds the Nextcloud user id,
	// which the app password granted must authenticate as. With Nextcloud's oidc app
	// `sub` is the user id; with Keycloak and user_oidc it is the claim user_oidc maps
	// to the user id. Default: `sub`.
	UserClaim string `json:"user_claim,omitempty"`

	// Mode app_password: the User-Agent of the broker's Login Flow v2 requests, which
	// names the app passwords in the user's Devices & sessions and must pass Nextcloud's
	// `core.login_flow_v2.allowed_user_agents` when that is set. Default:
	// `MCP OAuth broker`.
	UserAgent string `json:"user_agent,omitempty"`
}

// OfflineAccess configures offline access.
type OfflineAccess struct {
	// The scopes asked of the IdP for background jobs, besides `openid` and
	// `offline_access`. Default: none.
	Scopes []string `json:"scopes,omitempty"`

	// Tools (names or globs) that need the user's offline access grant; calling one without it
	// answers with a link to grant it. Default: none.
	Tools []string `json:"tools,omitempty"`

	// The path of the redirect_uri sent to the IdP, which must be registered there as a
	// redirect URI of the broker's client: `/oauth/callback-nextcloud` (the path of earlier
	// releases) or `/oauth/offline-access/callback`. The broker answers at both.
	// Default: /oauth/callback-nextcloud.
	CallbackPath string `json:"callback_path,omitempty"`
}

// EnterpriseManaged configures Enterprise-Managed Authorization.
type EnterpriseManaged struct {
	// The enterprise identity providers whose ID-JAGs are redeemed. Required, at least one.
	Issuers []*EnterpriseIssuer `json:"issuers,omitempty"`
}

// EnterpriseIssuer is an enterprise identity provider trusted to issue ID-JAGs.
type EnterpriseIssuer struct {
	// Its issuer identifier, compared exactly with an ID-JAG's `iss`. Required.
	Issuer string `json:"issuer,omitempty"`

	// Where its signing keys (JWKS) are published. Required.
	JWKSURI string `json:"jwks_uri,omitempty"`

	// The signature algorithms accepted from it; asymmetric ones only (RS, PS, ES
	// families, EdDSA). Default: RS256 ES256.
	Algorithms []string `json:"algorithms,omitempty"`

	// The most its ID-JAGs may grant: their scopes beyond these are dropped.
	// Default: every scope the broker offers.
	Scopes []string `json:"scopes,omitempty"`

	// Put before the `sub` of its ID-JAGs to make the user's subject at the broker (and in
	// the subject header), so that its users cannot be taken for the identity provider's.
	// Required unless the issuer is the identity provider's own; without a colon with
	// delegation app_password, where the subject is a Nextcloud user name. Default: none.
	SubjectPrefix string `json:"subject_prefix,omitempty"`
}

// BackgroundClient is a background worker's credentials.
type BackgroundClient struct {
	// The worker's id. Required.
	ClientID string `json:"client_id,omitempty"`

	// The worker's secret. Supports `{env.*}` and `{file.*}` placeholders. Required.
	ClientSecret string `json:"client_secret,omitempty"`
}

// ToolScope demands scopes for MCP tools whose name matches Tool.
type ToolScope struct {
	// A tool name, or a glob over tool names (`notes_*`, path.Match syntax). Required.
	Tool string `json:"tool,omitempty"`

	// The scopes a `tools/call` of a matching tool needs. At least one is required.
	Scopes []string `json:"scopes,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mcp_oauth",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision applies the defaults, resolves placeholders, parses the encryption keys, loads
// the storage and builds the broker; Caddy calls Validate after it. It neither writes to
// storage nor waits for the IdP, because it also runs for `caddy adapt --validate` and
// `caddy validate`.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.Provisioning != nil {
		if h.OfflineAccess != nil {
			return errors.New("provisioning: the old name of offline_access, which is also given; keep only offline_access")
		}
		h.logger.Warn("provisioning is deprecated; rename it to offline_access")
		h.OfflineAccess, h.Provisioning = h.Provisioning, nil
	}
	h.applyDefaults()
	h.resolvePlaceholders()
	ring, err := h.keyRing()
	if err != nil {
		return err
	}

	var st certmagic.Storage
	if h.StorageRaw != nil {
		mod, err := ctx.LoadModule(h, "StorageRaw")
		if err != nil {
			return fmt.Errorf("loading storage module: %w", err)
		}
		converter, ok := mod.(caddy.StorageConverter)
		if !ok {
			return fmt.Errorf("storage: module %T is not a caddy.StorageConverter", mod)
		}
		if st, err = converter.CertMagicStorage(); err != nil {
			return fmt.Errorf("creating storage: %w", err)
		}
	} else {
		st = ctx.Storage()
	}

	var metrics *siteMetrics
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		if metrics, err = newSiteMetrics(reg, h.Resource); err != nil {
			return err
		}
		st = timeStorage(storage.FastPath(st), metrics.storage) // the fast path timed too
	}
	h.records = storage.New(st, ring, storage.WithLogger(h.logger.Named("storage")), storage.WithClock(h.now))

	cfg, err := h.flowsConfig()
	if err != nil {
		return err
	}
	cfg.Records = h.records
	cfg.Logger = h.logger
	if metrics != nil {
		cfg.Metrics = metrics
		h.metrics = metrics
	}
	if h.broker, err = flows.New(cfg); err != nil {
		return err
	}

	var janitorCtx context.Context
	janitorCtx, h.stopJanitor = context.WithCancel(ctx)
	h.janitorDone = make(chan struct{})
	go h.sweepExpiredRecords(janitorCtx)
	h.learnerDone = make(chan struct{})
	go func() {
		defer close(h.learnerDone)
		h.broker.LearnUpstreamScopes(janitorCtx) // its first fetch waits: nothing during `caddy validate`
	}()
	liveSites.add(h)
	return nil
}

// applyDefaults sets every field left zero to the default its doc comment states, from the
// constants that packages flows and idp apply to a zero configuration too. Defaults that
// depend on the IdP or on other fields (delegation mode and scopes, public_issuer, a
// client's name and scopes) are decided by flows, where those are known. Negative values
// are left for Validate to refuse.
func (h *Handler) applyDefaults() {
	if h.Mode == "" {
		h.Mode = flows.ModeHybrid
	}
	if len(h.Scopes) == 0 {
		h.Scopes = slices.Clone(flows.DefaultScopes)
	}
	if h.Delegation == nil {
		h.Delegation = new(Delegation)
	}
	if h.Delegation.SubjectHeader == "" {
		h.Delegation.SubjectHeader = flows.DefaultSubjectHeader
	}
	if h.Delegation.Narrow == "" {
		h.Delegation.Narrow = flows.DelegationNarrowToolCalls
	}
	if em := h.EnterpriseManaged; em != nil {
		for _, ei := range em.Issuers {
			if ei != nil && len(ei.Algorithms) == 0 {
				ei.Algorithms = slices.Clone(flows.DefaultEnterpriseAlgorithms)
			}
		}
	}
	if d := h.Delegation; d.Mode == flows.DelegationAppPassword {
		if d.NextcloudPublicURL == "" {
			d.NextcloudPublicURL = d.NextcloudURL
		}
		if d.UserClaim == "" {
			d.UserClaim = "sub"
		}
		if d.UserAgent == "" {
			d.UserAgent = nextcloud.DefaultUserAgent
		}
	}
	if h.ClientMetadataDocuments == nil {
		on := true
		h.ClientMetadataDocuments = &on
	}
	for _, d := range []struct {
		field *caddy.Duration
		def   time.Duration
	}{
		{&h.IntrospectionCacheTTL, idp.DefaultIntrospectionCacheTTL},
		{&h.SessionTTL, flows.DefaultSessionTTL},
		{&h.CodeTTL, flows.DefaultCodeTTL},
		{&h.AccessTokenTTL, flows.DefaultAccessTokenTTL},
		{&h.RefreshTokenTTL, flows.DefaultRefreshTokenTTL},
		{&h.RefreshGrace, flows.DefaultRefreshGrace},
		{&h.SessionMaxLifetime, flows.DefaultSessionMaxLifetime},
		{&h.IdPConfirmInterval, flows.DefaultIdPConfirmInterval},
		{&h.IdPTimeout, flows.DefaultIdPTimeout},
	} {
		if *d.field == 0 {
			*d.field = caddy.Duration(d.def)
		}
	}
	for _, r := range []struct {
		field *int
		def   int
	}{
		{&h.RegistrationRate, flows.DefaultRegistrationRate},
		{&h.RegistrationRateTotal, flows.DefaultRegistrationRateTotal},
		{&h.ColdVerifyRate, idp.DefaultColdVerifyRate},
		{&h.ColdVerifyRateGlobal, idp.DefaultColdVerifyRateGlobal},
		{&h.BackgroundTokenRate, flows.DefaultBackgroundTokenRate},
	} {
		if *r.field == 0 {
			*r.field = r.def
		}
	}
	if h.MaxBodyBytes == 0 {
		h.MaxBodyBytes = flows.DefaultMaxBodyBytes
	}
}

// keyRing parses encryption_keys, naming the key that is wrong without repeating it.
func (h *Handler) keyRing() (*storage.KeyRing, error) {
	if len(h.EncryptionKeys) == 0 {
		return nil, errors.New("encryption_keys: required; generate one with `head -c 32 /dev/urandom | base64`")
	}
	raw := make([][]byte, len(h.EncryptionKeys))
	for i, e := range h.EncryptionKeys {
		k, err := storage.DecodeKey(e)
		if err != nil {
			return nil, fmt.Errorf("encryption_keys[%d]: %w", i, err)
		}
		raw[i] = k
	}
	ring, err := storage.NewKeyRing(raw...)
	if err != nil {
		return nil, fmt.Errorf("encryption_keys: %w", err)
	}
	return ring, nil
}

// resolvePlaceholders replaces `{env.*}` and `{file.*}` in every field that may hold a
// secret or a deployment-specific address.
func (h *Handler) resolvePlaceholders() {
	repl := caddy.NewReplacer()
	for _, s := range []*string{&h.Issuer, &h.PublicIssuer, &h.ClientID, &h.ClientSecret, &h.Resource} {
		*s = repl.ReplaceKnown(*s, "")
	}
	for i := range h.EncryptionKeys {
		h.EncryptionKeys[i] = repl.ReplaceKnown(h.EncryptionKeys[i], "")
	}
	for _, c := range h.BackgroundClients {
		if c != nil {
			c.ClientSecret = repl.ReplaceKnown(c.ClientSecret, "")
		}
	}
	for _, c := range h.Clients {
		if c != nil && c.Secret != "" {
			c.secretWritten = true
			c.Secret = repl.ReplaceKnown(c.Secret, "")
		}
	}
}

// ServeHTTP answers the broker's own endpoints, authenticates every other request and
// passes it on with a delegated token.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if flows.NeedsClientIP(r.URL.Path) {
		// Rate limits key on the client IP as Caddy resolves it behind trusted proxies.
		if ip, ok := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ok {
			r = r.WithContext(flows.WithClientIP(r.Context(), ip))
		}
	}
	pass, who := h.broker.Handle(w, r)
	if pass == nil {
		return nil
	}
	if who != nil {
		repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
		// One provider, read when asked (the access log asks for the id): three Sets
		// would box three values and grow the replacer's map on every request. Static
		// values come first, so any an earlier handler set go, as a Set would overwrite them.
		for _, k := range userPlaceholders {
			repl.Delete(k)
		}
		repl.Map(func(key string) (any, bool) {
			switch key {
			case userPlaceholders[0]:
				return who.Subject, true
			case userPlaceholders[1]:
				return who.ScopeString(), true
			case userPlaceholders[2]:
				return who.ClientID, true
			}
			return nil, false
		})
	}
	// The upstream's response must not set or clear the broker's cookies.
	g := h.broker.GuardResponse(w, pass, who)
	defer g.Release()
	return next.ServeHTTP(g, pass)
}

// userPlaceholders are the placeholders ServeHTTP sets for a request it passes on: the
// subject, the scopes, the client id.
var userPlaceholders = [...]string{"http.auth.user.id", "http.auth.user.scopes", "http.auth.user.client_id"}

// caddyClientIP is the client IP Caddy resolved for the request, honouring the server's
// trusted proxies; read only on cold paths (a context lookup, no allocation).
func caddyClientIP(ctx context.Context) string {
	ip, _ := caddyhttp.GetVar(ctx, caddyhttp.ClientIPVarKey).(string)
	return ip
}

// sweepExpiredRecords runs the storage janitor until ctx ends. Its first sweep waits
// janitorDelay, because Provision must not write to storage: `caddy validate` provisions
// and cancels ctx at once. The delay is short so that config reloads cannot starve it.
func (h *Handler) sweepExpiredRecords(ctx context.Context) {
	defer close(h.janitorDone)
	// Beside the janitor, the Login Flow v2 polls of delegation app_password (nothing in
	// other modes). The first comes an interval after Provision, when `caddy validate`
	// has cancelled ctx already.
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		h.broker.PollLoginFlowsEvery(ctx, flows.DefaultLoginFlowPollInterval)
	}()
	defer func() { <-polled }()
	// And the sweep of the memory caches' expired entries, which touches no storage.
	swept := make(chan struct{})
	go func() {
		defer close(swept)
		h.sweepCachesEvery(ctx, cacheSweepInterval)
	}()
	defer func() { <-swept }()
	wait := time.NewTimer(janitorDelay)
	defer wait.Stop()
	select {
	case <-ctx.Done():
		return
	case <-wait.C:
	}
	janitor := h.records.StartJanitor(ctx, janitorInterval)
	if h.metrics != nil {
		h.countRecordsEvery(ctx, janitorInterval)
	}
	<-janitor.Done()
}

// sweepCachesEvery drops the expired entries of the broker's memory caches every interval
// until ctx ends (flows.Broker.SweepCaches), so that a node's heap falls back after a burst
// of logins.
func (h *Handler) sweepCachesEvery(ctx context.Context, interval time.Duration) {
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			h.broker.SweepCaches()
		}
	}
}

// countRecordsEvery sets the site's gauges of live sessions and offline access grants at
// once and then every interval until ctx ends. Every node counts, each site its own
// (another site's janitor may hold the sweep): a bounded scan of each kind
// (flows.AdminScanLimit) per interval, beside the janitor and never on a request's path.
// A failed count leaves the gauges as they were, its timestamp showing their age.
func (h *Handler) countRecordsEvery(ctx context.Context, interval time.Duration) {
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		h.countRecords(ctx)
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// countRecords counts the site's live records once into its gauges.
func (h *Handler) countRecords(ctx context.Context) {
	n, err := h.broker.CountRecords(ctx)
	switch {
	case err != nil:
		if ctx.Err() == nil {
			h.logger.Warn("counting sessions and offline access grants", zap.Error(err))
		}
		return
	case n.Truncated:
		h.logger.Warn("counting sessions and offline access grants stopped at the scan limit; the gauges are lower bounds",
			zap.Int("limit", flows.AdminScanLimit))
	}
	now := time.Now
	if h.now != nil {
		now = h.now
	}
	h.metrics.setRecordCount(n, now())
}

// janitorInterval is how often one node of a cluster sweeps expired records.
const janitorInterval = 10 * time.Minute

// cacheSweepInterval is how often a node drops the expired entries of its memory caches.
const cacheSweepInterval = time.Minute

// janitorDelay is how long after Provision the first sweep waits; a variable for tests.
var janitorDelay = time.Minute

// Cleanup stops the janitor, waits for it, and takes the handler off the admin API's
// sites (admin.go). It copes with a Provision that failed half
// way.
func (h *Handler) Cleanup() error {
	liveSites.remove(h)
	if h.stopJanitor != nil {
		h.stopJanitor()
		<-h.janitorDone
		<-h.learnerDone
	}
	return nil
}

// Validate refuses a configuration that cannot work, naming the field and the fix. Caddy
// calls it after Provision, which has parsed encryption_keys already.
func (h *Handler) Validate() error {
	switch h.Mode {
	case "", flows.ModeHybrid, flows.ModeProgressive:
	default:
		return fmt.Errorf("mode: unknown mode %q; want hybrid or progressive", h.Mode)
	}
	if h.Issuer == "" {
		return errors.New("issuer: required; set it to the IdP's issuer URL, e.g. https://cloud.example.com")
	}
	if err := checkAbsoluteURL(h.Issuer); err != nil {
		return fmt.Errorf("issuer: %w", err)
	}
	if h.UpstreamMetadata != "" {
		if err := checkAbsoluteURL(h.UpstreamMetadata); err != nil {
			return fmt.Errorf("upstream_metadata: %w", err)
		}
	}
	if h.PublicIssuer != "" {
		if err := checkAbsoluteURL(h.PublicIssuer); err != nil {
			return fmt.Errorf("public_issuer: %w", err)
		}
	}
	if h.ClientID == "" {
		return errors.New("client_id: required; register the broker as a confidential client at the IdP and set its id")
	}
	if h.Resource == "" {
		return errors.New("resource: required; set it to the public URL of the MCP endpoint, e.g. https://mcp.example.com/mcp")
	}
	if err := checkResource(h.Resource); err != nil {
		return fmt.Errorf("resource: %w", err)
	}
	if err := checkScopes(h.Scopes); err != nil {
		return err
	}
	if err := h.validateBaseScopes(); err != nil {
		return err
	}
	for i, a := range h.Audience {
		if a == "" {
			return fmt.Errorf("audience[%d]: empty", i)
		}
	}
	seen := make(map[string]bool, len(h.Clients))
	for i, c := range h.Clients {
		if c == nil || c.ClientID == "" {
			return fmt.Errorf("clients[%d]: client_id required", i)
		}
		if seen[c.ClientID] {
			return fmt.Errorf("clients: %q defined twice; each client_id may appear once", c.ClientID)
		}
		seen[c.ClientID] = true
		if len(c.RedirectURIs) == 0 && c.Secret == "" && !c.secretWritten {
			// One with a secret may be an agent of the JWT bearer grant alone.
			return fmt.Errorf("clients %q: redirect_uris required for a client without a secret", c.ClientID)
		}
		if err := flows.CheckClientName(c.Name); err != nil {
			return fmt.Errorf("clients %q: name: %w", c.ClientID, err)
		}
		if err := checkScopes(c.Scopes); err != nil {
			return fmt.Errorf("clients %q: %w", c.ClientID, err)
		}
		for _, u := range c.RedirectURIs {
			if err := flows.CheckRedirectURI(u); err != nil {
				return fmt.Errorf("clients %q: redirect_uris %q: %w", c.ClientID, u, err)
			}
		}
		if c.secretWritten && c.Secret == "" {
			// Else an unset variable would quietly make a confidential client public.
			return fmt.Errorf("clients %q: secret: empty once its placeholders are resolved; set the environment variable or fill the file it names", c.ClientID)
		}
		if _, err := flows.CheckClientSecret(c.TokenEndpointAuthMethod, c.Secret); err != nil {
			return fmt.Errorf("clients %q: %w", c.ClientID, err)
		}
		if h.Mode == flows.ModeProgressive && (c.Secret != "" || c.TokenEndpointAuthMethod != "") {
			// The client's token requests go to the IdP, which holds its secret: the
			// broker would never check this one.
			return fmt.Errorf("clients %q: secret and token_endpoint_auth_method: hybrid mode only; in progressive mode the client authenticates at the IdP", c.ClientID)
		}
	}
	if h.ClientMetadataAllowPrivate && h.ClientMetadataDocuments != nil && !*h.ClientMetadataDocuments {
		return errors.New("client_metadata_allow_private: set, but client_metadata_documents is off; remove one of them")
	}
	if d := h.Delegation; d != nil {
		switch d.Mode {
		case "", flows.DelegationTokenExchange, flows.DelegationRefresh, flows.DelegationNone, flows.DelegationAppPassword:
		default:
			return fmt.Errorf("delegation: unknown mode %q; want token_exchange, refresh, app_password or none", d.Mode)
		}
		if err := d.validateAppPassword(); err != nil {
			return err
		}
		if d.SubjectHeader != "" && !isToken(d.SubjectHeader) {
			return fmt.Errorf("delegation: subject_header %q: not an HTTP header name; want letters, digits and !#$%%&'*+-.^_`|~ only (RFC 9110 §5.1)", d.SubjectHeader)
		}
		if err := checkScopes(d.Scopes); err != nil {
			return fmt.Errorf("delegation: %w", err)
		}
		switch d.Narrow {
		case "", flows.DelegationNarrowToolCalls:
		case flows.DelegationNarrowNone:
			if len(d.Scopes) > 0 {
				return errors.New("delegation: scopes are never delegated with narrow none, where every call gets the client's whole grant; remove one of them")
			}
		default:
			return fmt.Errorf("delegation: narrow: unknown value %q; want tool_calls or none", d.Narrow)
		}
	}
	for i, t := range h.ToolScopes {
		if t == nil || t.Tool == "" || len(t.Scopes) == 0 {
			return fmt.Errorf("tool_scopes[%d]: want a tool name or glob and at least one scope", i)
		}
		if _, err := path.Match(t.Tool, ""); err != nil {
			return fmt.Errorf("tool_scopes %q: bad glob: %w", t.Tool, err)
		}
		if err := checkScopes(t.Scopes); err != nil {
			return fmt.Errorf("tool_scopes %q: %w", t.Tool, err)
		}
		// The first matching rule wins, so a rule an earlier one always matches would never
		// apply: its tools would need only the earlier rule's scopes. Only a literal name
		// can be proven shadowed by a glob; an identical glob is shadowed too.
		literal := !strings.ContainsAny(t.Tool, `*?[\`)
		for _, e := range h.ToolScopes[:i] {
			if ok, _ := path.Match(e.Tool, t.Tool); e.Tool == t.Tool || (literal && ok) {
				return fmt.Errorf("tool_scopes %q: shadowed by the earlier %q, which matches first; remove it or put it first", t.Tool, e.Tool)
			}
		}
		// In hybrid mode the broker grants the scopes, only those configured or learned;
		// in progressive mode the IdP does, and may grant one the broker does not advertise.
		if missing := h.ungrantable(t.Scopes); len(missing) > 0 && h.Mode != flows.ModeProgressive {
			if h.UpstreamMetadata == "" {
				return fmt.Errorf("tool_scopes %q: %s not among scopes, so no client can be granted what the tool needs and its calls are refused for good; add %s to scopes",
					t.Tool, strings.Join(missing, " "), strings.Join(missing, " "))
			}
			if h.logger != nil {
				h.logger.Warn("a tool_scope rule names scopes not among scopes; until upstream_metadata supplies them, no client can be granted them",
					zap.String("tool_scope", t.Tool), zap.Strings("scopes", missing), zap.String("upstream_metadata", h.UpstreamMetadata))
			}
		}
	}
	if err := h.validateEnterpriseManaged(); err != nil {
		return err
	}
	seenWorkers := make(map[string]bool, len(h.BackgroundClients))
	for i, c := range h.BackgroundClients {
		if c == nil || c.ClientID == "" || c.ClientSecret == "" {
			return fmt.Errorf("background_clients[%d]: want an id and a secret", i)
		}
		if seenWorkers[c.ClientID] {
			return fmt.Errorf("background_clients: %q defined twice", c.ClientID)
		}
		seenWorkers[c.ClientID] = true
	}
	if p := h.OfflineAccess; p != nil {
		if err := checkScopes(p.Scopes); err != nil {
			return fmt.Errorf("offline_access: %w", err)
		}
		for _, t := range p.Tools {
			if _, err := path.Match(t, ""); err != nil {
				return fmt.Errorf("offline_access: tools %q: bad glob: %w", t, err)
			}
		}
	}
	if h.RegistrationRate < 0 {
		return fmt.Errorf("registration_rate: must not be negative, got %d", h.RegistrationRate)
	}
	if h.RegistrationRateTotal < 0 {
		return fmt.Errorf("registration_rate_total: must not be negative, got %d", h.RegistrationRateTotal)
	}
	if h.ColdVerifyRate < 0 {
		return fmt.Errorf("cold_verify_rate: must not be negative, got %d", h.ColdVerifyRate)
	}
	if h.ColdVerifyRateGlobal < 0 {
		return fmt.Errorf("cold_verify_rate_global: must not be negative, got %d", h.ColdVerifyRateGlobal)
	}
	if h.BackgroundTokenRate < 0 {
		return fmt.Errorf("background_token_rate: must not be negative, got %d", h.BackgroundTokenRate)
	}
	for name, d := range map[string]caddy.Duration{
		"session_ttl": h.SessionTTL, "code_ttl": h.CodeTTL,
		"access_token_ttl": h.AccessTokenTTL, "refresh_token_ttl": h.RefreshTokenTTL,
		"refresh_grace": h.RefreshGrace, "idp_timeout": h.IdPTimeout,
		"session_max_lifetime": h.SessionMaxLifetime, "idp_confirm_interval": h.IdPConfirmInterval,
		"introspection_cache_ttl": h.IntrospectionCacheTTL,
	} {
		if d < 0 {
			return fmt.Errorf("%s: must not be negative, got %s", name, time.Duration(d))
		}
	}
	if h.MaxBodyBytes < 0 {
		return fmt.Errorf("max_body_bytes: must not be negative, got %d", h.MaxBodyBytes)
	}
	if slices.Contains(h.Audience, h.ClientID) {
		return fmt.Errorf("audience: must not list client_id %q: the broker's own ID tokens, background and delegated tokens would pass as MCP clients' tokens; list the resource or the MCP clients' ids", h.ClientID)
	}
	return nil
}

// validateBaseScopes checks base_scopes: scope tokens, never offline_access (MCP 2026-07-28
// keeps it out of challenges and metadata), each one the broker can grant, as for tool_scopes.
func (h *Handler) validateBaseScopes() error {
	if err := checkScopes(h.BaseScopes); err != nil {
		return fmt.Errorf("base_scopes: %w", err)
	}
	if slices.Contains(h.BaseScopes, "offline_access") {
		return errors.New("base_scopes: offline_access is never advertised to MCP clients; remove it")
	}
	if missing := h.ungrantable(h.BaseScopes); len(missing) > 0 {
		if h.UpstreamMetadata == "" {
			return fmt.Errorf("base_scopes: %s not among scopes, so a first login asking for them is refused; add %s to scopes",
				strings.Join(missing, " "), strings.Join(missing, " "))
		}
		if h.logger != nil {
			h.logger.Warn("base_scopes names scopes not among scopes; until upstream_metadata supplies them, a first login asking for them is refused",
				zap.Strings("scopes", missing), zap.String("upstream_metadata", h.UpstreamMetadata))
		}
	}
	return nil
}

// ungrantable lists the scopes of list that the broker cannot grant from its configuration:
// neither `openid` nor one of `scopes` (their default when unset).
func (h *Handler) ungrantable(list []string) []string {
	configured := h.Scopes
	if len(configured) == 0 {
		configured = flows.DefaultScopes
	}
	var missing []string
	for _, s := range list {
		if s != "openid" && !slices.Contains(configured, s) && !slices.Contains(missing, s) {
			missing = append(missing, s)
		}
	}
	return missing
}

// checkScopes refuses an empty entry in a scopes list, and one that is not a scope token
// (RFC 6749 §3.3: printable ASCII without space, `"` or `\`), which would break the
// space-separated scope strings and the quoted `scope` of WWW-Authenticate challenges.
func checkScopes(scopes []string) error {
	for i, s := range scopes {
		if s == "" {
			return fmt.Errorf("scopes[%d]: empty", i)
		}
		if !flows.IsScopeToken(s) {
			return fmt.Errorf("scopes[%d]: %q is not a scope token; want printable ASCII without space, quote or backslash (RFC 6749 §3.3)", i, s)
		}
	}
	return nil
}

// isToken tells whether s is an RFC 9110 §5.6.2 token, the syntax of a header name.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// checkAbsoluteURL accepts an http or https URL with a host.
func checkAbsoluteURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("want an absolute http(s) URL, got %q", raw)
	}
	return nil
}

// checkResource accepts the canonical form MCP clients compare against: absolute https
// (http only on a loopback host), lowercase scheme and host, no query, no fragment.
func checkResource(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || u.User != nil {
		return fmt.Errorf("want an absolute https URL such as https://mcp.example.com/mcp, got %q", raw)
	}
	loopback := u.Scheme == "http" && flows.IsLoopbackHost(u.Hostname())
	if u.Scheme != "https" && !loopback {
		return fmt.Errorf("want https (http only on a loopback host), got %q", raw)
	}
	if u.RawQuery != "" || u.Fragment != "" || strings.Contains(raw, "#") {
		return fmt.Errorf("must not carry a query or fragment, got %q", raw)
	}
	if strings.HasSuffix(u.Path, "/") || strings.ToLower(u.Scheme+"://"+u.Host) != u.Scheme+"://"+u.Host {
		return fmt.Errorf("want the canonical form: lowercase scheme and host, no trailing slash, got %q", raw)
	}
	return nil
}

// flowsConfig turns the JSON configuration into the broker's.
func (h *Handler) flowsConfig() (flows.Config, error) {
	cfg := flows.Config{
		Mode:             h.Mode,
		Issuer:           h.Issuer,
		PublicIssuer:     h.PublicIssuer,
		ClientID:         h.ClientID,
		ClientSecret:     h.ClientSecret,
		Resource:         h.Resource,
		Audience:         h.Audience,
		Scopes:           h.Scopes,
		BaseScopes:       h.BaseScopes,
		Registration:     !h.DisableRegistration,
		MaxBodyBytes:     h.MaxBodyBytes,
		UpstreamMetadata: h.UpstreamMetadata,
		SessionTTL:       time.Duration(h.SessionTTL),
		CodeTTL:          time.Duration(h.CodeTTL),
		AccessTokenTTL:   time.Duration(h.AccessTokenTTL),
		RefreshTokenTTL:  time.Duration(h.RefreshTokenTTL),
		RefreshGrace:     time.Duration(h.RefreshGrace),
		IdPTimeout:       time.Duration(h.IdPTimeout),

		RegistrationRate:               h.RegistrationRate,
		RegistrationRateTotal:          h.RegistrationRateTotal,
		CIMDAllowPrivate:               h.ClientMetadataAllowPrivate,
		SessionMaxLifetime:             time.Duration(h.SessionMaxLifetime),
		IdPConfirmInterval:             time.Duration(h.IdPConfirmInterval),
		RequireJWTAccessTokenType:      h.RequireJWTAccessTokenType,
		IntrospectionCacheTTL:          time.Duration(h.IntrospectionCacheTTL),
		ColdVerifyRate:                 h.ColdVerifyRate,
		ColdVerifyRateGlobal:           h.ColdVerifyRateGlobal,
		ClientIP:                       caddyClientIP,
		BackgroundTokenRate:            h.BackgroundTokenRate,
		DisableClientMetadataDocuments: h.ClientMetadataDocuments != nil && !*h.ClientMetadataDocuments,
	}
	if p := h.OfflineAccess; p != nil {
		cfg.OfflineAccessScopes = p.Scopes
		cfg.OfflineAccessTools = p.Tools
		cfg.OfflineAccessCallbackPath = p.CallbackPath
	}
	// Nil entries are skipped here and refused by Validate, which Caddy calls after Provision.
	for _, c := range h.BackgroundClients {
		if c == nil {
			continue
		}
		cfg.BackgroundClients = append(cfg.BackgroundClients, flows.BackgroundClient{ID: c.ClientID, Secret: c.ClientSecret})
	}
	for _, c := range h.Clients {
		if c == nil {
			continue
		}
		cfg.Clients = append(cfg.Clients, flows.ClientConfig{
			ClientID: c.ClientID, Name: c.Name, RedirectURIs: c.RedirectURIs, Scopes: c.Scopes,
			Secret: c.Secret, AuthMethod: c.TokenEndpointAuthMethod,
		})
	}
	if em := h.EnterpriseManaged; em != nil {
		for _, ei := range em.Issuers {
			if ei != nil {
				cfg.EnterpriseIssuers = append(cfg.EnterpriseIssuers, flows.EnterpriseIssuer{
					Issuer: ei.Issuer, JWKSURI: ei.JWKSURI, Algorithms: ei.Algorithms, Scopes: ei.Scopes, SubjectPrefix: ei.SubjectPrefix,
				})
			}
		}
	}
	if d := h.Delegation; d != nil {
		cfg.DelegationMode = d.Mode
		cfg.DelegationAudience = d.Audience
		cfg.DelegationScopes = d.Scopes
		cfg.DelegationNarrow = d.Narrow
		cfg.SubjectHeader = d.SubjectHeader
		cfg.AppPassword = flows.AppPasswordConfig{
			NextcloudURL: d.NextcloudURL, PublicURL: d.NextcloudPublicURL, UserClaim: d.UserClaim, UserAgent: d.UserAgent,
		}
	}
	for _, t := range h.ToolScopes {
		if t == nil {
			continue
		}
		cfg.ToolScopes = append(cfg.ToolScopes, flows.ToolScopeRule{Tool: t.Tool, Scopes: t.Scopes})
	}
	return cfg, nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)

// validateEnterpriseManaged checks what flows cannot know is missing: enterprise_managed
// with no issuer, an issuer without its URL or keys. The rest (algorithms, subject
// prefixes, the delegation modes that can serve such sessions) flows.New checks, in
// Provision.
func (h *Handler) validateEnterpriseManaged() error {
	em := h.EnterpriseManaged
	if em == nil {
		return nil
	}
	if len(em.Issuers) == 0 {
		return errors.New("enterprise_managed: want at least one issuer")
	}
	for i, ei := range em.Issuers {
		if ei == nil || ei.Issuer == "" || ei.JWKSURI == "" {
			return fmt.Errorf("enterprise_managed: issuers[%d]: want an issuer and its jwks_uri", i)
		}
		if err := checkScopes(ei.Scopes); err != nil {
			return fmt.Errorf("enterprise_managed: issuer %s: %w", ei.Issuer, err)
		}
	}
	return nil
}
