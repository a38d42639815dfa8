package idp

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"math"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/caddy-mcp/oauth-broker/internal/tokencache"
)

// ErrInvalidToken means an access token was refused: malformed, badly signed, expired, not
// yet valid, issued by someone else, meant for another audience, or inactive. It maps to
// 401 invalid_token.
var ErrInvalidToken = errors.New("invalid token")

// VerifierConfig configures a Verifier. Zero values take the documented defaults.
type VerifierConfig struct {
	// Provider is the upstream identity provider whose tokens are accepted. Its discovery
	// document names the issuer, the JWKS and the introspection endpoint.
	Provider *Provider
	// Audiences are the accepted `aud` values (the resource URL and configured
	// audiences); a token's `aud` must contain at least one. Empty accepts no token.
	Audiences []string
	// ClientID and ClientSecret are the broker's credentials at the IdP, sent with
	// client_secret_basic to the RFC 7662 introspection endpoint. A token issued to
	// ClientID (`client_id` or `azp`) is never accepted: those are the broker's own ID
	// tokens, background tokens and delegated tokens, none meant for the MCP endpoint.
	ClientID, ClientSecret string
	// RequireAccessTokenType accepts a JWT only with RFC 9068's header `typ: at+jwt`,
	// for IdPs that set it. Default: off; a JWT without it must still look like an
	// access token (see checkTokenKind).
	RequireAccessTokenType bool
	// IntrospectionCacheTTL caps how long an active introspection answer is cached, so
	// that an opaque token revoked at the IdP is refused within it. Default: 5m.
	IntrospectionCacheTTL time.Duration
	// HTTPClient makes the JWKS and introspection requests. Default: a client with a
	// 10s timeout.
	HTTPClient *http.Client
	// CacheEntries bounds the number of cached verdicts. Default: 10000.
	CacheEntries int
	// InactiveTTL is how long a refusal (or an active opaque token without `exp`) is
	// cached. Default: 10s.
	InactiveTTL time.Duration
	// Leeway is the clock skew allowed past `exp`. Default: DefaultLeeway; negative means
	// none.
	// On a JWT's `nbf`, go-oidc allows 5 minutes of its own, less Leeway (it is given a
	// clock running Leeway behind).
	Leeway time.Duration
	// Now is the clock. Default: time.Now.
	Now func() time.Time

	// ColdVerifyRate is how many cold verifications (an introspection, a JWKS fetch) one
	// client address may cause a minute, and its burst; ColdVerifyRateGlobal the same for
	// all addresses together. Defaults: DefaultColdVerifyRate, DefaultColdVerifyRateGlobal;
	// negative means unlimited. See coldbudget.go.
	ColdVerifyRate, ColdVerifyRateGlobal int
	// ClientIP finds the client's address in a request's context, for the per-address
	// budget; "" when unknown. Default: none, every cold verification draws on the
	// global budget only.
	ClientIP func(ctx context.Context) string
	// Logger receives the one warning about a missing trusted_proxies. Default: none.
	Logger *zap.Logger
	// Timeout bounds one cold verification, every IdP request in it together (discovery,
	// the JWKS, introspection). It runs apart from the requests waiting for it, so it
	// needs a bound of its own. Default: 30s.
	Timeout time.Duration
}

// Defaults of VerifierConfig.
const (
	defaultInactiveTTL = 10 * time.Second
	// DefaultIntrospectionCacheTTL is VerifierConfig.IntrospectionCacheTTL's default.
	DefaultIntrospectionCacheTTL = 5 * time.Minute
	// DefaultLeeway is VerifierConfig.Leeway's default.
	DefaultLeeway          = 30 * time.Second
	defaultVerifierTimeout = 10 * time.Second
	// DefaultVerificationTimeout is VerifierConfig.Timeout's default.
	DefaultVerificationTimeout = 30 * time.Second

	// maxTokenLength refuses absurd tokens before hashing or sending them anywhere.
	maxTokenLength = 16 << 10
	// MaxIntrospectionBytes bounds the introspection response read (PostIntrospection).
	MaxIntrospectionBytes = 64 << 10
)

// supportedSigningAlgs is every asymmetric JWS algorithm go-oidc verifies (SECURITY.md W19): never
// `none`, never HMAC.
var supportedSigningAlgs = []string{
	oidc.RS256, oidc.RS384, oidc.RS512,
	oidc.PS256, oidc.PS384, oidc.PS512,
	oidc.ES256, oidc.ES384, oidc.ES512,
	oidc.EdDSA,
}

// Verifier checks the access tokens presented to the protected MCP endpoint: JWTs with
// go-oidc against the IdP's JWKS, anything else by RFC 7662 introspection. Verdicts are
// cached by a keyed hash of the token (tokencache.Index) and hold what tells the token
// from any other (the token, or its SHA-256), so a warm request costs a cheap hash, a map
// read and a comparison; a cold one is verified once for all concurrent callers
// presenting the same token. It is safe for concurrent use.
type Verifier struct {
	cfg VerifierConfig

	cache *tokencache.Cache[uint64, verdict]
	seed  maphash.Seed
	// collide, set only by a test (a fault), replaces tokencache.Index so that two
	// tokens share an index.
	collide func(raw string) uint64
	// flight runs one cold verification per token (keyed by its SHA-256) at a time.
	flight singleflight.Group

	jwt atomic.Pointer[jwtVerifier]

	budget *coldBudget
}

// verdict is a cached result: a principal or a refusal, and what tells the token it was
// found for from another under the same index: the token itself for a valid one of at
// most maxKeptToken bytes (a warm hit compares it), else only its SHA-256 (a hit hashes
// the token presented to compare). A refusal never keeps the token: a stranger's flood of
// made-up 16 KiB tokens costs the cache their digests, not their bytes.
type verdict struct {
	principal *Principal
	err       error
	digest    [sha256.Size]byte
	token     string
}

// maxKeptToken bounds the tokens a verdict keeps, and so the cache's memory: a full cache
// of the default 10,000 verdicts keeps at most 41 MB of tokens, the IdP's to issue, and
// ~7.5 MB of typical 750-byte JWTs.
const maxKeptToken = 4096

// index is raw's index in the cache.
func (v *Verifier) index(raw string) uint64 {
	if v.collide != nil {
		return v.collide(raw)
	}
	return tokencache.Index(v.seed, raw)
}

// jwtVerifier is go-oidc's verifier for one discovery document, with its key set.
type jwtVerifier struct {
	provider *oidc.Provider
	keys     *issuerKeys
	verifier *oidc.IDTokenVerifier
}

// NewVerifier builds a verifier. It does not touch the network.
func NewVerifier(cfg VerifierConfig) *Verifier {
	if cfg.CacheEntries <= 0 {
		cfg.CacheEntries = tokencache.DefaultEntries
	}
	if cfg.InactiveTTL <= 0 {
		cfg.InactiveTTL = defaultInactiveTTL
	}
	if cfg.IntrospectionCacheTTL <= 0 {
		cfg.IntrospectionCacheTTL = DefaultIntrospectionCacheTTL
	}
	switch {
	case cfg.Leeway == 0:
		cfg.Leeway = DefaultLeeway
	case cfg.Leeway < 0:
		cfg.Leeway = 0
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: defaultVerifierTimeout}
	}
	if cfg.ClientIP == nil {
		cfg.ClientIP = func(context.Context) string { return "" }
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultVerificationTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	cfg.Audiences = append([]string(nil), cfg.Audiences...)
	return &Verifier{
		cfg:    cfg,
		cache:  tokencache.New[uint64, verdict](cfg.CacheEntries),
		seed:   maphash.MakeSeed(),
		budget: newColdBudget(cfg.ColdVerifyRate, cfg.ColdVerifyRateGlobal, cfg.Logger),
	}
}

// Verify returns the principal a valid access token speaks for, or an error wrapping
// ErrInvalidToken (refuse with 401) or ErrUnavailable (answer 503; nothing is cached);
// one that is also a *RetryLaterError was turned away by the cold-verification budget
// (answer its status with Retry-After, never 401; see AsRetryLater).
// The principal is shared by every caller presenting the same token: read it, never
// modify it. Errors never contain the token.
func (v *Verifier) Verify(ctx context.Context, raw string) (*Principal, error) {
	p, _, err := v.VerifyDigest(ctx, raw)
	return p, err
}

// VerifyDigest is Verify that also returns the token's SHA-256 (tokencache.Key), so that
// a caller keeping its own cache of what the token buys (a delegated token) keys it
// without hashing the token itself: a warm verdict holds the digest computed when the
// token was first verified. The digest is zero when the token was refused for its size,
// before it was hashed.
func (v *Verifier) VerifyDigest(ctx context.Context, raw string) (*Principal, [sha256.Size]byte, error) {
	if raw == "" || len(raw) > maxTokenLength {
		return nil, [sha256.Size]byte{}, errTokenSize
	}
	index := v.index(raw)
	if vd, ok := v.lookup(index, raw, v.cfg.Now().UnixNano()); ok {
		return vd.principal, vd.digest, vd.err
	}
	key := tokencache.Key(raw)
	p, err := v.verifyCold(ctx, index, key, raw)
	return p, key, err
}

var errTokenSize = fmt.Errorf("checking access token size: %w", ErrInvalidToken)

// DeleteExpired drops the verdicts expired at now from the cache and returns how many: a
// full cache evicts them itself, a periodic sweep gives their memory back when it is not.
// It walks the cache under its lock: for a background sweep, never a request's path.
func (v *Verifier) DeleteExpired(now time.Time) int {
	return v.cache.DeleteExpired(now.UnixNano())
}

// lookup returns the cached verdict for raw, whose index is index, if one is still good
// at now. The index only finds the entry: the entry is raw's only if it holds raw, or
// raw's SHA-256. Comparing raw in variable time tells nothing a stranger can use: to reach
// the comparison at all a made-up token must share another's 64-bit keyed index.
func (v *Verifier) lookup(index uint64, raw string, now int64) (verdict, bool) {
	vd, ok := v.cache.Get(index, now)
	switch {
	case !ok:
		return verdict{}, false
	case vd.token != "":
		return vd, vd.token == raw
	}
	return vd, vd.digest == tokencache.Key(raw)
}

// verifyCold verifies a token not in the cache, once for all concurrent callers. The
// verification runs apart from any caller, under its own timeout: a caller that goes away
// returns at once without failing the others, and the verdict is still cached. It carries
// nothing of the caller's context but the client address its budget draws on, read here
// on the caller's goroutine: the request's context is not the verification's to read once
// its caller has returned.
func (v *Verifier) verifyCold(ctx context.Context, index uint64, key [sha256.Size]byte, raw string) (*Principal, error) {
	detached := context.WithValue(context.Background(), coldClientIPKey{}, v.cfg.ClientIP(ctx))
	for {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("%w: verifying access token: %w", ErrUnavailable, err)
		}
		led := false
		ch := v.flight.DoChan(string(key[:]), func() (any, error) {
			led = true
			return v.lead(detached, index, key, raw)
		})
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: waiting for token verification: %w", ErrUnavailable, ctx.Err())
		case res := <-ch:
			vd := res.Val.(verdict)
			// A budget refusal is the leader's, not the token's: the others try on their own.
			if !led && AsRetryLater(vd.err) != nil {
				continue
			}
			return vd.principal, vd.err
		}
	}
}

// coldClientIPKey carries the client address of the request that started a cold
// verification into it (verifyCold).
type coldClientIPKey struct{}

// lead runs one cold verification and caches its verdict. It returns the verdict as its
// value, never an error, so that the flight's callers read one result.
func (v *Verifier) lead(ctx context.Context, index uint64, key [sha256.Size]byte, raw string) (vd verdict, _ error) {
	defer func() {
		// go-oidc and go-jose parse what a stranger sent: a panic in them must fail this
		// verification, not the process (a flight runs on its own goroutine).
		if r := recover(); r != nil {
			v.cfg.Logger.Error("token verification panicked", zap.Any("panic", r), zap.StackSkip("stack", 1))
			vd = verdict{err: fmt.Errorf("%w: verifying access token: verification aborted", ErrUnavailable)}
		}
	}()
	// A flight that ended between the caller's cache miss and this one cached its verdict.
	if vd, ok := v.lookup(index, raw, v.cfg.Now().UnixNano()); ok {
		return vd, nil
	}
	ctx, cancel := context.WithTimeout(ctx, v.cfg.Timeout)
	defer cancel()
	p, err := v.verify(ctx, raw)
	now := v.cfg.Now()
	switch {
	case err == nil:
		until := p.Expiry
		if !LooksLikeJWS(raw) {
			// An opaque token can be revoked at the IdP: ask again after the cap.
			until = minTime(until, now.Add(v.cfg.IntrospectionCacheTTL))
		}
		if until.After(now) {
			valid := verdict{principal: p, digest: key}
			if len(raw) <= maxKeptToken {
				valid.token = strings.Clone(raw) // not the request's header, whatever else shares its memory
			}
			v.cache.Put(index, valid, until.UnixNano(), false, now.UnixNano())
		}
	case errors.Is(err, ErrInvalidToken) && !errors.Is(err, ErrUnavailable):
		// A refusal is disposable: a full cache evicts refusals before valid entries.
		v.cache.Put(index, verdict{err: err, digest: key}, now.Add(v.cfg.InactiveTTL).UnixNano(), true, now.UnixNano())
	}
	return verdict{principal: p, err: err, digest: key}, nil
}

// verify checks raw against the IdP, without the cache.
func (v *Verifier) verify(ctx context.Context, raw string) (*Principal, error) {
	if v.cfg.Provider == nil {
		return nil, fmt.Errorf("%w: verifying access token: no identity provider configured", ErrUnavailable)
	}
	d, err := v.cfg.Provider.Discovery(ctx)
	if err != nil {
		if errors.Is(err, ErrUnavailable) {
			return nil, fmt.Errorf("verifying access token: %w", err)
		}
		return nil, fmt.Errorf("%w: verifying access token: %w", ErrUnavailable, err)
	}
	if LooksLikeJWS(raw) {
		return v.verifyJWT(ctx, d, raw)
	}
	return v.introspect(ctx, d, raw)
}

// LooksLikeJWS tells whether raw has the shape of a compact JWS: three base64url parts
// whose first decodes to a JSON object. Such a token is only ever checked as a JWT.
func LooksLikeJWS(raw string) bool {
	header, rest, ok := strings.Cut(raw, ".")
	if !ok {
		return false
	}
	payload, sig, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(sig, ".") || payload == "" {
		return false
	}
	h, err := base64.RawURLEncoding.DecodeString(header)
	if err != nil {
		return false
	}
	var obj map[string]json.RawMessage
	return json.Unmarshal(h, &obj) == nil
}

// verifierFor returns go-oidc's verifier for discovery d, built once per document so
// its key set (and the cached JWKS) is reused.
func (v *Verifier) verifierFor(d *Discovery) *oidc.IDTokenVerifier {
	old := v.jwt.Load()
	if old != nil && old.provider == d.Provider {
		return old.verifier
	}
	// A refreshed discovery document naming the same JWKS keeps its keys and their
	// refetch limit.
	keys := newIssuerKeys(d.JWKSURI, v.cfg.HTTPClient, v.cfg.Now, v.admitCold)
	if old != nil && old.keys.url == d.JWKSURI {
		keys = old.keys
	}
	leeway := v.cfg.Leeway
	now := v.cfg.Now
	jv := &jwtVerifier{
		provider: d.Provider,
		keys:     keys,
		verifier: oidc.NewVerifier(d.Issuer, keys, &oidc.Config{
			SkipClientIDCheck:    true, // the audience is checked against Audiences below
			SupportedSigningAlgs: supportedSigningAlgs,
			// go-oidc allows no skew on exp: looking from Leeway ago allows it.
			Now: func() time.Time { return now().Add(-leeway) },
		}),
	}
	v.jwt.Store(jv)
	return jv.verifier
}

// keyFetchErrorKey marks the context slot where issuerKeys records why it could not
// fetch the keys: go-oidc flattens that error into text, and a down IdP or a spent budget
// must not read as a bad token.
type keyFetchErrorKey struct{}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// accessTokenClaims are the claims of a JWT access token beyond those go-oidc checks,
// with those that tell an ID token from an access token.
type accessTokenClaims struct {
	Scope    *ScopeList `json:"scope"`
	Scp      *ScopeList `json:"scp"`
	ClientID string     `json:"client_id"`
	Azp      string     `json:"azp"`

	Typ    string          `json:"typ"` // Keycloak: "Bearer" for access tokens, "ID" for ID tokens
	AtHash json.RawMessage `json:"at_hash"`
	CHash  json.RawMessage `json:"c_hash"`
	SHash  json.RawMessage `json:"s_hash"`
}

// jwsHeader is the part of a JWS header read besides what go-oidc checks.
type jwsHeader struct {
	Typ string `json:"typ"`
}

// checkTokenKind refuses a verified JWT that is not an access token for an MCP client
// (SECURITY.md, tokens of the wrong kind): an IdP that sets `aud` to the client id makes
// operators list client ids as audiences, and then that client's ID tokens would pass.
//
//   - header `typ` at+jwt (RFC 9068 §2.1) is an access token; any other typ but JWT
//     (logout+jwt, secevent+jwt, ...) is refused, and with RequireAccessTokenType
//     everything but at+jwt is;
//   - otherwise a payload `typ` other than Bearer (Keycloak's "ID"), an `at_hash`,
//     `c_hash` or `s_hash` (OIDC Core §3.1.3.6, §3.3.2.11; only ID tokens carry them),
//     or no `client_id`, `scope` or `scp` at all (an ID token has none of them at the
//     oidc app and at Keycloak) is refused. `nonce` and `auth_time` prove nothing:
//     Keycloak puts nonce in access tokens;
//   - a token whose `client_id` or `azp` is the broker's own client is refused: the
//     broker's ID tokens, its background and its delegated tokens.
func (v *Verifier) checkTokenKind(raw string, c *accessTokenClaims) error {
	var h jwsHeader
	if seg, _, ok := strings.Cut(raw, "."); ok {
		if b, err := base64.RawURLEncoding.DecodeString(seg); err == nil {
			_ = json.Unmarshal(b, &h)
		}
	}
	// RFC 7515 §4.1.9: "application/" may be left out; compared case-insensitively.
	typ := strings.ToLower(h.Typ)
	typ = strings.TrimPrefix(typ, "application/")
	switch {
	case typ == "at+jwt":
	case typ != "" && typ != "jwt":
		return fmt.Errorf("header typ %q is not an access token's", h.Typ)
	case v.cfg.RequireAccessTokenType:
		return errors.New("header typ is not at+jwt, which require_jwt_access_token_type requires")
	case c.Typ != "" && !strings.EqualFold(c.Typ, "Bearer"):
		return fmt.Errorf("typ claim %q is not an access token's", c.Typ)
	case c.AtHash != nil || c.CHash != nil || c.SHash != nil:
		return errors.New("at_hash, c_hash or s_hash: an ID token")
	case c.ClientID == "" && c.Scope == nil && c.Scp == nil:
		return errors.New("no client_id, scope or scp: not an access token")
	}
	if v.cfg.ClientID != "" && (c.ClientID == v.cfg.ClientID || c.Azp == v.cfg.ClientID) {
		return errors.New("issued to the broker's own client, not to an MCP client")
	}
	return nil
}

func (v *Verifier) verifyJWT(ctx context.Context, d *Discovery, raw string) (*Principal, error) {
	var fetchErr error
	tok, err := v.verifierFor(d).Verify(context.WithValue(ctx, keyFetchErrorKey{}, &fetchErr), raw)
	if fetchErr != nil {
		return nil, fmt.Errorf("%w: fetching the IdP's signing keys: %w", ErrUnavailable, fetchErr)
	}
	if err != nil {
		return nil, fmt.Errorf("verifying JWT access token: %w: %v", ErrInvalidToken, err)
	}
	if tok.Subject == "" {
		return nil, fmt.Errorf("verifying JWT access token: %w: no sub", ErrInvalidToken)
	}
	if !v.audienceAccepted(tok.Audience) {
		return nil, fmt.Errorf("verifying JWT access token: %w: aud %q names none of the accepted audiences", ErrInvalidToken, tok.Audience)
	}
	var c accessTokenClaims
	if err := tok.Claims(&c); err != nil {
		return nil, fmt.Errorf("verifying JWT access token: %w: decoding claims: %v", ErrInvalidToken, err)
	}
	if err := v.checkTokenKind(raw, &c); err != nil {
		return nil, fmt.Errorf("verifying JWT access token: %w: %v", ErrInvalidToken, err)
	}
	p := &Principal{
		Subject:  tok.Subject,
		ClientID: c.ClientID,
		Audience: tok.Audience,
		Expiry:   tok.Expiry,
	}
	if p.ClientID == "" {
		p.ClientID = c.Azp
	}
	switch {
	case c.Scope != nil:
		p.Scopes = *c.Scope
	case c.Scp != nil:
		p.Scopes = *c.Scp
	}
	return p, nil
}

// audienceAccepted tells whether aud names one of the accepted audiences.
func (v *Verifier) audienceAccepted(aud []string) bool {
	for _, a := range aud {
		for _, want := range v.cfg.Audiences {
			if a == want {
				return true
			}
		}
	}
	return false
}

// IntrospectionResponse is the RFC 7662 §2.2 answer.
type IntrospectionResponse struct {
	Active    bool       `json:"active"`
	Scope     *ScopeList `json:"scope"`
	ClientID  string     `json:"client_id"`
	TokenType string     `json:"token_type"`
	Exp       *float64   `json:"exp"`
	Nbf       *float64   `json:"nbf"`
	Sub       string     `json:"sub"`
	Aud       Audience   `json:"aud"`
	Iss       string     `json:"iss"`
}

// PostIntrospection asks endpoint about token (RFC 7662) with the broker's credentials
// and reads at most MaxIntrospectionBytes+1 bytes of the answer. err is a failure to reach
// the IdP or to read its answer; the status is the caller's to judge.
func PostIntrospection(ctx context.Context, hc *http.Client, endpoint, clientID, clientSecret, token string) (status int, body []byte, err error) {
	form := url.Values{"token": {token}, "token_type_hint": {"access_token"}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return 0, nil, fmt.Errorf("building introspection request: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	// RFC 6749 §2.3.1: the credentials are form-encoded before Basic encoding.
	req.SetBasicAuth(url.QueryEscape(clientID), url.QueryEscape(clientSecret))
	resp, err := hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(io.LimitReader(resp.Body, MaxIntrospectionBytes+1))
	if err != nil {
		return 0, nil, fmt.Errorf("reading introspection response: %w", err)
	}
	return resp.StatusCode, body, nil
}

// introspect asks the IdP about an opaque token (RFC 7662).
func (v *Verifier) introspect(ctx context.Context, d *Discovery, raw string) (*Principal, error) {
	if d.IntrospectionEndpoint == "" {
		return nil, fmt.Errorf("verifying opaque access token: %w: the IdP advertises no introspection endpoint", ErrInvalidToken)
	}
	if err := v.admitCold(ctx); err != nil {
		return nil, fmt.Errorf("%w: introspecting access token: %w", ErrUnavailable, err)
	}
	status, body, err := PostIntrospection(ctx, v.cfg.HTTPClient, d.IntrospectionEndpoint, v.cfg.ClientID, v.cfg.ClientSecret, raw)
	if err != nil {
		return nil, fmt.Errorf("%w: introspecting access token: %w", ErrUnavailable, err)
	}
	// RFC 7662 answers 200 for every token, active or not; anything else is the IdP's
	// trouble or the broker's credentials, never the token's.
	if status != http.StatusOK {
		return nil, fmt.Errorf("%w: introspecting access token: the IdP answered %d", ErrUnavailable, status)
	}
	if len(body) > MaxIntrospectionBytes {
		return nil, fmt.Errorf("%w: introspecting access token: response larger than %d bytes", ErrUnavailable, MaxIntrospectionBytes)
	}
	var ir IntrospectionResponse
	if err := json.Unmarshal(body, &ir); err != nil {
		return nil, fmt.Errorf("%w: decoding introspection response: %w", ErrUnavailable, err)
	}

	const doing = "introspecting access token"
	now := v.cfg.Now()
	switch {
	case !ir.Active:
		return nil, fmt.Errorf("%s: %w: inactive", doing, ErrInvalidToken)
	case ir.Sub == "":
		return nil, fmt.Errorf("%s: %w: no sub", doing, ErrInvalidToken)
	case ir.Iss != "" && ir.Iss != d.Issuer:
		return nil, fmt.Errorf("%s: %w: issued by %q, not %q", doing, ErrInvalidToken, ir.Iss, d.Issuer)
	case ir.TokenType != "" && !strings.EqualFold(ir.TokenType, "Bearer"):
		return nil, fmt.Errorf("%s: %w: token_type %q is not a bearer access token", doing, ErrInvalidToken, ir.TokenType)
	case !v.audienceAccepted(ir.Aud):
		return nil, fmt.Errorf("%s: %w: aud %q names none of the accepted audiences", doing, ErrInvalidToken, []string(ir.Aud))
	case v.cfg.ClientID != "" && ir.ClientID == v.cfg.ClientID:
		return nil, fmt.Errorf("%s: %w: issued to the broker's own client, not to an MCP client", doing, ErrInvalidToken)
	case ir.Nbf != nil && unixTime(*ir.Nbf).After(now.Add(v.cfg.Leeway)):
		return nil, fmt.Errorf("%s: %w: not valid before %v", doing, ErrInvalidToken, unixTime(*ir.Nbf))
	}
	// Without exp the answer is trusted only briefly; with it, never past it.
	expiry := now.Add(v.cfg.InactiveTTL)
	if ir.Exp != nil {
		exp := unixTime(*ir.Exp)
		if !exp.Add(v.cfg.Leeway).After(now) {
			return nil, fmt.Errorf("%s: %w: expired at %v", doing, ErrInvalidToken, exp)
		}
		expiry = exp
	}
	p := &Principal{
		Subject:  ir.Sub,
		ClientID: ir.ClientID,
		Audience: ir.Aud,
		Expiry:   expiry,
	}
	if ir.Scope != nil {
		p.Scopes = *ir.Scope
	}
	return p, nil
}

// admitCold draws one cold verification on the budget of the client whose request started
// it (verifyCold put its address in ctx).
func (v *Verifier) admitCold(ctx context.Context) error {
	ip, _ := ctx.Value(coldClientIPKey{}).(string)
	return v.budget.admit(ip, v.cfg.Now())
}

// unixTime reads a NumericDate (RFC 7519 §2), which may have a fraction.
func unixTime(secs float64) time.Time {
	whole, frac := math.Modf(secs)
	return time.Unix(int64(whole), int64(frac*float64(time.Second)))
}

// ScopeList reads a scope claim written as a space-separated string (`scope`, RFC 8693
// §4.2, RFC 7662) or as an array (`scp`).
type ScopeList []string

func (s *ScopeList) UnmarshalJSON(b []byte) error {
	list, err := stringOrList(b, "scope", strings.Fields)
	if err != nil {
		return err
	}
	*s = list
	return nil
}

// Audience reads `aud`, a string or an array of strings (RFC 7519 §4.1.3).
type Audience []string

func (a *Audience) UnmarshalJSON(b []byte) error {
	list, err := stringOrList(b, "aud", func(str string) []string { return []string{str} })
	if err != nil {
		return err
	}
	*a = list
	return nil
}

// stringOrList reads a claim written as a string, which fromString turns into the list,
// or as an array of strings; null is the empty list.
func stringOrList(b []byte, claim string, fromString func(string) []string) ([]string, error) {
	if len(b) > 0 && b[0] == '"' {
		var str string
		if err := json.Unmarshal(b, &str); err != nil {
			return nil, err
		}
		return fromString(str), nil
	}
	var list []string
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("%s: want a string or an array of strings: %w", claim, err)
	}
	return list, nil
}
