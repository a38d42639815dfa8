package flows

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	jose "github.com/go-jose/go-jose/v4"
	"go.uber.org/zap"

	"github.com/caddy-mcp/oauth-broker/idp"
)

// The JWT bearer grant (RFC 7523 §2.1) redeeming Identity Assertion JWT Authorization
// Grants (ID-JAGs): MCP's Enterprise-Managed Authorization extension, on
// draft-ietf-oauth-identity-assertion-authz-grant. A client that signed its user in at
// the enterprise's IdP exchanges the ID token there for an ID-JAG naming this broker
// (`aud`), this MCP server (`resource`), itself (`client_id`) and the scopes the
// enterprise's policy allows; the broker checks it against the issuers it is configured
// to trust and issues its own access token, with no consent page and no IdP login of the
// broker's. The session behind it has no IdP grant (Session.EnterpriseIssuer), so only
// delegation modes that need none serve it (New refuses the others).
//
// No refresh token is issued (the draft's SHOULD NOT): a new access token takes a new
// ID-JAG, so the enterprise IdP's policy decides again at least once per access token
// lifetime. A jti is redeemed once (RFC 7523 §3 item 7), across the cluster
// (store_assertion_id.go).

const (
	grantJWTBearer = "urn:ietf:params:oauth:grant-type:jwt-bearer"
	// idJAGType is the `typ` header an ID-JAG must carry (RFC 8725 §3.11).
	idJAGType = "oauth-id-jag+jwt"
	// idJAGProfile names the ID-JAG profile in AS metadata's
	// authorization_grant_profiles_supported.
	idJAGProfile = "urn:ietf:params:oauth:grant-profile:id-jag"
	// maxAssertionBytes bounds an assertion before anything parses it.
	maxAssertionBytes = 16 << 10
	// maxAssertionLifetime refuses assertions valid unreasonably far ahead (RFC 7523 §3
	// item 4 allows it): an ID-JAG lives minutes, and its jti is stored until it expires.
	maxAssertionLifetime = time.Hour
	// assertionLeeway is the clock skew allowed between the issuer and the broker.
	assertionLeeway = 30 * time.Second
)

// DefaultEnterpriseAlgorithms are the signature algorithms accepted from an enterprise
// issuer that names none.
var DefaultEnterpriseAlgorithms = []string{oidc.RS256, oidc.ES256}

// enterpriseAlgorithms are the algorithms an enterprise issuer may be configured with:
// asymmetric only, so that no shared secret (HS256) nor an unsigned JWT (none) can ever
// pass.
var enterpriseAlgorithms = []string{
	oidc.RS256, oidc.RS384, oidc.RS512, oidc.PS256, oidc.PS384, oidc.PS512,
	oidc.ES256, oidc.ES384, oidc.ES512, oidc.EdDSA,
}

// enterpriseIssuer is a trusted issuer of ID-JAGs with its verifier.
type enterpriseIssuer struct {
	cfg      EnterpriseIssuer
	algs     []jose.SignatureAlgorithm
	verifier *oidc.IDTokenVerifier
}

// newEnterpriseIssuers checks cfg.EnterpriseIssuers and builds their verifiers, on the
// clock now.
func newEnterpriseIssuers(cfg *Config, now func() time.Time) (map[string]*enterpriseIssuer, error) {
	if len(cfg.EnterpriseIssuers) == 0 {
		return nil, nil
	}
	if cfg.Mode != ModeHybrid {
		return nil, errors.New("enterprise_managed: needs mode hybrid, where the broker issues its own tokens")
	}
	switch cfg.DelegationMode {
	case DelegationNone:
	case DelegationAppPassword:
		if c := cfg.AppPassword.UserClaim; c != "" && c != "sub" {
			// The claim is read from the login's ID token, which such a session lacks.
			return nil, fmt.Errorf("enterprise_managed: sessions from ID-JAGs have no ID token to read user_claim %q from; use user_claim sub", c)
		}
	default:
		return nil, errors.New("enterprise_managed: sessions from ID-JAGs hold no identity provider grant, which delegation " +
			delegationName(cfg.DelegationMode) + " needs; use delegation none or app_password")
	}
	out := make(map[string]*enterpriseIssuer, len(cfg.EnterpriseIssuers))
	for _, ic := range cfg.EnterpriseIssuers {
		if err := checkEnterpriseIssuer(cfg, &ic); err != nil {
			return nil, err
		}
		if out[ic.Issuer] != nil {
			return nil, fmt.Errorf("enterprise_managed: issuer %s is configured twice", ic.Issuer)
		}
		// One prefix that begins another would let one issuer's user "-eu:bob" under
		// "acme" be another's "bob" under "acme-eu:": one subject for two people.
		for _, other := range out {
			p, q := ic.SubjectPrefix, other.cfg.SubjectPrefix
			if p != "" && q != "" && (strings.HasPrefix(p, q) || strings.HasPrefix(q, p)) {
				return nil, fmt.Errorf("enterprise_managed: the subject_prefix %q of issuer %s and %q of issuer %s overlap; give each issuer a prefix that begins no other", p, ic.Issuer, q, other.cfg.Issuer)
			}
		}
		ei := &enterpriseIssuer{cfg: ic}
		for _, a := range ic.Algorithms {
			ei.algs = append(ei.algs, jose.SignatureAlgorithm(a))
		}
		keys := idp.NewKeySet(ic.JWKSURI, cfg.HTTPClient, now)
		ei.verifier = oidc.NewVerifier(ic.Issuer, keys, &oidc.Config{
			SkipClientIDCheck:    true, // aud is the broker's issuer, checked in checkAssertion
			SupportedSigningAlgs: ic.Algorithms,
			// go-oidc allows no skew on exp: looking from the leeway ago allows it.
			Now: func() time.Time { return now().Add(-assertionLeeway) },
		})
		out[ic.Issuer] = ei
	}
	return out, nil
}

// checkEnterpriseIssuer checks one issuer's configuration and fills in its defaults.
func checkEnterpriseIssuer(cfg *Config, ic *EnterpriseIssuer) error {
	if !absoluteHTTPURL(ic.Issuer) {
		return fmt.Errorf("enterprise_managed: issuer %q: want an absolute http(s) URL", ic.Issuer)
	}
	if !absoluteHTTPURL(ic.JWKSURI) {
		return fmt.Errorf("enterprise_managed: issuer %s: jwks_uri %q: want an absolute http(s) URL", ic.Issuer, ic.JWKSURI)
	}
	if len(ic.Algorithms) == 0 {
		ic.Algorithms = DefaultEnterpriseAlgorithms
	}
	for _, a := range ic.Algorithms {
		if !slices.Contains(enterpriseAlgorithms, a) {
			return fmt.Errorf("enterprise_managed: issuer %s: algorithm %q: want one of %s", ic.Issuer, a, strings.Join(enterpriseAlgorithms, ", "))
		}
	}
	if cfg.DelegationMode == DelegationAppPassword && strings.Contains(ic.SubjectPrefix, ":") {
		// The subject is the user name of Basic credentials, which cannot hold a colon
		// (RFC 7617 §2).
		return fmt.Errorf("enterprise_managed: issuer %s: subject_prefix %q: no colon with delegation app_password, where the subject is a Nextcloud user name", ic.Issuer, ic.SubjectPrefix)
	}
	own := strings.TrimSuffix(ic.Issuer, "/") == strings.TrimSuffix(cfg.Issuer, "/")
	if ic.SubjectPrefix == "" && !own {
		return fmt.Errorf("enterprise_managed: issuer %s is not the identity provider's (%s): set subject_prefix, so that its users' subjects cannot be taken for the identity provider's", ic.Issuer, cfg.Issuer)
	}
	return nil
}

// absoluteHTTPURL tells whether s is an absolute http or https URL with a host.
func absoluteHTTPURL(s string) bool {
	u, err := url.Parse(s)
	return err == nil && (u.Scheme == "https" || u.Scheme == "http") && u.Host != "" && u.User == nil && u.Fragment == ""
}

// delegationName is a delegation mode as the configuration spells it.
func delegationName(mode string) string {
	if mode == "" {
		return "token_exchange (the default)"
	}
	return mode
}

// idJAGClaims are the claims of an ID-JAG beyond those go-oidc reads.
type idJAGClaims struct {
	ClientID string          `json:"client_id"`
	JTI      string          `json:"jti"`
	Resource json.RawMessage `json:"resource"`
	Scope    *string         `json:"scope"`
	Cnf      json.RawMessage `json:"cnf"`
}

// assertion is a verified ID-JAG.
type assertion struct {
	issuer   *enterpriseIssuer
	subject  string
	jti      string
	expiry   time.Time
	scopes   []string // nil: the claim was absent
	resource string
}

// jwtBearerGrant is the JWT bearer grant for ID-JAGs (see the top of this file). Client
// authentication has been done by the token endpoint; this grant is for confidential
// clients only (draft-ietf-oauth-identity-assertion-authz-grant, Security
// Considerations): a public client's id authenticates nobody.
func (b *Broker) jwtBearerGrant(r *http.Request, form url.Values, client *Client) (TokenResponse, error) {
	if client.AuthMethod == AuthMethodNone {
		return TokenResponse{}, errUnauthorizedClient("the jwt-bearer grant is for confidential clients")
	}
	raw := form.Get("assertion")
	if raw == "" {
		return TokenResponse{}, errInvalidRequest("assertion is required")
	}
	resource, ok := singleResource(form)
	if !ok || (resource != "" && !sameResource(resource, b.cfg.Resource)) {
		return TokenResponse{}, errInvalidTarget("resource must name this server once")
	}
	a, err := b.checkAssertion(r.Context(), raw, client)
	if err != nil {
		return TokenResponse{}, err
	}
	scopes, err := b.assertedScopes(client, a, form)
	if err != nil {
		return TokenResponse{}, err
	}
	ctx := context.WithoutCancel(r.Context()) // a claimed jti's tokens must be written whole
	switch err := b.assertionIDs.claim(ctx, a.issuer.cfg.Issuer, a.jti, a.expiry.Add(assertionLeeway)); {
	case errors.Is(err, errAssertionReplayed):
		b.count(TokenReuseDetected)
		b.log.token.Warn("ID-JAG presented again", zap.String("client_id", client.ID),
			zap.String("issuer", a.issuer.cfg.Issuer), zap.String("jti", Fingerprint(a.jti)))
		b.audit(auditReuseDetected, clientIP(r), zap.String("token_type", "id_jag"), zap.String("client_id", client.ID),
			zap.String("issuer", a.issuer.cfg.Issuer), zap.String("jti", Fingerprint(a.jti)))
		return TokenResponse{}, errInvalidGrant("the assertion was already used")
	case errors.Is(err, errAssertionIDInvalid):
		return TokenResponse{}, errInvalidGrant("the assertion's jti is missing or too long")
	case err != nil:
		return TokenResponse{}, errStorage("recording the assertion", err)
	}

	subject := a.issuer.cfg.SubjectPrefix + a.subject
	s, err := b.sessions.createFromAssertion(ctx, subject, client.ID, a.issuer.cfg.Issuer, scopes, b.cfg.AccessTokenTTL)
	if err != nil {
		return TokenResponse{}, errStorage("creating session", err)
	}
	b.noteAppPasswordSession(ctx, subject, s.ID) // S1.29: the user's app password outlives this session's revocation while others live
	family := randomToken()
	if err := b.families.start(ctx, TokenFamily{ID: family, SessionID: s.ID, ClientID: client.ID}); err != nil {
		return TokenResponse{}, errStorage("starting token family", err)
	}
	resp, err := b.families.issue(ctx, tokenGrant{
		FamilyID:   family,
		SessionID:  s.ID,
		Subject:    subject,
		ClientID:   client.ID,
		Resource:   b.cfg.Resource,
		Scopes:     scopes,
		AccessOnly: true,
	})
	if err != nil {
		return TokenResponse{}, errStorage("issuing broker tokens", err)
	}
	b.count(TokenIssued)
	b.log.token.Info("issued a broker access token for an ID-JAG", zap.String("client_id", client.ID),
		zap.String("issuer", a.issuer.cfg.Issuer), zap.String("family", Fingerprint(family)))
	b.audit(auditSessionCreated, clientIP(r), zap.String("subject", subject), zap.String("client_id", client.ID),
		zap.String("issuer", a.issuer.cfg.Issuer), zap.String("grant_type", grantJWTBearer), zap.Strings("scopes", scopes))
	b.renewRegistration(ctx, client)
	return resp, nil
}

// checkAssertion verifies an ID-JAG presented by client: a trusted issuer, its typ, an
// allowed algorithm, the issuer's signature, exp and iat, the broker as its only
// audience, this server as its resource, client as its client, and no proof of
// possession asked (the broker takes no DPoP). Every refusal is invalid_grant; an issuer
// whose keys cannot be fetched is the broker's trouble (503).
func (b *Broker) checkAssertion(ctx context.Context, raw string, client *Client) (*assertion, error) {
	bad := func(description string, cause error) error {
		b.log.token.Info("ID-JAG refused", zap.String("client_id", client.ID), zap.String("reason", description), zap.Error(cause))
		return errInvalidGrant(description)
	}
	if len(raw) > maxAssertionBytes {
		return nil, bad("the assertion is too large", nil)
	}
	// The issuer's verifier is chosen by the unverified iss, which it then checks.
	jws, err := jose.ParseSignedCompact(raw, signatureAlgorithms)
	if err != nil || len(jws.Signatures) != 1 {
		return nil, bad("the assertion is not a JWT signed with an accepted algorithm", err)
	}
	var head struct {
		Issuer string `json:"iss"`
	}
	if err := json.Unmarshal(jws.UnsafePayloadWithoutVerification(), &head); err != nil {
		return nil, bad("the assertion's claims are not a JSON object", err)
	}
	ei := b.enterprise[head.Issuer]
	if ei == nil {
		return nil, bad("the assertion's issuer is not trusted", fmt.Errorf("issuer %.200q", head.Issuer))
	}
	sig := jws.Signatures[0].Header
	if !slices.Contains(ei.algs, jose.SignatureAlgorithm(sig.Algorithm)) {
		return nil, bad("the assertion's algorithm is not accepted from its issuer", fmt.Errorf("alg %.20q", sig.Algorithm))
	}
	if typ, _ := sig.ExtraHeaders[jose.HeaderType].(string); !isIDJAGType(typ) {
		return nil, bad("the assertion's typ is not "+idJAGType, nil)
	}
	vctx, fetchErr := idp.KeyFetchSlot(ctx)
	tok, err := ei.verifier.Verify(vctx, raw)
	if err != nil {
		var retry *idp.RetryLaterError
		switch {
		case *fetchErr != nil && !errors.As(*fetchErr, &retry):
			return nil, errUnavailable("fetching the enterprise issuer's signing keys", *fetchErr)
		case *fetchErr != nil:
			// Fetched moments ago, and no key of that id: a forgery, or a key too new.
			return nil, bad("no signing key of the issuer verifies the assertion", *fetchErr)
		}
		var expired *oidc.TokenExpiredError
		if errors.As(err, &expired) {
			return nil, bad("the assertion has expired", nil)
		}
		return nil, bad("the assertion's signature or claims are invalid", err)
	}
	var c idJAGClaims
	if err := tok.Claims(&c); err != nil {
		return nil, bad("the assertion's claims are malformed", err)
	}
	now := b.now()
	switch {
	case !validAssertedSubject(tok.Subject):
		return nil, bad("the assertion's sub is missing, too long or holds control characters", nil)
	case len(tok.Audience) != 1 || tok.Audience[0] != b.issuer:
		// A string, or an array of exactly one: this broker's issuer.
		return nil, bad("the assertion's audience is not this authorization server", nil)
	case c.ClientID != client.ID:
		return nil, bad("the assertion was issued for another client", nil)
	case tok.IssuedAt.IsZero():
		return nil, bad("the assertion has no iat", nil)
	case tok.IssuedAt.After(now.Add(assertionLeeway)):
		return nil, bad("the assertion was issued in the future", nil)
	case tok.Expiry.Sub(now) > maxAssertionLifetime:
		return nil, bad("the assertion is valid too far into the future", nil)
	case len(c.Cnf) > 0 && string(c.Cnf) != "null":
		return nil, bad("the assertion asks for proof of possession, which this server does not support", nil)
	case c.JTI == "" || len(c.JTI) > maxAssertionIDBytes:
		return nil, bad("the assertion's jti is missing or too long", nil)
	}
	resource, ok := b.assertedResource(c.Resource)
	if !ok {
		return nil, bad("the assertion's resource is not this server", nil)
	}
	a := &assertion{issuer: ei, subject: tok.Subject, jti: c.JTI, expiry: tok.Expiry, resource: resource}
	if c.Scope != nil {
		a.scopes = strings.Fields(*c.Scope)
	}
	return a, nil
}

// maxSubjectLen bounds an asserted sub (OIDC Core §2 bounds sub to 255 ASCII characters).
const maxSubjectLen = 255

// validAssertedSubject tells whether sub can be the broker's subject: it travels in the
// subject header and in Basic credentials, so no control characters.
func validAssertedSubject(sub string) bool {
	if sub == "" || len(sub) > maxSubjectLen {
		return false
	}
	for _, r := range sub {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

// signatureAlgorithms are every algorithm an enterprise issuer may be configured with,
// for go-jose's parse; each issuer's own list is checked after.
var signatureAlgorithms = func() []jose.SignatureAlgorithm {
	out := make([]jose.SignatureAlgorithm, len(enterpriseAlgorithms))
	for i, a := range enterpriseAlgorithms {
		out[i] = jose.SignatureAlgorithm(a)
	}
	return out
}()

// isIDJAGType tells whether a typ header names an ID-JAG: media types compare without
// letter case, and "application/" may be left out (RFC 7515 §4.1.9).
func isIDJAGType(typ string) bool {
	typ = strings.ToLower(typ)
	return typ == idJAGType || typ == "application/"+idJAGType
}

// assertedResource reads an ID-JAG's resource claim, a string or an array of them, which
// the extension requires: one of them must name this server (RFC 8707 §2; the others are
// not granted).
func (b *Broker) assertedResource(claim json.RawMessage) (string, bool) {
	var list []string
	var one string
	switch {
	case len(claim) == 0:
		return "", false
	case json.Unmarshal(claim, &one) == nil:
		list = []string{one}
	case json.Unmarshal(claim, &list) != nil:
		return "", false
	}
	for _, r := range list {
		if sameResource(r, b.cfg.Resource) {
			return b.cfg.Resource, true
		}
	}
	return "", false
}

// assertedScopes decides the scopes granted for an ID-JAG: those the client asked (all
// it may have when it asked none) within those the assertion grants, within the issuer's
// configured scopes and those the client may have (RFC 6749 §3.3: the response names
// them). An assertion without a scope claim grants what an authorization request without
// scope would. Asking only for scopes it cannot get is invalid_scope.
func (b *Broker) assertedScopes(client *Client, a *assertion, form url.Values) ([]string, error) {
	asserted := a.scopes
	if asserted == nil {
		asserted, _ = b.grantableScopes(client, nil)
	}
	if len(asserted) > maxScopes {
		return nil, errInvalidGrant("the assertion names too many scopes")
	}
	asked := asserted
	if form.Has("scope") {
		asked = strings.Fields(form.Get("scope"))
		if len(asked) == 0 || len(asked) > maxScopes {
			return nil, errInvalidScope("scope must name at least one scope")
		}
	}
	configured := append([]string{"openid"}, b.offer().scopes...)
	out := make([]string, 0, len(asked))
	for _, s := range asked {
		switch {
		case s == "offline_access", slices.Contains(out, s):
		case !slices.Contains(asserted, s), !slices.Contains(configured, s), !b.clientAllows(client, []string{s}):
		case len(a.issuer.cfg.Scopes) > 0 && !slices.Contains(a.issuer.cfg.Scopes, s):
		default:
			out = append(out, s)
		}
	}
	if len(out) == 0 {
		return nil, errInvalidScope("none of the scopes asked is granted by the assertion for this client")
	}
	return out, nil
}
