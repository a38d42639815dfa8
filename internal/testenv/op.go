package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/zitadel/oidc/v3/example/server/exampleop"
	"github.com/zitadel/oidc/v3/pkg/crypto"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
	"golang.org/x/oauth2"
)

// Keys of [OP.Count] other than grant types.
const (
	CountAuthorize  = "authorize"
	CountIntrospect = "introspect"
	CountRevoke     = "revoke"
	CountUserinfo   = "userinfo"
	CountJWKS       = "jwks"
)

// TokenExchangeGrantType is the RFC 8693 grant type, as counted by [OP.Count].
const TokenExchangeGrantType = string(oidc.GrantTypeTokenExchange)

// DefaultRedirectURIGlobs are the redirect URI globs every client accepts: any
// path on a loopback host, on any port, over http or https. The syntax is
// github.com/bmatcuk/doublestar's.
var DefaultRedirectURIGlobs = []string{
	"http://127.0.0.1:*/**",
	"http://localhost:*/**",
	"http://127.0.0.1/**",
	"http://localhost/**",
	"https://127.0.0.1:*/**",
	"https://localhost:*/**",
	"https://127.0.0.1/**",
	"https://localhost/**",
}

// OP is zitadel/oidc's example OpenID Provider, served in-process on a
// loopback port, with the clients of this package (BrokerClientID,
// NativeClientID, OpaqueClientID) and three users.
//
// Access tokens last 5 minutes, refresh tokens 5 hours; refresh tokens
// rotate on every use. An access token's aud is the client ID, unless the
// authorization request carried RFC 8707 resource parameters (then it is those
// resources, for the tokens of the code and of its refreshes) or the token
// comes from a token exchange with audience parameters (then it is those).
type OP struct {
	// Issuer is "http://127.0.0.1:PORT", without a trailing slash. The
	// discovery document's issuer and every token's iss are exactly this.
	Issuer string

	// Endpoints, from the discovery document.
	AuthorizationEndpoint string
	TokenEndpoint         string
	IntrospectionEndpoint string
	RevocationEndpoint    string
	UserinfoEndpoint      string
	JWKSURI               string

	// User is an admin: clients may exchange its tokens without an actor token.
	User User
	// OtherUser is a second admin, for tests that need two people.
	OtherUser User
	// RestrictedUser is not an admin: the OP refuses to exchange its tokens
	// unless an actor token comes with them.
	RestrictedUser User

	storage *opStorage
	server  *http.Server
	down    atomic.Bool
	latency atomic.Int64
	// answerFault rewrites token endpoint answers (op_faults.go).
	answerFault atomic.Pointer[TokenAnswerFault]
	// refreshTakesAll: see WithRefreshScopeIgnored.
	refreshTakesAll bool
	// issParameter adds RFC 9207 to the OP's answers (op_iss.go).
	issParameter bool

	mu     sync.Mutex
	paths  map[string]string // endpoint path → Count key
	counts map[string]int
}

type opConfig struct {
	tokenExchange bool
	redirectURIs  []string
	signingAlg    jose.SignatureAlgorithm // "": the example storage's RS256 key
	refusedScopes []string
	// refreshScopeIgnored: see WithRefreshScopeIgnored.
	refreshScopeIgnored bool
	issParameter        bool // RFC 9207 (op_iss.go)
}

// OPOption configures an OP.
type OPOption func(*opConfig)

// WithoutTokenExchangeAdvertised makes an OP without RFC 8693: discovery's
// grant_types_supported lacks the token exchange grant, and the token
// endpoint answers it with unsupported_grant_type. (zitadel ties the two
// together.)
func WithoutTokenExchangeAdvertised() OPOption {
	return func(c *opConfig) { c.tokenExchange = false }
}

// WithRedirectURIGlobs adds redirect URI globs to [DefaultRedirectURIGlobs]
// for every client.
func WithRedirectURIGlobs(globs ...string) OPOption {
	return func(c *opConfig) { c.redirectURIs = append(c.redirectURIs, globs...) }
}

// WithScopesRefused makes the OP refuse scopes to every client: an
// authorization request asking for them is granted the rest, silently, as the
// Nextcloud oidc app treats a scope the client is not allowed. The token
// answer's scope, the JWT scope claim and introspection all lack them.
func WithScopesRefused(scopes ...string) OPOption {
	return func(c *opConfig) { c.refusedScopes = append(c.refusedScopes, scopes...) }
}

// WithRefreshScopeIgnored makes the OP take no `scope` or `resource` on the refresh
// grant, as the Nextcloud oidc app up to 2.0.9 does: a refresh always yields a token
// for the whole grant of the login, whatever it asks.
func WithRefreshScopeIgnored() OPOption {
	return func(c *opConfig) { c.refreshScopeIgnored = true }
}

// StartOP starts an OP and stops it when the test ends.
func StartOP(t testing.TB, opts ...OPOption) *OP {
	t.Helper()
	o, err := NewOP(opts...)
	if err != nil {
		t.Fatalf("starting OP: %v", err)
	}
	t.Cleanup(o.Close)
	return o
}

// NewOP starts an OP; the caller must Close it. Use it where there is no
// testing.TB, as in TestMain.
func NewOP(opts ...OPOption) (*OP, error) {
	cfg := opConfig{tokenExchange: true}
	for _, opt := range opts {
		opt(&cfg)
	}

	var signing *signingKey
	if cfg.signingAlg != "" {
		k, err := newSigningKey(cfg.signingAlg)
		if err != nil {
			return nil, err
		}
		signing = k
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listening: %w", err)
	}
	issuer := "http://" + ln.Addr().String()
	users := newUserStore("127.0.0.1")
	st := newOPStorage(users, append(append([]string(nil), DefaultRedirectURIGlobs...), cfg.redirectURIs...), cfg.refusedScopes)
	st.signing = signing
	var served exampleop.Storage = st
	if !cfg.tokenExchange {
		served = withoutTokenExchange{st}
	}

	o := &OP{
		Issuer:         issuer,
		User:           users.account("test-user"),
		OtherUser:      users.account("other-user"),
		RestrictedUser: users.account("restricted-user"),
		storage:        st,
		counts:         make(map[string]int),

		refreshTakesAll: cfg.refreshScopeIgnored,
		issParameter:    cfg.issParameter,
	}
	// A nil logger leaves slog's default logger alone.
	router := exampleop.SetupServer(issuer, served, nil, false)
	o.server = &http.Server{Handler: o.intercept(router), ReadHeaderTimeout: 10 * time.Second}
	go o.server.Serve(ln)

	if err := o.discover(); err != nil {
		o.Close()
		return nil, err
	}
	return o, nil
}

// Close stops the OP, dropping open connections.
func (o *OP) Close() { o.server.Close() }

func (o *OP) discover() error {
	resp, err := http.Get(o.Issuer + oidc.DiscoveryEndpoint)
	if err != nil {
		return fmt.Errorf("fetching discovery document: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("fetching discovery document: %s", resp.Status)
	}
	var d oidc.DiscoveryConfiguration
	if err := json.NewDecoder(resp.Body).Decode(&d); err != nil {
		return fmt.Errorf("decoding discovery document: %w", err)
	}
	if d.Issuer != o.Issuer {
		return fmt.Errorf("discovery issuer is %q, want %q", d.Issuer, o.Issuer)
	}
	o.AuthorizationEndpoint = d.AuthorizationEndpoint
	o.TokenEndpoint = d.TokenEndpoint
	o.IntrospectionEndpoint = d.IntrospectionEndpoint
	o.RevocationEndpoint = d.RevocationEndpoint
	o.UserinfoEndpoint = d.UserinfoEndpoint
	o.JWKSURI = d.JwksURI

	paths := make(map[string]string)
	for endpoint, key := range map[string]string{
		d.AuthorizationEndpoint: CountAuthorize,
		d.TokenEndpoint:         "", // counted by grant_type
		d.IntrospectionEndpoint: CountIntrospect,
		d.RevocationEndpoint:    CountRevoke,
		d.UserinfoEndpoint:      CountUserinfo,
		d.JwksURI:               CountJWKS,
	} {
		u, err := url.Parse(endpoint)
		if err != nil {
			return fmt.Errorf("parsing endpoint %q: %w", endpoint, err)
		}
		paths[u.Path] = key
	}
	o.mu.Lock()
	o.paths = paths
	o.mu.Unlock()
	return nil
}

// Endpoint returns the OP's endpoints for golang.org/x/oauth2, with client
// credentials sent by HTTP Basic authentication.
func (o *OP) Endpoint() oauth2.Endpoint {
	return oauth2.Endpoint{
		AuthURL:   o.AuthorizationEndpoint,
		TokenURL:  o.TokenEndpoint,
		AuthStyle: oauth2.AuthStyleInHeader,
	}
}

// intercept counts requests, applies SetDown and SetLatency, and passes an
// authorization request's resource parameters to the storage.
func (o *OP) intercept(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.mu.Lock()
		key, counted := o.paths[r.URL.Path]
		o.mu.Unlock()
		if counted && key == "" {
			if err := r.ParseForm(); err == nil {
				key = r.PostForm.Get("grant_type")
			}
		}
		if counted {
			o.mu.Lock()
			o.counts[key]++
			o.mu.Unlock()
		}

		if d := time.Duration(o.latency.Load()); d > 0 {
			select {
			case <-time.After(d):
			case <-r.Context().Done():
				return
			}
		}
		if o.down.Load() {
			http.Error(w, "identity provider down", http.StatusServiceUnavailable)
			return
		}

		if key == CountAuthorize {
			if err := r.ParseForm(); err == nil && len(r.Form["resource"]) > 0 {
				r = r.WithContext(withResources(r.Context(), r.Form["resource"]))
			}
		}
		if key == "refresh_token" && o.refreshTakesAll {
			// ParseForm ran above; the OP's own ParseForm keeps what is left.
			for _, p := range []string{"scope", "resource"} {
				r.PostForm.Del(p)
				r.Form.Del(p)
			}
		}
		if f := o.answerFault.Load(); f != nil && counted && r.URL.Path == o.tokenPath() {
			serveWithFault(w, r, next, key, *f)
			return
		}
		if o.issParameter {
			o.serveWithIssParameter(w, r, next)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// Count returns how many requests the OP has received for key: a grant type
// at the token endpoint ("authorization_code", "refresh_token",
// TokenExchangeGrantType, ...), or one of the Count constants for the other
// endpoints. Requests refused by SetDown are counted.
func (o *OP) Count(key string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.counts[key]
}

// ResetCounts sets every count to zero.
func (o *OP) ResetCounts() {
	o.mu.Lock()
	defer o.mu.Unlock()
	clear(o.counts)
}

// DisableUser makes the OP refuse the refresh tokens of u's grants with
// invalid_grant while disabled is true, as an IdP does for an account an admin
// disabled or a grant the user revoked.
func (o *OP) DisableUser(u User, disabled bool) {
	o.storage.mu.Lock()
	defer o.storage.mu.Unlock()
	o.storage.disabled[u.Subject] = disabled
}

// SetDown makes every request to the OP fail with 503 Service Unavailable
// while down is true.
func (o *OP) SetDown(down bool) { o.down.Store(down) }

// SetLatency delays every response of the OP by d, or until the client gives
// up; zero restores prompt answers.
func (o *OP) SetLatency(d time.Duration) { o.latency.Store(int64(d)) }

// SigningKey returns the private key the OP signs tokens with, with its key
// ID and algorithm (RS256 unless [WithSigningAlgorithm] chose another). Its
// public half is at JWKSURI.
func (o *OP) SigningKey() jose.JSONWebKey {
	k, err := o.storage.SigningKey(context.Background())
	if err != nil {
		panic(fmt.Sprintf("testenv: reading the OP's signing key: %v", err))
	}
	return jose.JSONWebKey{Key: k.Key(), KeyID: k.ID(), Algorithm: string(k.SignatureAlgorithm()), Use: "sig"}
}

// MintJWT signs claims exactly as given with the OP's own key and key ID, the
// way the OP signs its tokens. The OP itself knows nothing of the result:
// introspection calls it inactive. See AccessTokenClaims for a starting set.
func (o *OP) MintJWT(claims map[string]any) string {
	k, err := o.storage.SigningKey(context.Background())
	if err == nil {
		var signer jose.Signer
		if signer, err = op.SignerFromKey(k); err == nil {
			var jwt string
			if jwt, err = crypto.Sign(claims, signer); err == nil {
				return jwt
			}
		}
	}
	panic(fmt.Sprintf("testenv: minting a JWT: %v", err))
}

// AccessTokenClaims returns the claims of a valid access token of this OP for
// subject and audience, issued to NativeClientID (`client_id`, as the OP's own
// access tokens name their client) and expiring in 5 minutes, for a test to
// change before MintJWT.
func (o *OP) AccessTokenClaims(subject string, audience ...string) map[string]any {
	now := time.Now()
	jti := make([]byte, 16)
	rand.Read(jti)
	return map[string]any{
		"iss":       o.Issuer,
		"sub":       subject,
		"aud":       audience,
		"iat":       now.Unix(),
		"nbf":       now.Unix(),
		"exp":       now.Add(5 * time.Minute).Unix(),
		"jti":       hex.EncodeToString(jti),
		"client_id": NativeClientID,
	}
}
