package e2e

import (
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/modelcontextprotocol/go-sdk/oauthex"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// hybridSite is a Caddyfile site for hybrid mode in front of upstream, delegating with
// token exchange for the audience `nextcloud`; extra lines go inside mcp_oauth.
func hybridSite(o *testenv.OP, upstream string, extra string) string {
	up, _ := url.Parse(upstream)
	return fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		mode hybrid
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:{port}/mcp
		scopes openid notes:read notes:write
		encryption_key %s
		client preregistered {
			name "Pre-registered Test Client"
			redirect_uri http://127.0.0.1/callback
		}
		delegation token_exchange {
			audience nextcloud
			scopes notes:read
		}
		tool_scope notes_write notes:write
		tool_scope notes_read notes:read
%s
	}
	reverse_proxy %s
}`, o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, testKey, extra, up.Host)
}

// connectHybrid connects the go-sdk client with its OAuth handler through caddy.
func connectHybrid(t *testing.T, base string, cfg *auth.AuthorizationCodeHandlerConfig) (*mcp.ClientSession, *auth.AuthorizationCodeHandler) {
	t.Helper()
	handler, err := auth.NewAuthorizationCodeHandler(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s, err := mcp.NewClient(&mcp.Implementation{Name: "e2e-hybrid", Version: "1"}, nil).Connect(t.Context(),
		&mcp.StreamableClientTransport{Endpoint: base + "/mcp", OAuthHandler: handler, DisableStandaloneSSE: true}, nil)
	if err != nil {
		t.Fatalf("connecting: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, handler
}

// checkDelegation calls the read and write tools and whoami, and asserts what the
// upstream saw: tokens for audience nextcloud, scoped per tool, never the client's.
func checkDelegation(t *testing.T, s *mcp.ClientSession, up *testenv.Upstream, o *testenv.OP, clientToken string) {
	t.Helper()
	up.Reset()
	if res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "hello"}}); err != nil || res.IsError {
		t.Fatalf("notes_write: %v %+v", err, res)
	}
	if res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_read"}); err != nil || res.IsError {
		t.Fatalf("notes_read: %v %+v", err, res)
	}
	if who := whoami(t, s); who.Subject != o.User.Subject || !slices.Equal(who.Audience, []string{"nextcloud"}) {
		t.Errorf("whoami: %+v", who)
	}
	scopesOf := map[string][]string{}
	for _, r := range up.Seen() {
		if r.Authorization == "Bearer "+clientToken || strings.Contains(fmt.Sprint(r.Header), clientToken) {
			t.Fatalf("upstream received the client's token")
		}
		if r.AuthError != "" {
			t.Errorf("upstream refused the delegated token: %s", r.AuthError)
		}
		if r.RPCMethod == "tools/call" {
			scopesOf[fmt.Sprint(r.Identity.Scopes)] = r.Identity.Audience
		}
	}
	var sets []string
	for k := range scopesOf {
		sets = append(sets, k)
	}
	slices.Sort(sets)
	if !slices.Contains(sets, "[notes:write]") || !slices.Contains(sets, "[notes:read]") {
		t.Errorf("scope sets the upstream saw on tools/call: %v, want [notes:read] and [notes:write] apart", sets)
	}
}

// TestHybridDCRThroughCaddyBinary: the go-sdk client registers by DCR, consents, logs in
// at the IdP through the broker, calls tools; the upstream sees delegated tokens; a
// refresh works; Caddy restarts between callback and token exchange without loss.
func TestHybridDCRThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
	caddy := startCaddy(t, hybridSite(o, up.URL, ""))

	br := newBrowser(o)
	br.onCode = caddy.restart // between callback and token exchange
	s, handler := connectHybrid(t, caddy.Base, &auth.AuthorizationCodeHandlerConfig{
		DynamicClientRegistrationConfig: &auth.DynamicClientRegistrationConfig{Metadata: &oauthex.ClientRegistrationMetadata{
			ClientName:              "e2e DCR client",
			RedirectURIs:            []string{"http://127.0.0.1:49152/callback"},
			GrantTypes:              []string{"authorization_code", "refresh_token"},
			TokenEndpointAuthMethod: "none",
		}},
		RedirectURL:              "http://127.0.0.1:49152/callback",
		AuthorizationCodeFetcher: br.fetch,
	})
	if br.consents != 1 || len(br.visited) != 1 || !strings.HasPrefix(br.visited[0], caddy.Base+"/oauth/authorize?") {
		t.Fatalf("consents %d, authorize URLs %v", br.consents, br.visited)
	}
	ts, err := handler.TokenSource(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	checkDelegation(t, s, up, o, tok.AccessToken)

	// Refresh at the broker's token endpoint: a new pair that works.
	authorizeURL, _ := url.Parse(br.visited[0])
	cfg := oauth2.Config{ClientID: authorizeURL.Query().Get("client_id"), Endpoint: oauth2.Endpoint{TokenURL: caddy.Base + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams}}
	fresh, err := cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: tok.RefreshToken}).Token()
	if err != nil {
		t.Fatalf("refreshing: %v", err)
	}
	if fresh.AccessToken == tok.AccessToken || fresh.RefreshToken == tok.RefreshToken {
		t.Errorf("refresh did not rotate")
	}
	resp := bearerGet(t, caddy.Base+"/mcp", fresh.AccessToken)
	if resp.StatusCode == http.StatusUnauthorized {
		t.Errorf("refreshed token refused: %s", resp.Status)
	}
	caddy.assertLogsFree(append(br.codes, tok.AccessToken, tok.RefreshToken, fresh.AccessToken, fresh.RefreshToken,
		testenv.BrokerClientSecret, testKey)...)
}

func bearerGet(t *testing.T, u, token string) *http.Response {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, u, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

// connectPreregistered logs in at base with the Caddyfile's "preregistered" client through
// br (the OP's login form), and returns the MCP session and the broker's tokens.
func connectPreregistered(t *testing.T, base string, br *browser) (*mcp.ClientSession, *oauth2.Token) {
	t.Helper()
	s, handler := connectHybrid(t, base, &auth.AuthorizationCodeHandlerConfig{
		PreregisteredClient:      &oauthex.ClientCredentials{ClientID: "preregistered"},
		RedirectURL:              "http://127.0.0.1:49152/callback",
		AuthorizationCodeFetcher: br.fetch,
	})
	ts, err := handler.TokenSource(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	return s, tok
}

// TestHybridPreregisteredThroughCaddyBinary: a client from the Caddyfile, no DCR.
func TestHybridPreregisteredThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
	caddy := startCaddy(t, hybridSite(o, up.URL, "\t\tregistration off"))
	br := newBrowser(o)
	s, tok := connectPreregistered(t, caddy.Base, br)
	checkDelegation(t, s, up, o, tok.AccessToken)
	if resp, err := http.Post(caddy.Base+"/oauth/register", "application/json", strings.NewReader(`{"redirect_uris":["http://127.0.0.1/cb"]}`)); err != nil || resp.StatusCode < 400 {
		t.Errorf("registration off, yet register answered %v %v", resp.Status, err)
	}
}

// TestHybridCIMDThroughCaddyBinary: the client id is the https URL of its metadata
// document, served by a test server whose certificate caddy is told to trust.
func TestHybridCIMDThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
	var docURL string
	docs := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "max-age=300")
		json.NewEncoder(w).Encode(map[string]any{
			"client_id": docURL, "client_name": "CIMD Test Client", "redirect_uris": []string{"http://127.0.0.1/callback"},
			"grant_types": []string{"authorization_code", "refresh_token"}, "response_types": []string{"code"},
			"token_endpoint_auth_method": "none",
		})
	}))
	t.Cleanup(docs.Close)
	docURL = docs.URL + "/client.json"
	certFile := filepath.Join(t.TempDir(), "cimd.pem")
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: docs.Certificate().Raw})
	if err := os.WriteFile(certFile, pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	caddy := startCaddy(t, hybridSite(o, up.URL, "\t\tclient_metadata_allow_private"), withEnv("SSL_CERT_FILE="+certFile))

	br := newBrowser(o)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: docs.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs}}}
	s, handler := connectHybrid(t, caddy.Base, &auth.AuthorizationCodeHandlerConfig{
		ClientIDMetadataDocumentConfig: &auth.ClientIDMetadataDocumentConfig{URL: docURL},
		RedirectURL:                    "http://127.0.0.1:49152/callback",
		AuthorizationCodeFetcher:       br.fetch,
		Client:                         hc,
	})
	ts, _ := handler.TokenSource(t.Context())
	tok, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	if q, _ := url.Parse(br.visited[0]); q.Query().Get("client_id") != docURL {
		t.Errorf("client_id sent: %q", q.Query().Get("client_id"))
	}
	checkDelegation(t, s, up, o, tok.AccessToken)
}

// dcrRegister registers a public client at the broker by RFC 7591 and returns its id.
func dcrRegister(t *testing.T, base string) string {
	t.Helper()
	body := `{"client_name":"e2e client","redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none","grant_types":["authorization_code","refresh_token"]}`
	resp, err := http.Post(base+"/oauth/register", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		ClientID string `json:"client_id"`
	}
	json.NewDecoder(resp.Body).Decode(&out)
	if resp.StatusCode != http.StatusCreated || out.ClientID == "" {
		t.Fatalf("registering: %s", resp.Status)
	}
	return out.ClientID
}
