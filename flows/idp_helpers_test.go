package flows

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// The IdP, its tokens and forged ones, for the tests of what the broker does with them;
// the verifier's own tests are in package idp.

// verifierResource is the protected resource the tokens of these tests are meant for.
const verifierResource = "https://mcp.example.test/mcp"

// verifierCallback is a redirect URI nobody listens on: Login stops before it.
const verifierCallback = "http://127.0.0.1:49152/callback"

var (
	verifierOPOnce sync.Once
	verifierOPVal  *testenv.OP
	verifierOPErr  error
)

// verifierOP is the OP shared by the tests that neither count its requests nor take it
// down, started once per package.
func verifierOP(t testing.TB) *testenv.OP {
	t.Helper()
	verifierOPOnce.Do(func() { verifierOPVal, verifierOPErr = testenv.NewOP() })
	if verifierOPErr != nil {
		t.Fatalf("starting OP: %v", verifierOPErr)
	}
	return verifierOPVal
}

// newVerifierFor builds an idp.Verifier for o's tokens meant for verifierResource, with
// the broker's credentials, after applying change to its configuration.
func newVerifierFor(o *testenv.OP, change func(*idp.VerifierConfig)) *idp.Verifier {
	cfg := idp.VerifierConfig{
		Provider:     idp.NewProvider(idp.ProviderConfig{Issuer: o.Issuer, HTTPClient: http.DefaultClient}),
		Audiences:    []string{verifierResource},
		ClientID:     testenv.BrokerClientID,
		ClientSecret: testenv.BrokerClientSecret,
		HTTPClient:   http.DefaultClient,
	}
	if change != nil {
		change(&cfg)
	}
	return idp.NewVerifier(cfg)
}

// loginAccessToken signs test-user in on o's login form as client and redeems the code,
// with PKCE; resources, if any, become the access token's audience.
func loginAccessToken(t *testing.T, o *testenv.OP, clientID, secret string, scopes []string, resources ...string) string {
	t.Helper()
	cfg := oauth2.Config{
		ClientID:     clientID,
		ClientSecret: secret,
		Endpoint:     o.Endpoint(),
		RedirectURL:  verifierCallback,
		Scopes:       scopes,
	}
	verifier := oauth2.GenerateVerifier()
	opts := []oauth2.AuthCodeOption{oauth2.S256ChallengeOption(verifier)}
	for _, r := range resources {
		opts = append(opts, oauth2.SetAuthURLParam("resource", r))
	}
	callback, err := o.Login(t.Context(), cfg.AuthCodeURL("state", opts...))
	if err != nil {
		t.Fatalf("logging in: %v", err)
	}
	tok, err := cfg.Exchange(t.Context(), callback.Query().Get("code"), oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatalf("exchanging code: %v", err)
	}
	return tok.AccessToken
}

// compactJWS assembles header.payload.signature by hand, for what go-jose refuses to sign.
func compactJWS(t *testing.T, header, claims map[string]any, sign func(signingInput []byte) []byte) string {
	t.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	c, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	input := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c)
	var sig []byte
	if sign != nil {
		sig = sign([]byte(input))
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sig)
}

var (
	attackerKeyOnce sync.Once
	attackerKeyVal  *rsa.PrivateKey
)

// attackerKey is an RSA key the OP never published.
func attackerKey(t *testing.T) *rsa.PrivateKey {
	t.Helper()
	attackerKeyOnce.Do(func() {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		attackerKeyVal = k
	})
	return attackerKeyVal
}

// signWithKey signs claims with go-jose under kid, as an OP would, with key.
func signWithKey(t *testing.T, key any, alg jose.SignatureAlgorithm, kid string, claims map[string]any) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: jose.JSONWebKey{Key: key, KeyID: kid}}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	out, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func randomKID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// revokedOpaqueToken is an opaque token of o that its client has revoked.
func revokedOpaqueToken(t *testing.T, o *testenv.OP) string {
	t.Helper()
	tok := loginAccessToken(t, o, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, o.RevocationEndpoint,
		strings.NewReader(url.Values{"token": {tok}}.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(testenv.OpaqueClientID, testenv.OpaqueClientSecret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revoking: %s", resp.Status)
	}
	return tok
}

// useIdPClocks rebuilds b's IdP and token verifier as New built them, the IdP on the
// clock discovery and the verifier on the clock verify (nil: time.Now). Call it before
// any request: what the old ones cached is gone.
func (b *Broker) useIdPClocks(discovery, verify func() time.Time) {
	b.idp = newProvider(&b.cfg, discovery)
	b.verifier = newVerifier(&b.cfg, b.idp, verify)
}
