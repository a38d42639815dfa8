package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// The MCP client of Enterprise-Managed Authorization: a confidential client at the
// enterprise IdP (for single sign-on and the ID-JAG exchange), and at the broker.
const (
	emaAgentID     = "mcp-agent"
	emaAgentSecret = "mcp-agent-secret-0123456789abcdef"
	// emaConfiguredAgentID is the agent as the broker's admin configured it, with a
	// secret from the environment (emaConfiguredSecretVar), instead of registering.
	emaConfiguredAgentID   = "configured-agent"
	emaConfiguredSecretVar = "MCP_E2E_AGENT_SECRET"
	idJAGTokenType         = "urn:ietf:params:oauth:token-type:id-jag"
	jwtBearerGrant         = "urn:ietf:params:oauth:grant-type:jwt-bearer"
)

// TestEnterpriseManagedAuthorization runs the extension's whole flow through the caddy
// binary: the user signs in to the agent at the enterprise IdP (oidc-provider, keycloak
// profile), the agent exchanges the ID token there for an ID-JAG naming the broker and
// the MCP server, redeems it at the broker with the JWT bearer grant, and calls a tool;
// the upstream (delegation none) sees the user the IdP named. No consent page, no login
// at the broker.
func TestEnterpriseManagedAuthorization(t *testing.T) {
	requireInterop(t)
	idp := startNodeIdP(t, profileKeycloak, nodeBrokerClient(), nodeClient{
		"client_id":      emaAgentID,
		"client_secret":  emaAgentSecret,
		"redirect_uris":  []string{"http://127.0.0.1/oauth/callback"},
		"grant_types":    []string{"authorization_code", "refresh_token"},
		"response_types": []string{"code"},
		// Native: a loopback redirect URI on any port.
		"application_type": "native",
	})
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	upURL, _ := url.Parse(up.URL)
	configuredSecret := strings.Repeat("5e", 32)
	adminPort := freePort(t)
	caddy := startCaddy(t, fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		mode hybrid
		issuer %[1]s
		client_id %[2]s
		client_secret %[3]s
		resource http://127.0.0.1:{port}/mcp
		scopes openid notes:read notes:write
		encryption_key %[4]s
		registration on
		delegation none
		client %[6]s {
			name "Configured agent"
			redirect_uri http://127.0.0.1/callback
			secret {env.%[7]s}
		}
		enterprise_managed {
			issuer %[1]s {
				jwks_uri %[1]s/jwks
			}
		}
	}
	reverse_proxy %[5]s
}`, idp.Issuer, nodeBrokerClientID, nodeBrokerClientSecret, testKey, upURL.Host, emaConfiguredAgentID, emaConfiguredSecretVar),
		withEnv(emaConfiguredSecretVar+"="+configuredSecret), withAdmin(adminPort))

	t.Run("the broker advertises the grant and the profile", func(t *testing.T) {
		resp, err := http.Get(caddy.Base + "/.well-known/oauth-authorization-server")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var md struct {
			GrantTypes []string `json:"grant_types_supported"`
			Profiles   []string `json:"authorization_grant_profiles_supported"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&md); err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(md.GrantTypes, jwtBearerGrant) || !slices.Equal(md.Profiles, []string{"urn:ietf:params:oauth:grant-profile:id-jag"}) {
			t.Errorf("metadata: grant types %v, profiles %v", md.GrantTypes, md.Profiles)
		}
	})

	// The agent registers at the broker as a confidential client of the grant; the
	// enterprise's admin maps it at the IdP and allows it notes:read there.
	clientID, secret := registerEMAClient(t, caddy)
	setIdPClientSettings(t, idp, emaAgentID, map[string]any{"idJag": map[string]any{"clientId": clientID, "scope": "notes:read"}})

	// Single sign-on to the agent, then the ID-JAG for the broker and the MCP server.
	agent := newNodeIdPClient(t, idp).as(emaAgentID, emaAgentSecret)
	sso := agent.login(t, []string{"openid"})
	idToken, _ := sso.Extra("id_token").(string)
	if idToken == "" {
		t.Fatal("the IdP issued no ID token")
	}
	// idJAG exchanges the ID token at the IdP for an ID-JAG naming the client the IdP
	// maps the agent to.
	idJAG := func(t *testing.T) string {
		t.Helper()
		status, out := agent.postForm(t, "token_endpoint", url.Values{
			"grant_type":           {tokenExchangeGrant},
			"requested_token_type": {idJAGTokenType},
			"audience":             {caddy.Base},
			"resource":             {caddy.Base + "/mcp"},
			"scope":                {"notes:read notes:write"},
			"subject_token":        {idToken},
			"subject_token_type":   {"urn:ietf:params:oauth:token-type:id_token"},
		})
		if status != http.StatusOK || out["issued_token_type"] != idJAGTokenType || out["token_type"] != "N_A" || out["scope"] != "notes:read" {
			t.Fatalf("ID-JAG exchange: %d %v", status, out)
		}
		jag := out["access_token"].(string)
		if h := jwtHeader(t, jag); h["typ"] != "oauth-id-jag+jwt" {
			t.Fatalf("ID-JAG header %v", h)
		}
		return jag
	}
	jag := idJAG(t)

	redeemAs := func(clientID, assertion, secret string) (int, map[string]any) {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, caddy.Base+"/oauth/token",
			strings.NewReader(url.Values{"grant_type": {jwtBearerGrant}, "assertion": {assertion}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth(url.QueryEscape(clientID), url.QueryEscape(secret))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&body)
		return resp.StatusCode, body
	}
	redeem := func(assertion, secret string) (int, map[string]any) { return redeemAs(clientID, assertion, secret) }

	t.Run("an unauthenticated client is refused", func(t *testing.T) {
		if status, body := redeem(jag, "wrong-secret"); status != http.StatusUnauthorized || body["error"] != "invalid_client" {
			t.Fatalf("wrong secret: %d %v", status, body)
		}
	})

	status, tok := redeem(jag, secret)
	if status != http.StatusOK || tok["scope"] != "notes:read" || tok["refresh_token"] != nil {
		t.Fatalf("jwt-bearer at the broker: %d %v\n%s", status, tok, tail(caddy.logs.String()))
	}
	access := tok["access_token"].(string)

	t.Run("the tool call reaches the upstream as the IdP's user", func(t *testing.T) {
		s, err := mcp.NewClient(&mcp.Implementation{Name: "e2e-agent", Version: "1"}, nil).Connect(t.Context(),
			&mcp.StreamableClientTransport{Endpoint: caddy.Base + "/mcp", HTTPClient: testenv.BearerClient(access), DisableStandaloneSSE: true, MaxRetries: -1}, nil)
		if err != nil {
			t.Fatalf("connecting: %v\n%s", err, tail(caddy.logs.String()))
		}
		defer s.Close()
		res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "whoami"})
		if err != nil || res.IsError {
			t.Fatalf("whoami: %v %+v", err, res)
		}
		var who testenv.Identity
		if err := json.Unmarshal([]byte(res.Content[0].(*mcp.TextContent).Text), &who); err != nil {
			t.Fatal(err)
		}
		if who.Subject != nodeUser {
			t.Errorf("the upstream saw %q, want %q", who.Subject, nodeUser)
		}
	})

	t.Run("the same ID-JAG is refused the second time", func(t *testing.T) {
		if status, body := redeem(jag, secret); status != http.StatusBadRequest || body["error"] != "invalid_grant" {
			t.Fatalf("replay: %d %v", status, body)
		}
		if _, ok := caddy.waitForLog("ID-JAG presented again"); !ok {
			t.Error("the replay was not logged")
		}
	})

	// The enterprise's admin configured the agent in the Caddyfile, its secret in the
	// environment, and maps it at the IdP instead of the registered one.
	t.Run("an agent configured with a secret from the environment", func(t *testing.T) {
		setIdPClientSettings(t, idp, emaAgentID, map[string]any{"idJag": map[string]any{"clientId": emaConfiguredAgentID, "scope": "notes:read"}})
		jag := idJAG(t)
		if status, body := redeemAs(emaConfiguredAgentID, jag, strings.Repeat("5e", 31)+"5f"); status != http.StatusUnauthorized || body["error"] != "invalid_client" {
			t.Fatalf("wrong secret: %d %v", status, body)
		}
		if status, body := redeemAs(emaConfiguredAgentID, jag, ""); status != http.StatusUnauthorized || body["error"] != "invalid_client" {
			t.Fatalf("no secret: %d %v", status, body)
		}
		status, tok := redeemAs(emaConfiguredAgentID, jag, configuredSecret)
		if status != http.StatusOK || tok["scope"] != "notes:read" {
			t.Fatalf("jwt-bearer as the configured agent: %d %v\n%s", status, tok, tail(caddy.logs.String()))
		}
		caddy.assertLogsFree(jag, tok["access_token"].(string))

		// Caddy's admin API shows the configuration as written: the placeholder.
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/config/", adminPort))
		if err != nil {
			t.Fatal(err)
		}
		cfg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(cfg), "{env."+emaConfiguredSecretVar+"}") || strings.Contains(string(cfg), configuredSecret) {
			t.Errorf("the admin API's configuration lacks the placeholder or holds the secret")
		}
	})

	caddy.assertLogsFree(jag, access, secret, idToken, configuredSecret)
}

// registerEMAClient registers a confidential client of the JWT bearer grant at the broker
// and returns its id and secret.
func registerEMAClient(t *testing.T, caddy *caddyProc) (string, string) {
	t.Helper()
	body, _ := json.Marshal(map[string]any{
		"client_name": "Enterprise agent", "redirect_uris": []string{"http://127.0.0.1/callback"},
		"token_endpoint_auth_method": "client_secret_basic",
		"grant_types":                []string{"authorization_code", jwtBearerGrant},
	})
	resp, err := http.Post(caddy.Base+"/oauth/register", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var reg struct {
		ClientID     string `json:"client_id"`
		ClientSecret string `json:"client_secret"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&reg); err != nil || resp.StatusCode != http.StatusCreated || reg.ClientSecret == "" {
		t.Fatalf("DCR at the broker: %s %v", resp.Status, err)
	}
	return reg.ClientID, reg.ClientSecret
}

// setIdPClientSettings changes a client's settings at the Node IdP (its test hook).
func setIdPClientSettings(t *testing.T, idp *NodeIdP, clientID string, settings map[string]any) {
	t.Helper()
	body, _ := json.Marshal(settings)
	resp, err := http.Post(idp.Issuer+"/test/client-settings?client_id="+url.QueryEscape(clientID), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("client settings: %s", resp.Status)
	}
}
