package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestPrivateKeyJWTClientThroughCaddyBinary: a client identified by its metadata document,
// whose keys are at its jwks_uri, logs in through the caddy binary and redeems its code
// with an RFC 7523 client assertion addressed to the issuer the broker's metadata names;
// the same assertion again is refused (SECURITY.md S1.31).
func TestPrivateKeyJWTClientThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var docURL string
	docs := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "max-age=300")
		if r.URL.Path == "/jwks.json" {
			json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: "k1", Algorithm: "ES256", Use: "sig"}}})
			return
		}
		json.NewEncoder(w).Encode(map[string]any{
			"client_id": docURL, "client_name": "Confidential Agent", "redirect_uris": []string{"http://127.0.0.1/callback"},
			"application_type": "native", "token_endpoint_auth_method": "private_key_jwt",
			"jwks_uri": "https://" + r.Host + "/jwks.json",
		})
	}))
	t.Cleanup(docs.Close)
	docURL = docs.URL + "/agent.json"
	certFile := filepath.Join(t.TempDir(), "cimd.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: docs.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	caddy := startCaddy(t, hybridSite(o, up.URL, "\t\tclient_metadata_allow_private"), withEnv("SSL_CERT_FILE="+certFile))

	// The client reads the issuer from the broker's metadata, as the MCP SDKs do.
	var asm struct {
		Issuer        string   `json:"issuer"`
		TokenEndpoint string   `json:"token_endpoint"`
		AuthMethods   []string `json:"token_endpoint_auth_methods_supported"`
	}
	resp, err := http.Get(caddy.Base + "/.well-known/oauth-authorization-server")
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&asm)
	resp.Body.Close()
	if !strings.Contains(strings.Join(asm.AuthMethods, " "), "private_key_jwt") {
		t.Fatalf("private_key_jwt not advertised: %v", asm.AuthMethods)
	}

	verifier := oauth2.GenerateVerifier()
	q := url.Values{
		"response_type": {"code"}, "client_id": {docURL}, "redirect_uri": {"http://127.0.0.1:49152/callback"},
		"scope": {"openid notes:read"}, "state": {"st"}, "resource": {caddy.Base + "/mcp"},
		"code_challenge": {oauth2.S256ChallengeFromVerifier(verifier)}, "code_challenge_method": {"S256"},
	}
	final, err := newBrowser(o).login(t.Context(), caddy.Base+"/oauth/authorize?"+q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	code := final.Query().Get("code")
	if code == "" {
		t.Fatalf("no code: %s", final.Redacted())
	}

	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k1"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	assertion, err := jwt.Signed(signer).Claims(jwt.Claims{
		Issuer: docURL, Subject: docURL, Audience: jwt.Audience{asm.Issuer}, ID: "jti-" + oauth2.GenerateVerifier(),
		IssuedAt: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(2 * time.Minute)),
	}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	form := url.Values{
		"grant_type": {"authorization_code"}, "code": {code}, "code_verifier": {verifier},
		"redirect_uri": {"http://127.0.0.1:49152/callback"}, "client_id": {docURL},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}, "client_assertion": {assertion},
	}
	var tok struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
	}
	resp, err = http.PostForm(asm.TokenEndpoint, form)
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&tok)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || tok.AccessToken == "" {
		t.Fatalf("token: %s", resp.Status)
	}

	// The same assertion again, at the refresh grant: replay.
	resp, err = http.PostForm(asm.TokenEndpoint, url.Values{
		"grant_type": {"refresh_token"}, "refresh_token": {tok.RefreshToken}, "client_id": {docURL},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}, "client_assertion": {assertion},
	})
	if err != nil {
		t.Fatal(err)
	}
	var e struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	json.NewDecoder(resp.Body).Decode(&e)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || e.Error != "invalid_client" || !strings.Contains(e.Description, "already used") {
		t.Errorf("replayed assertion: %s %+v", resp.Status, e)
	}

	// The access token opens the MCP endpoint.
	req, _ := http.NewRequest(http.MethodPost, caddy.Base+"/mcp", strings.NewReader(
		`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`))
	req.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("MCP initialize with the token: %s", resp.Status)
	}
}
