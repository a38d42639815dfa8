package flows

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/safehttp"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// clientKey is a metadata document client's signing key and the JWK it publishes.
type clientKey struct {
	private crypto.Signer
	alg     jose.SignatureAlgorithm
	kid     string
}

func newClientKey(t *testing.T, alg jose.SignatureAlgorithm) clientKey {
	t.Helper()
	var (
		k   crypto.Signer
		err error
	)
	switch alg {
	case jose.ES256:
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case jose.RS256, jose.PS256:
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case jose.EdDSA:
		_, k, err = ed25519.GenerateKey(rand.Reader)
	}
	if err != nil {
		t.Fatal(err)
	}
	return clientKey{private: k, alg: alg, kid: "k-" + randomToken()[:8]}
}

// jwk is the key's public JWK.
func (k clientKey) jwk() jose.JSONWebKey {
	return jose.JSONWebKey{Key: k.private.Public(), KeyID: k.kid, Algorithm: string(k.alg), Use: "sig"}
}

// jwks is a JWK Set of keys' public JWKs, as a document carries it.
func jwks(keys ...clientKey) map[string]any {
	set := jose.JSONWebKeySet{}
	for _, k := range keys {
		set.Keys = append(set.Keys, k.jwk())
	}
	raw, _ := json.Marshal(set)
	var m map[string]any
	_ = json.Unmarshal(raw, &m)
	return m
}

// sign is a client assertion with claims, signed by k (header kid k.kid, typ extra if set).
func (k clientKey) sign(t *testing.T, claims any, typ string) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithHeader(jose.HeaderKey("kid"), k.kid)
	if typ != "" {
		opts = opts.WithType(jose.ContentType(typ))
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: k.private}, opts)
	if err != nil {
		t.Fatal(err)
	}
	s, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// assertionClaims are the claims of a good assertion of client id for issuer at now.
func assertionClaims(id, issuer string, now time.Time) map[string]any {
	return map[string]any{
		"iss": id, "sub": id, "aud": issuer,
		"iat": now.Unix(), "exp": now.Add(2 * time.Minute).Unix(),
		"jti": "jti-" + randomToken(),
	}
}

func withAssertion(assertion string) func(url.Values) {
	return func(f url.Values) {
		f.Set("client_assertion_type", clientAssertionTypeJWTBearer)
		f.Set("client_assertion", assertion)
	}
}

// privateKeyJWTDocument is a document of a client that authenticates with private_key_jwt.
func privateKeyJWTDocument(keys map[string]any) map[string]any {
	return map[string]any{
		"client_name":                "Confidential Agent",
		"application_type":           "web",
		"redirect_uris":              []string{tokenTestRedirect},
		"grant_types":                []string{"authorization_code", "refresh_token"},
		"token_endpoint_auth_method": "private_key_jwt",
		"jwks":                       keys,
	}
}

// assertionEnv is a hybrid broker in front of an upstream, trusting srv's certificate for
// documents (on loopback), and the tokenEnv to talk to it; what it remembers (e.remember)
// must be in no log line.
func assertionEnv(t *testing.T, srv *documentServer, change func(*Config)) (*tokenEnv, *Broker) {
	t.Helper()
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	core, logs := observer.New(zap.DebugLevel)
	b, front := startHybridFrontWith(t, o, up.URL, func(c *Config) {
		c.CIMDAllowPrivate = true
		c.Logger = zap.New(core)
		if change != nil {
			change(c)
		}
	}, func(b *Broker) {
		roots := x509.NewCertPool()
		roots.AddCert(srv.Certificate())
		b.clients.documents.rootCAs = roots
	})
	e := lessonTokens(o, b, front)
	e.logs = logs
	t.Cleanup(func() { e.assertNoSecretsLogged(t) })
	return e, b
}

// A metadata document client that authenticates with private_key_jwt logs in end to end:
// authorize, consent, the IdP, the callback, and the token endpoint with an RFC 7523
// client assertion; it refreshes with another. Before, the broker refused its document.
func TestPrivateKeyJWTClientLogsIn(t *testing.T) {
	for _, alg := range []jose.SignatureAlgorithm{jose.ES256, jose.RS256, jose.PS256, jose.EdDSA} {
		t.Run(string(alg), func(t *testing.T) {
			key := newClientKey(t, alg)
			srv := startDocumentServer(t, serveDocument(privateKeyJWTDocument(jwks(key)), "max-age=3600"))
			e, b := assertionEnv(t, srv, nil)
			id := srv.URL + "/agent.json"

			assertion := func(typ string) string {
				a := key.sign(t, assertionClaims(id, b.issuer, time.Now()), typ)
				e.remember(a)
				return a
			}

			verifier := oauth2.GenerateVerifier()
			code := newHybridBrowser(t).login(e.front, e.o, id, tokenTestRedirect, verifier, []string{"openid", "notes:read"})
			e.remember(code, verifier)
			tok := e.exchange(t, id, code, verifier, withAssertion(assertion(""))).wantTokens(t)
			if e.mcpStatus(t, tok.AccessToken) != http.StatusOK {
				t.Error("the access token does not reach the MCP server")
			}
			// RFC 7521 §4.2: client_id may be left out; the assertion's sub names the client.
			next := e.refresh(t, "", tok.RefreshToken, withAssertion(assertion("client-authentication+jwt"))).wantTokens(t)
			if next.AccessToken == "" || next.AccessToken == tok.AccessToken {
				t.Error("refresh issued no new access token")
			}
			// Revocation authenticates the client the same way (RFC 7009 §2.1).
			form := url.Values{"client_id": {id}, "token": {next.RefreshToken}}
			withAssertion(assertion(""))(form)
			if res := e.post(t, pathRevoke, form, nil); res.status != http.StatusOK {
				t.Fatalf("revocation: %d %+v", res.status, res.err)
			}
			e.refresh(t, id, next.RefreshToken, withAssertion(assertion(""))).wantError(t, http.StatusBadRequest, "invalid_grant")
		})
	}
}

// Every assertion that is not the client's, not for this server, not current or not new
// is 401 invalid_client with a description that names the rule and nothing the client
// sent; the code survives them all and a good assertion then redeems it.
func TestClientAssertionRefusals(t *testing.T) {
	key := newClientKey(t, jose.ES256)
	rsaKey := newClientKey(t, jose.RS256)
	otherKey := newClientKey(t, jose.ES256)
	otherKey.kid = key.kid // an impostor's key under the client's kid
	srv := startDocumentServer(t, func(s *documentServer, w http.ResponseWriter, r *http.Request) {
		doc := privateKeyJWTDocument(jwks(key, rsaKey))
		if r.URL.Path == "/public.json" {
			doc = claudeCodeDocument
		}
		serveDocument(doc, "max-age=3600")(s, w, r)
	})
	e, b := assertionEnv(t, srv, nil)
	id := srv.URL + "/agent.json"
	now := time.Now()
	good := func() map[string]any { return assertionClaims(id, b.issuer, now) }
	with := func(change func(map[string]any)) map[string]any {
		c := good()
		change(c)
		return c
	}
	verifier := oauth2.GenerateVerifier()
	code := newHybridBrowser(t).login(e.front, e.o, id, tokenTestRedirect, verifier, []string{"openid"})

	rsaJWK, _ := json.Marshal(rsaKey.jwk())
	hmacWithPublicKey := func() string {
		signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: rsaJWK}, (&jose.SignerOptions{}).WithHeader("kid", rsaKey.kid))
		if err != nil {
			t.Fatal(err)
		}
		s, err := jwt.Signed(signer).Claims(good()).Serialize()
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	algNone := func() string {
		enc := func(v any) string { raw, _ := json.Marshal(v); return base64.RawURLEncoding.EncodeToString(raw) }
		return enc(map[string]string{"alg": "none", "kid": key.kid}) + "." + enc(good()) + "."
	}

	for _, tc := range []struct {
		name, assertion, want string
		change                func(url.Values)
	}{
		{"signed by another key", otherKey.sign(t, good(), ""), "signature does not verify", nil},
		{"alg none", algNone(), "not a JWT signed with", nil},
		{"HS256 with the public key as the secret", hmacWithPublicKey(), "not a JWT signed with", nil},
		{"aud is the token endpoint URL (RFC 7523bis)", key.sign(t, with(func(c map[string]any) { c["aud"] = b.issuer + pathToken }), ""), "aud must be", nil},
		{"aud is another server", key.sign(t, with(func(c map[string]any) { c["aud"] = "https://as.example" }), ""), "aud must be", nil},
		{"aud has another value besides", key.sign(t, with(func(c map[string]any) { c["aud"] = []string{b.issuer, "https://as.example"} }), ""), "aud must be", nil},
		{"expired", key.sign(t, with(func(c map[string]any) { c["exp"] = now.Add(-2 * time.Minute).Unix() }), ""), "has expired", nil},
		{"lives an hour", key.sign(t, with(func(c map[string]any) { c["exp"] = now.Add(time.Hour).Unix() }), ""), "longer than 5 minutes", nil},
		{"no exp", key.sign(t, with(func(c map[string]any) { delete(c, "exp") }), ""), "no exp", nil},
		{"not valid yet", key.sign(t, with(func(c map[string]any) { c["nbf"] = now.Add(3 * time.Minute).Unix() }), ""), "not valid yet", nil},
		{"issued in the future", key.sign(t, with(func(c map[string]any) { c["iat"] = now.Add(3 * time.Minute).Unix() }), ""), "not valid yet", nil},
		{"no jti", key.sign(t, with(func(c map[string]any) { delete(c, "jti") }), ""), "no jti", nil},
		{"jti too long", key.sign(t, with(func(c map[string]any) { c["jti"] = strings.Repeat("j", maxAssertionIDBytes+1) }), ""), "jti is too long", nil},
		{"iss is not the client_id", key.sign(t, with(func(c map[string]any) { c["iss"] = "https://attacker.example/client.json" }), ""), "iss and sub", nil},
		{"sub is not the client_id", key.sign(t, with(func(c map[string]any) { c["sub"] = srv.URL + "/public.json" }), ""), "iss and sub", nil},
		{"typed as an access token", key.sign(t, good(), "at+jwt"), "typ", nil},
		{"another assertion type", key.sign(t, good(), ""), "client_assertion_type must be", func(f url.Values) {
			f.Set("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:saml2-bearer")
		}},
		{"no assertion from a private_key_jwt client", "", "must authenticate with a client_assertion", func(f url.Values) {
			f.Del("client_assertion_type")
			f.Del("client_assertion")
		}},
		{"an assertion from a client whose document says none", key.sign(t, assertionClaims(srv.URL+"/public.json", b.issuer, now), ""), "does not authenticate with private_key_jwt", func(f url.Values) {
			f.Set("client_id", srv.URL+"/public.json")
		}},
	} {
		e.remember(tc.assertion)
		t.Run(tc.name, func(t *testing.T) {
			res := e.exchange(t, id, code, verifier, func(f url.Values) {
				withAssertion(tc.assertion)(f)
				if tc.change != nil {
					tc.change(f)
				}
			})
			res.wantError(t, http.StatusUnauthorized, "invalid_client")
			if !strings.Contains(res.err.Description, tc.want) {
				t.Errorf("error_description %q, want it to say %q", res.err.Description, tc.want)
			}
			if tc.assertion != "" && strings.Contains(res.err.Description, tc.assertion) {
				t.Error("the description repeats the assertion")
			}
		})
	}
	t.Run("an assertion and a client_secret at once", func(t *testing.T) {
		e.exchange(t, id, code, verifier, func(f url.Values) {
			withAssertion(key.sign(t, good(), ""))(f)
			f.Set("client_secret", "s3cret")
		}).wantError(t, http.StatusBadRequest, "invalid_request")
	})

	// The code survived: the refusals were the assertions'.
	replayed := key.sign(t, good(), "")
	tok := e.exchange(t, id, code, verifier, withAssertion(replayed)).wantTokens(t)

	t.Run("a replayed jti on the same node", func(t *testing.T) {
		res := e.refresh(t, id, tok.RefreshToken, withAssertion(replayed))
		res.wantError(t, http.StatusUnauthorized, "invalid_client")
		if !strings.Contains(res.err.Description, "already used") {
			t.Errorf("error_description %q", res.err.Description)
		}
	})
	t.Run("a replayed jti on another node of the same storage", func(t *testing.T) {
		b2, err := New(b.cfg)
		if err != nil {
			t.Fatal(err)
		}
		b2.clients.documents.rootCAs = b.clients.documents.rootCAs
		req := httptest.NewRequest(http.MethodPost, e.front.URL+pathToken, nil)
		form := url.Values{"client_id": {id}}
		withAssertion(replayed)(form)
		if _, err := b2.authenticateClient(req, form); !errors.Is(err, errClientAuth) || !strings.Contains(err.Error(), "already used") {
			t.Fatalf("second node: %v", err)
		}
		// And a fresh assertion passes there: the refusal was the replay's.
		form.Set("client_assertion", key.sign(t, good(), ""))
		if c, err := b2.authenticateClient(req, form); err != nil || c.ID != id {
			t.Fatalf("second node, fresh assertion: %v", err)
		}
	})
}

// A client whose document names its keys by jwks_uri: the set is fetched once (cached
// like documents) with the documents' client, and verifies its assertions. A key the
// client rotated in has the set fetched again, at most once a minute.
func TestClientAssertionKeysFromJWKSURI(t *testing.T) {
	key := newClientKey(t, jose.ES256)
	var (
		mu       sync.Mutex
		jwksHits int
		served   = key
	)
	srv := startDocumentServer(t, func(s *documentServer, w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/jwks.json" {
			mu.Lock()
			jwksHits++
			k := served
			mu.Unlock()
			w.Header().Set("Cache-Control", "max-age=600")
			_ = json.NewEncoder(w).Encode(jwks(k))
			return
		}
		doc := privateKeyJWTDocument(nil)
		delete(doc, "jwks")
		doc["jwks_uri"] = s.URL + "/jwks.json"
		serveDocument(doc, "max-age=3600")(s, w, r)
	})
	b := newDocumentBroker(t, srv, true)
	id := srv.URL + "/agent.json"
	req := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/token", nil)
	for i := range 3 {
		form := url.Values{"client_id": {id}}
		withAssertion(key.sign(t, assertionClaims(id, b.issuer, time.Now()), ""))(form)
		if c, err := b.authenticateClient(req, form); err != nil || c.AuthMethod != AuthMethodPrivateKeyJWT {
			t.Fatalf("assertion %d: %v", i, err)
		}
	}
	if jwksHits != 1 {
		t.Errorf("the key set was fetched %d times, want once", jwksHits)
	}

	t.Run("a rotated key", func(t *testing.T) {
		clock := &testenv.Clock{Base: time.Now()}
		b.now = clock.Now
		hits := func() int { mu.Lock(); defer mu.Unlock(); return jwksHits }
		rotate := func() clientKey {
			k := newClientKey(t, jose.ES256)
			mu.Lock()
			served = k
			mu.Unlock()
			return k
		}
		auth := func(k clientKey) error {
			form := url.Values{"client_id": {id}}
			withAssertion(k.sign(t, assertionClaims(id, b.issuer, clock.Now()), ""))(form)
			_, err := b.authenticateClient(req, form)
			return err
		}
		rotated := rotate()
		if err := auth(rotated); !errors.Is(err, errClientAuth) || hits() != 1 {
			t.Fatalf("within a minute of the fetch: %v, %d fetches; want a refusal and no new fetch", err, hits())
		}
		clock.Advance(keySetRefetchAfter)
		if err := auth(rotated); err != nil || hits() != 2 {
			t.Fatalf("a minute after the fetch: %v, %d fetches; want the new key fetched once", err, hits())
		}
		if err := auth(rotate()); !errors.Is(err, errClientAuth) || hits() != 2 {
			t.Fatalf("right after the refetch: %v, %d fetches; want a refusal and no new fetch", err, hits())
		}
	})
}

// A jwks_uri on a private address is not fetched: the documents' client refuses it at
// dial time, as it does documents (SECURITY.md), and the client cannot authenticate.
func TestClientAssertionJWKSURIPrivateAddressRefused(t *testing.T) {
	key := newClientKey(t, jose.ES256)
	srv := startDocumentServer(t, func(_ *documentServer, w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(jwks(key))
	})
	port := srv.Listener.Addr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port()
	b := newDocumentBroker(t, srv, false)
	// The document as if fetched from a public host: only its jwks_uri is private.
	id := "https://agent.example/client.json"
	doc := clientIDDocument{
		ClientID: id, ClientName: "Agent", RedirectURIs: []string{tokenTestRedirect},
		TokenEndpointAuthMethod: AuthMethodPrivateKeyJWT, JWKSURI: "https://localhost:" + strconv.Itoa(int(port)) + "/jwks.json",
	}
	c, err := b.clientFromDocument(id, &doc)
	if err != nil {
		t.Fatal(err)
	}
	b.clients.documents.put(id, c, b.now().Add(time.Hour), b.now())

	req := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/token", nil)
	form := url.Values{"client_id": {id}}
	withAssertion(key.sign(t, assertionClaims(id, b.issuer, time.Now()), ""))(form)
	_, err = b.authenticateClient(req, form)
	if !errors.Is(err, errClientAuth) || !errors.Is(err, safehttp.ErrNonPublicAddress) {
		t.Fatalf("%v, want a refusal at dial time", err)
	}
	if n := srv.hits.Load(); n != 0 {
		t.Errorf("the key set server got %d requests", n)
	}
}

// What a document may carry for private_key_jwt, and what it may not.
func TestPrivateKeyJWTDocumentRefusals(t *testing.T) {
	key := newClientKey(t, jose.ES256)
	privateJWK, _ := json.Marshal(jose.JSONWebKey{Key: key.private, KeyID: "p", Algorithm: "ES256"})
	var privateSet map[string]any
	_ = json.Unmarshal([]byte(`{"keys":[`+string(privateJWK)+`]}`), &privateSet)
	for _, tc := range []struct {
		name   string
		change map[string]any
	}{
		{"neither jwks nor jwks_uri", map[string]any{"jwks": nil}},
		{"both jwks and jwks_uri", map[string]any{"jwks_uri": "https://agent.example/jwks.json"}},
		{"a private key in jwks", map[string]any{"jwks": privateSet}},
		{"a symmetric key in jwks", map[string]any{"jwks": map[string]any{"keys": []any{map[string]any{"kty": "oct", "k": base64.RawURLEncoding.EncodeToString(make([]byte, 32))}}}}},
		{"no usable key in jwks", map[string]any{"jwks": map[string]any{"keys": []any{map[string]any{"kty": "nonsense"}}}}},
		{"an http jwks_uri", map[string]any{"jwks": nil, "jwks_uri": "http://agent.example/jwks.json"}},
		{"client_secret_jwt", map[string]any{"token_endpoint_auth_method": "client_secret_jwt"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			doc := privateKeyJWTDocument(jwks(key))
			for k, v := range tc.change {
				if v == nil {
					delete(doc, k)
				} else {
					doc[k] = v
				}
			}
			srv := startDocumentServer(t, serveDocument(doc, ""))
			b := newDocumentBroker(t, srv, true)
			if c, err := b.findClient(t.Context(), srv.URL+"/agent.json"); !errors.Is(err, ErrUnknownClient) {
				t.Fatalf("client %+v, err %v", c, err)
			}
		})
	}
	t.Run("keys of other types are skipped, not refused", func(t *testing.T) {
		set := jwks(key)
		set["keys"] = append(set["keys"].([]any), map[string]any{"kty": "nonsense"}, map[string]any{"kty": "EC", "use": "enc", "crv": "P-256", "x": "x", "y": "y"})
		srv := startDocumentServer(t, serveDocument(privateKeyJWTDocument(set), ""))
		b := newDocumentBroker(t, srv, true)
		c, err := b.findClient(t.Context(), srv.URL+"/agent.json")
		if err != nil || c.keys == nil || len(c.keys.Keys) != 1 {
			t.Fatalf("client %+v, err %v", c, err)
		}
	})
}

// The replay store: a pair is claimed once until it expires, on any broker of the
// storage; bounds are checked before anything is stored.
func TestAssertionIDStore(t *testing.T) {
	b := newRegistrationBroker(t, nil)
	ctx := t.Context()
	exp := b.now().Add(2 * time.Minute)
	if err := b.assertionIDs.claim(ctx, "https://iss.example", "one", exp); err != nil {
		t.Fatal(err)
	}
	if err := b.assertionIDs.claim(ctx, "https://iss.example", "one", exp); !errors.Is(err, errAssertionReplayed) {
		t.Fatalf("second claim: %v", err)
	}
	if err := b.assertionIDs.claim(ctx, "https://other.example", "one", exp); err != nil {
		t.Fatalf("the same jti of another issuer: %v", err)
	}
	b2, err := New(b.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := b2.assertionIDs.claim(ctx, "https://iss.example", "one", exp); !errors.Is(err, errAssertionReplayed) {
		t.Fatalf("claim on a second broker: %v", err)
	}
	for _, jti := range []string{"", strings.Repeat("j", maxAssertionIDBytes+1)} {
		if err := b.assertionIDs.claim(ctx, "https://iss.example", jti, exp); !errors.Is(err, errAssertionIDInvalid) {
			t.Errorf("jti of %d bytes: %v", len(jti), err)
		}
	}
	n := 0
	if err := b.cfg.Records.Scan(ctx, storage.Key(kindAssertionID), 100, func(string, time.Time, json.RawMessage) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("%d markers stored, want 2", n)
	}
}
