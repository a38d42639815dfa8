package flows

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// enterpriseIdP is an enterprise identity provider as far as the broker sees one: a
// signing key whose public half is served as a JWKS over HTTP, and the ID-JAGs it signs.
type enterpriseIdP struct {
	t      *testing.T
	issuer string
	key    *ecdsa.PrivateKey
	srv    *httptest.Server
}

const enterpriseKeyID = "ent-1"

func startEnterpriseIdP(t *testing.T) *enterpriseIdP {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	e := &enterpriseIdP{t: t, key: key}
	e.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/jwks" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{
			Key: &key.PublicKey, KeyID: enterpriseKeyID, Algorithm: string(jose.ES256), Use: "sig",
		}}})
	}))
	t.Cleanup(e.srv.Close)
	e.issuer = e.srv.URL
	return e
}

// claims are those of a valid ID-JAG for clientID at the test broker, issued now.
func (e *enterpriseIdP) claims(now time.Time, clientID string) map[string]any {
	return map[string]any{
		"iss":       e.issuer,
		"sub":       "alice",
		"aud":       "https://mcp.example.test",
		"resource":  testResource,
		"client_id": clientID,
		"jti":       randomToken(),
		"iat":       now.Unix(),
		"exp":       now.Add(5 * time.Minute).Unix(),
		"scope":     "notes:read",
	}
}

// sign signs claims with key as alg, under kid and typ (none: no typ header).
func sign(t *testing.T, claims map[string]any, alg jose.SignatureAlgorithm, key any, kid, typ string) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithHeader(jose.HeaderKey("kid"), kid)
	if typ != "" {
		opts = opts.WithType(jose.ContentType(typ))
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, opts)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// mint signs claims as the enterprise IdP does.
func (e *enterpriseIdP) mint(claims map[string]any) string {
	return sign(e.t, claims, jose.ES256, e.key, enterpriseKeyID, idJAGType)
}

// emaEnv is a tokenEnv trusting one enterprise IdP, with a confidential client registered
// for the JWT bearer grant.
type emaEnv struct {
	*tokenEnv
	ent            *enterpriseIdP
	client, secret string
}

func newEMAEnv(t *testing.T, change func(*Config)) *emaEnv {
	t.Helper()
	ent := startEnterpriseIdP(t)
	e := newTokenEnv(t, testenv.SharedOP(t), func(c *Config) {
		c.Registration = true
		c.EnterpriseIssuers = []EnterpriseIssuer{{Issuer: ent.issuer, JWKSURI: ent.issuer + "/jwks", Algorithms: []string{"ES256"}, SubjectPrefix: "acme:"}}
		if change != nil {
			change(c)
		}
	})
	info := registerClient(t, e.b, `{"client_name":"Agent","redirect_uris":["http://127.0.0.1/callback"],"token_endpoint_auth_method":"client_secret_basic","grant_types":["authorization_code","`+grantJWTBearer+`"]}`)
	e.remember(info.ClientSecret)
	return &emaEnv{tokenEnv: e, ent: ent, client: info.ClientID, secret: info.ClientSecret}
}

// redeem presents assertion at the token endpoint as the registered client, with extra
// form fields.
func (e *emaEnv) redeem(t *testing.T, assertion string, extra url.Values) endpointReply {
	t.Helper()
	e.remember(assertion)
	form := url.Values{"grant_type": {grantJWTBearer}, "assertion": {assertion}}
	for k, v := range extra {
		form[k] = v
	}
	h := http.Header{}
	h.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(url.QueryEscape(e.client)+":"+url.QueryEscape(e.secret))))
	return e.post(t, pathToken, form, h)
}

func TestJWTBearerRedeemsAnIDJAG(t *testing.T) {
	e := newEMAEnv(t, nil)
	res := e.redeem(t, e.ent.mint(e.ent.claims(e.clock.Now(), e.client)), nil)
	tok := res.wantTokens(t)
	if !strings.HasPrefix(tok.AccessToken, accessTokenPrefix) || tok.RefreshToken != "" || tok.Scope != "notes:read" || tok.TokenType != "Bearer" {
		t.Errorf("token response: type %q scope %q refresh token %v", tok.TokenType, tok.Scope, tok.RefreshToken != "")
	}

	p, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken)
	if err != nil {
		t.Fatal(err)
	}
	s, err := e.b.loadSession(t.Context(), p.SessionID)
	if err != nil {
		t.Fatal(err)
	}
	if p.Subject != "acme:alice" || p.ClientID != e.client || s.EnterpriseIssuer != e.ent.issuer || s.Grant != "" {
		t.Errorf("principal %+v, session issuer %q, grant %q", p, s.EnterpriseIssuer, s.Grant)
	}

	e.up.Reset()
	cs := connect(t, e.front.URL, tok.AccessToken)
	out, err := cs.CallTool(t.Context(), &mcp.CallToolParams{Name: "whoami"})
	if err != nil || out.IsError {
		t.Fatalf("whoami: %v %+v", err, out)
	}
	var who testenv.Identity
	if err := json.Unmarshal([]byte(out.Content[0].(*mcp.TextContent).Text), &who); err != nil {
		t.Fatal(err)
	}
	if who.Subject != "acme:alice" {
		t.Errorf("upstream saw subject %q, want acme:alice", who.Subject)
	}
}

func TestJWTBearerRefusesBadAssertions(t *testing.T) {
	e := newEMAEnv(t, nil)
	now := e.clock.Now()
	otherKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	changed := func(change func(c map[string]any)) string {
		c := e.ent.claims(now, e.client)
		change(c)
		return e.ent.mint(c)
	}
	unsigned := func() string {
		enc := base64.RawURLEncoding.EncodeToString
		head, _ := json.Marshal(map[string]string{"alg": "none", "typ": idJAGType})
		body, _ := json.Marshal(e.ent.claims(now, e.client))
		return enc(head) + "." + enc(body) + "."
	}

	for _, tc := range []struct {
		name      string
		assertion string
		status    int
		code      string
	}{
		{"forged: signed by another key under the issuer's key id", sign(t, e.ent.claims(now, e.client), jose.ES256, otherKey, enterpriseKeyID, idJAGType), 400, "invalid_grant"},
		{"forged: signed by a key the issuer never published", sign(t, e.ent.claims(now, e.client), jose.ES256, otherKey, "unknown-kid", idJAGType), 400, "invalid_grant"},
		{"alg none is refused", unsigned(), 400, "invalid_grant"},
		{"HS256 is refused, whatever the secret", sign(t, e.ent.claims(now, e.client), jose.HS256, []byte(strings.Repeat("k", 32)), enterpriseKeyID, idJAGType), 400, "invalid_grant"},
		{"an algorithm the issuer is not configured with is refused", sign(t, e.ent.claims(now, e.client), jose.ES384, mustKey(t, elliptic.P384()), enterpriseKeyID, idJAGType), 400, "invalid_grant"},
		{"typ JWT is refused", sign(t, e.ent.claims(now, e.client), jose.ES256, e.ent.key, enterpriseKeyID, "JWT"), 400, "invalid_grant"},
		{"no typ is refused", sign(t, e.ent.claims(now, e.client), jose.ES256, e.ent.key, enterpriseKeyID, ""), 400, "invalid_grant"},
		{"an expired assertion is refused", changed(func(c map[string]any) {
			c["iat"] = now.Add(-10 * time.Minute).Unix()
			c["exp"] = now.Add(-time.Minute).Unix()
		}), 400, "invalid_grant"},
		{"an assertion issued in the future is refused", changed(func(c map[string]any) { c["iat"] = now.Add(10 * time.Minute).Unix() }), 400, "invalid_grant"},
		{"an assertion without iat is refused", changed(func(c map[string]any) { delete(c, "iat") }), 400, "invalid_grant"},
		{"an assertion valid for days is refused", changed(func(c map[string]any) { c["exp"] = now.Add(72 * time.Hour).Unix() }), 400, "invalid_grant"},
		{"another audience is refused", changed(func(c map[string]any) { c["aud"] = "https://other.example" }), 400, "invalid_grant"},
		{"an audience array with another member is refused", changed(func(c map[string]any) { c["aud"] = []string{"https://mcp.example.test", "https://other.example"} }), 400, "invalid_grant"},
		{"another resource is refused", changed(func(c map[string]any) { c["resource"] = "https://other.example/mcp" }), 400, "invalid_grant"},
		{"no resource is refused", changed(func(c map[string]any) { delete(c, "resource") }), 400, "invalid_grant"},
		{"another client's assertion is refused", changed(func(c map[string]any) { c["client_id"] = testenv.NativeClientID }), 400, "invalid_grant"},
		{"an untrusted issuer is refused", changed(func(c map[string]any) { c["iss"] = "https://evil.example" }), 400, "invalid_grant"},
		{"an assertion without jti is refused", changed(func(c map[string]any) { delete(c, "jti") }), 400, "invalid_grant"},
		{"a jti longer than 256 bytes is refused", changed(func(c map[string]any) { c["jti"] = strings.Repeat("j", 257) }), 400, "invalid_grant"},
		{"an assertion asking proof of possession is refused", changed(func(c map[string]any) { c["cnf"] = map[string]string{"jkt": "abc"} }), 400, "invalid_grant"},
		{"an assertion without sub is refused", changed(func(c map[string]any) { delete(c, "sub") }), 400, "invalid_grant"},
		{"a sub with a line break is refused", changed(func(c map[string]any) { c["sub"] = "alice\r\nX-Admin: 1" }), 400, "invalid_grant"},
		{"a sub longer than 255 bytes is refused", changed(func(c map[string]any) { c["sub"] = strings.Repeat("a", 256) }), 400, "invalid_grant"},
		{"garbage is refused", "not-a-jwt", 400, "invalid_grant"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.redeem(t, tc.assertion, nil).wantError(t, tc.status, tc.code)
		})
	}
	if n := e.countRecords(t, kindTokenPair); n != 0 {
		t.Errorf("%d access tokens stored for refused assertions", n)
	}
}

func mustKey(t *testing.T, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestJWTBearerRefusesAReplayedAssertion(t *testing.T) {
	e := newEMAEnv(t, nil)
	assertion := e.ent.mint(e.ent.claims(e.clock.Now(), e.client))
	e.redeem(t, assertion, nil).wantTokens(t)
	e.redeem(t, assertion, nil).wantError(t, http.StatusBadRequest, "invalid_grant")

	t.Run("a jti is one per issuer: the same jti in a new assertion is refused too", func(t *testing.T) {
		c := e.ent.claims(e.clock.Now(), e.client)
		c["jti"] = "fixed-jti"
		e.redeem(t, e.ent.mint(c), nil).wantTokens(t)
		c["iat"] = e.clock.Now().Unix() + 1
		e.redeem(t, e.ent.mint(c), nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})
}

func TestJWTBearerClientAuthentication(t *testing.T) {
	e := newEMAEnv(t, nil)
	assertion := e.ent.mint(e.ent.claims(e.clock.Now(), e.client))

	t.Run("a wrong secret is invalid_client and does not consume the assertion", func(t *testing.T) {
		form := url.Values{"grant_type": {grantJWTBearer}, "assertion": {assertion}}
		h := http.Header{}
		h.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(e.client+":wrong")))
		e.post(t, pathToken, form, h).wantError(t, http.StatusUnauthorized, "invalid_client")
		e.redeem(t, assertion, nil).wantTokens(t)
	})
	t.Run("no client authentication is invalid_client", func(t *testing.T) {
		form := url.Values{"grant_type": {grantJWTBearer}, "assertion": {e.ent.mint(e.ent.claims(e.clock.Now(), e.client))}}
		e.post(t, pathToken, form, nil).wantError(t, http.StatusUnauthorized, "invalid_client")
	})
	t.Run("a public client may not use the grant", func(t *testing.T) {
		form := url.Values{"grant_type": {grantJWTBearer}, "client_id": {testenv.NativeClientID},
			"assertion": {e.ent.mint(e.ent.claims(e.clock.Now(), testenv.NativeClientID))}}
		e.post(t, pathToken, form, nil).wantError(t, http.StatusBadRequest, "unauthorized_client")
	})
	t.Run("a confidential client that did not register the grant may not use it", func(t *testing.T) {
		info := registerClient(t, e.b, `{"redirect_uris":["http://127.0.0.1/callback"],"token_endpoint_auth_method":"client_secret_post"}`)
		e.remember(info.ClientSecret)
		form := url.Values{"grant_type": {grantJWTBearer}, "client_id": {info.ClientID}, "client_secret": {info.ClientSecret},
			"assertion": {e.ent.mint(e.ent.claims(e.clock.Now(), info.ClientID))}}
		e.post(t, pathToken, form, nil).wantError(t, http.StatusBadRequest, "unauthorized_client")
	})
	t.Run("a public client cannot register the grant", func(t *testing.T) {
		rec := answerOwn(t, e.b, registerRequest(`{"redirect_uris":["http://127.0.0.1/callback"],"token_endpoint_auth_method":"none","grant_types":["authorization_code","`+grantJWTBearer+`"]}`, ""))
		wantRegistrationError(t, rec, http.StatusBadRequest, "invalid_client_metadata")
	})
}

func TestJWTBearerScopes(t *testing.T) {
	e := newEMAEnv(t, nil)
	assert := func(scope string) string {
		c := e.ent.claims(e.clock.Now(), e.client)
		c["scope"] = scope
		return e.ent.mint(c)
	}
	for _, tc := range []struct {
		name, asserted, asked string // asked "-": no scope parameter
		want                  string // "": invalid_scope
	}{
		{"no scope asked: what the assertion grants", "notes:read notes:write", "-", "notes:read notes:write"},
		{"asking more than asserted gets the intersection", "notes:read", "notes:read notes:write", "notes:read"},
		{"asking only for what is not asserted is invalid_scope", "notes:read", "notes:write", ""},
		{"asserted scopes the broker does not offer are dropped", "notes:read admin:all", "-", "notes:read"},
		{"offline_access is never granted", "notes:read offline_access", "-", "notes:read"},
		{"an assertion granting nothing the broker offers is invalid_scope", "admin:all", "-", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var extra url.Values
			if tc.asked != "-" {
				extra = url.Values{"scope": {tc.asked}}
			}
			res := e.redeem(t, assert(tc.asserted), extra)
			if tc.want == "" {
				res.wantError(t, http.StatusBadRequest, "invalid_scope")
				return
			}
			if got := res.wantTokens(t).Scope; got != tc.want {
				t.Errorf("scope %q, want %q", got, tc.want)
			}
		})
	}

	t.Run("the issuer's configured scopes cap what its assertions grant", func(t *testing.T) {
		capped := newEMAEnv(t, func(c *Config) { c.EnterpriseIssuers[0].Scopes = []string{"notes:read"} })
		c := capped.ent.claims(capped.clock.Now(), capped.client)
		c["scope"] = "notes:read notes:write"
		if got := capped.redeem(t, capped.ent.mint(c), nil).wantTokens(t).Scope; got != "notes:read" {
			t.Errorf("scope %q, want notes:read", got)
		}
	})
}

func TestJWTBearerAdvertisedOnlyWhenConfigured(t *testing.T) {
	e := newEMAEnv(t, nil)
	m := e.b.authorizationServerMetadata()
	if !slices.Contains(m.GrantTypesSupported, grantJWTBearer) || !slices.Equal(m.AuthorizationGrantProfilesSupported, []string{idJAGProfile}) {
		t.Errorf("metadata grant types %v, profiles %v", m.GrantTypesSupported, m.AuthorizationGrantProfilesSupported)
	}
	raw, _ := json.Marshal(m)
	if strings.Contains(string(raw), e.ent.issuer) {
		t.Error("the metadata discloses a trusted issuer")
	}

	plain := newTokenEnv(t, testenv.SharedOP(t), nil)
	m = plain.b.authorizationServerMetadata()
	if slices.Contains(m.GrantTypesSupported, grantJWTBearer) || m.AuthorizationGrantProfilesSupported != nil {
		t.Errorf("metadata without enterprise issuers: grant types %v, profiles %v", m.GrantTypesSupported, m.AuthorizationGrantProfilesSupported)
	}
	form := url.Values{"grant_type": {grantJWTBearer}, "client_id": {testenv.NativeClientID}, "assertion": {"x.y.z"}}
	plain.post(t, pathToken, form, nil).wantError(t, http.StatusBadRequest, "unsupported_grant_type")
}

func TestEnterpriseIssuerConfiguration(t *testing.T) {
	o := testenv.SharedOP(t)
	good := EnterpriseIssuer{Issuer: "https://idp.acme.example", JWKSURI: "https://idp.acme.example/jwks", SubjectPrefix: "acme:"}
	for _, tc := range []struct {
		name   string
		change func(c *Config)
		want   string // "" builds
	}{
		{"an issuer with a subject prefix builds", func(c *Config) {}, ""},
		{"the IdP's own issuer needs no prefix", func(c *Config) {
			c.EnterpriseIssuers[0] = EnterpriseIssuer{Issuer: o.Issuer, JWKSURI: o.Issuer + "/keys"}
		}, ""},
		{"another issuer without a prefix is refused", func(c *Config) { c.EnterpriseIssuers[0].SubjectPrefix = "" }, "subject_prefix"},
		{"HS256 is refused", func(c *Config) { c.EnterpriseIssuers[0].Algorithms = []string{"HS256"} }, "algorithm"},
		{"none is refused", func(c *Config) { c.EnterpriseIssuers[0].Algorithms = []string{"none"} }, "algorithm"},
		{"a relative jwks_uri is refused", func(c *Config) { c.EnterpriseIssuers[0].JWKSURI = "/jwks" }, "jwks_uri"},
		{"an issuer twice is refused", func(c *Config) { c.EnterpriseIssuers = append(c.EnterpriseIssuers, good) }, "twice"},
		{"delegation token_exchange is refused", func(c *Config) { c.DelegationMode = DelegationTokenExchange }, "delegation none or app_password"},
		{"the default delegation is refused", func(c *Config) { c.DelegationMode = "" }, "delegation none or app_password"},
		{"delegation refresh is refused", func(c *Config) { c.DelegationMode = DelegationRefresh }, "delegation none or app_password"},
		{"progressive mode is refused", func(c *Config) { c.Mode = ModeProgressive }, "hybrid"},
		{"delegation app_password with user_claim sub builds", func(c *Config) {
			c.EnterpriseIssuers[0].SubjectPrefix = "acme."
			c.DelegationMode = DelegationAppPassword
			c.AppPassword = AppPasswordConfig{NextcloudURL: "https://cloud.example.test"}
		}, ""},
		{"delegation app_password with a colon in a subject prefix is refused", func(c *Config) {
			c.DelegationMode = DelegationAppPassword
			c.AppPassword = AppPasswordConfig{NextcloudURL: "https://cloud.example.test"}
		}, "subject_prefix"},
		{"delegation app_password with another user_claim is refused", func(c *Config) {
			c.EnterpriseIssuers[0].SubjectPrefix = "acme."
			c.DelegationMode = DelegationAppPassword
			c.AppPassword = AppPasswordConfig{NextcloudURL: "https://cloud.example.test", UserClaim: "nextcloud_uid"}
		}, "use user_claim sub"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{
				Mode: ModeHybrid, Issuer: o.Issuer, Resource: testResource, DelegationMode: DelegationNone,
				EnterpriseIssuers: []EnterpriseIssuer{good},
				Records:           newTestBroker(t, o, nil).cfg.Records,
			}
			tc.change(&cfg)
			_, err := New(cfg)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("New: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("New: %v, want an error naming %q", err, tc.want)
			}
		})
	}
}

// TestEnterpriseSessionRefusesGrantDelegation holds the guard behind New's check: a
// session from an ID-JAG never reaches the IdP as if it held a grant.
func TestEnterpriseSessionRefusesGrantDelegation(t *testing.T) {
	e := newEMAEnv(t, nil)
	tok := e.redeem(t, e.ent.mint(e.ent.claims(e.clock.Now(), e.client)), nil).wantTokens(t)
	p, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.b.loadSessionGrant(t.Context(), p.SessionID); err != errNoIdPGrant {
		t.Fatalf("loadSessionGrant: %v, want errNoIdPGrant", err)
	}
	t.Run("revoking the session asks no IdP and logs no error", func(t *testing.T) {
		form := url.Values{"token": {tok.AccessToken}}
		h := http.Header{}
		h.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(url.QueryEscape(e.client)+":"+url.QueryEscape(e.secret))))
		if res := e.post(t, pathRevoke, form, h); res.status != http.StatusOK {
			t.Fatalf("revoke: %d %+v", res.status, res.err)
		}
		if e.mcpStatus(t, tok.AccessToken) != http.StatusUnauthorized {
			t.Error("the access token still works after revocation")
		}
		for _, entry := range e.logs.All() {
			if entry.Message == "ending session" {
				t.Errorf("revocation logged %q: %v", entry.Message, entry.ContextMap())
			}
		}
	})
	re := asRequestError(e.b.delegationFailed(p, nil, errNoIdPGrant))
	if re == nil || re.status != http.StatusInternalServerError || !strings.Contains(re.description, "enterprise assertion") {
		t.Fatalf("answer %+v", re)
	}
}

// TestEnterpriseSessionWithAppPassword: a session from an ID-JAG works with delegation
// app_password, as the README says: the tool call asks for the app password, the user
// grants it as its subject, and the next call carries it.
func TestEnterpriseSessionWithAppPassword(t *testing.T) {
	f, ent, info := startEnterpriseAppPassword(t)
	front, nc := f.front, f.nc
	claims := ent.claims(time.Now(), info.ClientID)
	claims["aud"], claims["resource"] = front.URL, f.resource
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+pathToken,
		strings.NewReader(url.Values{"grant_type": {grantJWTBearer}, "assertion": {ent.mint(claims)}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(info.ClientID, info.ClientSecret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var tok TokenResponse
	decodeJSON(t, resp, &tok)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("jwt-bearer: %s", resp.Status)
	}

	login := f.open(t, f.elicit(t, tok.AccessToken))
	if err := nc.Grant(login, "acme.alice"); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			for _, e := range f.logs.All() {
				t.Logf("%s %s %v", e.LoggerName, e.Message, e.ContextMap())
			}
		}
	}()
	if who := f.whoami(t, tok.AccessToken); who != "acme.alice" {
		t.Fatalf("the upstream's tool saw %q", who)
	}
	if user, _ := f.upstreamBasic(t); user != "acme.alice" {
		t.Errorf("upstream Basic for %q", user)
	}
}

// TestJWTBearerMetadataDocumentClient: a client identified by a metadata document that
// authenticates with private_key_jwt and lists the grant redeems an ID-JAG; one that lists
// it but is public cannot.
func TestJWTBearerMetadataDocumentClient(t *testing.T) {
	ent := startEnterpriseIdP(t)
	key := newClientKey(t, jose.ES256)
	doc := privateKeyJWTDocument(jwks(key))
	doc["grant_types"] = []string{"authorization_code", grantJWTBearer}
	public := map[string]any{"redirect_uris": []string{tokenTestRedirect}, "token_endpoint_auth_method": "none",
		"grant_types": []string{"authorization_code", grantJWTBearer}}
	srv := startDocumentServer(t, func(srv *documentServer, w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/public.json" {
			serveDocument(public, "max-age=3600")(srv, w, r)
			return
		}
		serveDocument(doc, "max-age=3600")(srv, w, r)
	})
	e, b := assertionEnv(t, srv, func(c *Config) {
		c.EnterpriseIssuers = []EnterpriseIssuer{{Issuer: ent.issuer, JWKSURI: ent.issuer + "/jwks", Algorithms: []string{"ES256"}, SubjectPrefix: "acme:"}}
	})
	jag := func(clientID string) string {
		c := ent.claims(time.Now(), clientID)
		c["aud"], c["resource"] = b.issuer, b.cfg.Resource
		a := ent.mint(c)
		e.remember(a)
		return a
	}

	id := srv.URL + "/agent.json"
	form := url.Values{"grant_type": {grantJWTBearer}, "client_id": {id}, "assertion": {jag(id)}}
	clientAssertion := key.sign(t, assertionClaims(id, b.issuer, time.Now()), "")
	e.remember(clientAssertion)
	withAssertion(clientAssertion)(form)
	tok := e.post(t, pathToken, form, nil).wantTokens(t)
	if tok.Scope != "notes:read" || e.mcpStatus(t, tok.AccessToken) != http.StatusOK {
		t.Errorf("scope %q; the access token does not reach the MCP server", tok.Scope)
	}

	pub := srv.URL + "/public.json"
	form = url.Values{"grant_type": {grantJWTBearer}, "client_id": {pub}, "assertion": {jag(pub)}}
	e.post(t, pathToken, form, nil).wantError(t, http.StatusBadRequest, "unauthorized_client")
}

// startEnterpriseAppPassword starts a hybrid broker with delegation app_password and one
// enterprise issuer (prefix "acme."), its front, Nextcloud's stand-in and an upstream,
// and registers a confidential client that may use the JWT bearer grant.
func startEnterpriseAppPassword(t *testing.T) (*appPasswordTest, *enterpriseIdP, clientInformation) {
	t.Helper()
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	ent := startEnterpriseIdP(t)
	var handler http.Handler
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { handler.ServeHTTP(w, r) }))
	t.Cleanup(front.Close)
	f := &appPasswordTest{o: o, nc: nc, front: front, resource: front.URL + "/mcp", clock: &testenv.Clock{},
		up: testenv.StartUpstream(t, testenv.BasicPassThrough())}
	core, logs := observer.New(zap.DebugLevel)
	f.logs = logs
	f.b = newTestBroker(t, o, func(c *Config) {
		c.Logger = zap.New(core)
		c.Mode = ModeHybrid
		c.Registration = true
		c.Resource = f.resource
		c.DelegationMode = DelegationAppPassword
		c.AppPassword = AppPasswordConfig{NextcloudURL: nc.URL, PublicURL: ncPublicURL}
		c.ToolScopes = nil
		c.EnterpriseIssuers = []EnterpriseIssuer{{Issuer: ent.issuer, JWKSURI: ent.issuer + "/jwks", Algorithms: []string{"ES256"}, SubjectPrefix: "acme."}}
	})
	handler = startFront(t, f.b, f.up.URL).Config.Handler

	info := registerClient(t, f.b, `{"redirect_uris":["http://127.0.0.1/callback"],"grant_types":["authorization_code","`+grantJWTBearer+`"]}`)
	return f, ent, info
}
