package idp

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"golang.org/x/sync/singleflight"
)

// GrantTypeTokenExchange is the RFC 8693 grant type.
const GrantTypeTokenExchange = "urn:ietf:params:oauth:grant-type:token-exchange"

// ErrUnavailable means the IdP could not be reached or answered with a server error.
var ErrUnavailable = errors.New("identity provider unavailable")

// Discovery is the part of the IdP's OIDC discovery document the broker uses, with the
// go-oidc provider that caches its JWKS.
type Discovery struct {
	Provider *oidc.Provider

	// Issuer is the `issuer` the document names, which tokens carry in `iss`.
	Issuer string

	// BrowserAuthorizationEndpoint is the authorization endpoint rewritten onto the
	// public issuer, for redirects of browsers.
	BrowserAuthorizationEndpoint string

	TokenEndpoint         string   `json:"token_endpoint"`
	IntrospectionEndpoint string   `json:"introspection_endpoint"`
	RevocationEndpoint    string   `json:"revocation_endpoint"`
	JWKSURI               string   `json:"jwks_uri"`
	GrantTypesSupported   []string `json:"grant_types_supported"`
	// AuthorizationResponseIssParameterSupported is RFC 9207 §3: the IdP puts iss in its
	// authorization responses, so a response without it is refused.
	AuthorizationResponseIssParameterSupported bool `json:"authorization_response_iss_parameter_supported"`
}

// ErrAuthorizationResponseIssuer means an authorization response came back with an iss
// other than the IdP's, or without the iss the IdP advertises (RFC 9207 §2.4): the
// response may come from another authorization server (a mix-up) and its code is not
// redeemed.
var ErrAuthorizationResponseIssuer = errors.New("the authorization response's iss is not the identity provider's")

// CheckAuthorizationResponseIssuer applies RFC 9207 §2.4 to the iss parameter of an
// authorization response from this IdP ("" when absent): a present iss must be the
// document's issuer exactly (simple string comparison, no normalisation); an absent one
// is refused when the IdP advertises the parameter, and accepted otherwise.
func (d *Discovery) CheckAuthorizationResponseIssuer(iss string) error {
	if iss == "" && !d.AuthorizationResponseIssParameterSupported || iss != "" && iss == d.Issuer {
		return nil
	}
	return ErrAuthorizationResponseIssuer
}

// SupportsTokenExchange tells whether the IdP advertises the RFC 8693 grant.
func (d *Discovery) SupportsTokenExchange() bool {
	for _, g := range d.GrantTypesSupported {
		if g == GrantTypeTokenExchange {
			return true
		}
	}
	return false
}

// Provider is the upstream identity provider, discovered lazily: construction never
// touches the network, so provisioning a configuration never waits for the IdP.
//
// The document is fetched apart from any request, bounded by its own timeout, so a caller
// that goes away (a client closing its connection) cannot fail the fetch for the others
// (SECURITY.md: discovery kept failing). Once a document is known it is served while a
// newer one is fetched in the background (stale-while-revalidate); a caller waits only
// while there is none, and no longer than its own context allows.
type Provider struct {
	issuer       string
	publicIssuer string
	client       *http.Client
	now          func() time.Time
	timeout      time.Duration

	flight singleflight.Group

	mu        sync.Mutex // guards the fields below; never held across a fetch
	cached    *Discovery
	fetchedAt time.Time
	failedAt  time.Time
	lastErr   error
}

const (
	// DiscoveryMaxAge is how long a discovery document is used before it is fetched again;
	// keys rotate through the JWKS refetch on an unknown kid, not through this.
	DiscoveryMaxAge = 12 * time.Hour
	// discoveryRetryAfter spaces out fetches after a failure, so a down IdP is not hammered.
	discoveryRetryAfter = 5 * time.Second
)

// ProviderConfig configures a Provider. Zero values take the documented defaults.
type ProviderConfig struct {
	// Issuer is the IdP's back-channel address, where its discovery document is fetched.
	Issuer string
	// PublicIssuer is the IdP's browser-facing base, when it is not Issuer: the
	// authorization endpoint is moved onto it, and the document may name it as issuer.
	// Default: none (Issuer serves browsers too).
	PublicIssuer string
	// HTTPClient fetches the discovery document and, through go-oidc, the ID tokens'
	// keys. Default: http.DefaultClient.
	HTTPClient *http.Client
	// Timeout bounds one discovery fetch. Default: 10s.
	Timeout time.Duration
	// Now is the clock. Default: time.Now.
	Now func() time.Time
}

// defaultDiscoveryTimeout is ProviderConfig.Timeout's default.
const defaultDiscoveryTimeout = 10 * time.Second

// NewProvider describes the IdP cfg names. It does not touch the network.
func NewProvider(cfg ProviderConfig) *Provider {
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = http.DefaultClient
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = defaultDiscoveryTimeout
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Provider{issuer: cfg.Issuer, publicIssuer: cfg.PublicIssuer, client: cfg.HTTPClient, now: cfg.Now, timeout: cfg.Timeout}
}

// Discovery returns the discovery document. A fresh one is returned at once; a stale one
// too, while a newer one is fetched in the background (and it stays in use while the IdP
// is unreachable). With none yet, the caller waits for the shared fetch, at most until
// ctx is done; a failed fetch is remembered for discoveryRetryAfter.
func (i *Provider) Discovery(ctx context.Context) (*Discovery, error) {
	i.mu.Lock()
	now := i.now()
	cached, fetchedAt, lastErr, failedAt := i.cached, i.fetchedAt, i.lastErr, i.failedAt
	i.mu.Unlock()
	recentFailure := lastErr != nil && now.Sub(failedAt) < discoveryRetryAfter
	if cached != nil {
		if now.Sub(fetchedAt) >= DiscoveryMaxAge && !recentFailure {
			i.flight.DoChan("discovery", i.refresh) // revalidate; nobody waits for it
		}
		return cached, nil
	}
	if recentFailure {
		return nil, lastErr
	}
	select {
	case res := <-i.flight.DoChan("discovery", i.refresh):
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*Discovery), nil
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: waiting for OIDC discovery: %w", ErrUnavailable, ctx.Err())
	}
}

// Known returns the discovery document fetched last, or nil: it never fetches, so a
// caller inside a fetch (an instrumented transport naming the endpoint) can use it.
func (i *Provider) Known() *Discovery {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.cached
}

// refresh fetches the document under its own timeout, detached from every request, and
// records the outcome.
func (i *Provider) refresh() (any, error) {
	ctx, cancel := context.WithTimeout(context.Background(), i.timeout)
	defer cancel()
	d, err := i.fetch(ctx)
	now := i.now()
	i.mu.Lock()
	defer i.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("loading OIDC discovery from %s: %w", i.issuer, err)
		if !errors.Is(err, context.Canceled) { // nobody cancels this context; if so, it says nothing of the IdP
			i.lastErr, i.failedAt = err, now
		}
		return nil, err
	}
	i.cached, i.fetchedAt, i.lastErr = d, now, nil
	return d, nil
}

func (i *Provider) fetch(ctx context.Context) (*Discovery, error) {
	ctx = oidc.ClientContext(ctx, i.client)
	p, err := oidc.NewProvider(ctx, i.issuer)
	var mismatch *oidc.IssuerMismatchError
	if errors.As(err, &mismatch) && i.acceptsIssuer(mismatch.Discovered) {
		// An IdP behind two addresses names its public one; tokens carry that.
		p, err = oidc.NewProvider(oidc.InsecureIssuerURLContext(ctx, mismatch.Discovered), i.issuer)
	}
	if err != nil {
		if errors.As(err, &mismatch) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	d := &Discovery{Provider: p}
	if err := p.Claims(d); err != nil {
		return nil, fmt.Errorf("decoding discovery document: %w", err)
	}
	var iss struct {
		Issuer string `json:"issuer"`
	}
	_ = p.Claims(&iss)
	d.Issuer = iss.Issuer
	d.BrowserAuthorizationEndpoint = i.browserURL(p.Endpoint().AuthURL)
	return d, nil
}

// acceptsIssuer allows a discovered issuer that differs from the configured back-channel
// address only when it is the configured public address.
func (i *Provider) acceptsIssuer(discovered string) bool {
	return i.publicIssuer != "" && strings.TrimSuffix(discovered, "/") == strings.TrimSuffix(i.publicIssuer, "/")
}

// browserURL moves an IdP endpoint from the back-channel address onto the public one: by
// prefix when the endpoint lives under the issuer, else by origin when it is on the
// issuer's host.
func (i *Provider) browserURL(endpoint string) string {
	if i.publicIssuer == "" {
		return endpoint
	}
	internal := strings.TrimSuffix(i.issuer, "/")
	public := strings.TrimSuffix(i.publicIssuer, "/")
	if rest, ok := strings.CutPrefix(endpoint, internal); ok && (rest == "" || rest[0] == '/' || rest[0] == '?') {
		return public + rest
	}
	e, err1 := url.Parse(endpoint)
	in, err2 := url.Parse(internal)
	pub, err3 := url.Parse(public)
	if err1 != nil || err2 != nil || err3 != nil || !strings.EqualFold(e.Host, in.Host) {
		return endpoint
	}
	e.Scheme, e.Host = pub.Scheme, pub.Host
	return e.String()
}

// DiscoveryStatus is what the Provider last learned of the IdP's discovery document,
// without asking the IdP again: for a health report beside the broker's readiness.
type DiscoveryStatus struct {
	// Known: a document is cached and in use (also while refreshing it fails).
	Known bool
	// FetchedAt is when the cached document was fetched; zero without one.
	FetchedAt time.Time
	// FailedAt and Err are the last failed fetch, when no fetch succeeded since.
	FailedAt time.Time
	Err      error
}

// Status reports the discovery document's state. Like Known it never fetches: a probe
// of the broker's health must not become a request to the IdP.
func (i *Provider) Status() DiscoveryStatus {
	i.mu.Lock()
	defer i.mu.Unlock()
	s := DiscoveryStatus{Known: i.cached != nil, FetchedAt: i.fetchedAt}
	if i.lastErr != nil {
		s.FailedAt, s.Err = i.failedAt, i.lastErr
	}
	return s
}
