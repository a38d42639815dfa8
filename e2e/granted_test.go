package e2e

import (
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// hybridTokenExchangeBlock is hybridSite's delegation block.
const hybridTokenExchangeBlock = `delegation token_exchange {
			audience nextcloud
			scopes notes:read
		}`

// TestHybridIdPRefusedScopeThroughCaddyBinary: the IdP refuses notes:write to the
// broker's client (silently, as the Nextcloud oidc app drops a scope the client is not
// allowed); under delegation none the user's broker token lacks it, notes_write gets
// 403 insufficient_scope and never reaches the upstream, notes_read works
// (SECURITY.md: broker tokens and the IdP grant).
func TestHybridIdPRefusedScopeThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t, testenv.WithScopesRefused("notes:write"))
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	site := hybridSite(o, up.URL, "")
	if !strings.Contains(site, hybridTokenExchangeBlock) {
		t.Fatal("hybridSite's delegation block changed")
	}
	caddy := startCaddy(t, strings.Replace(site, hybridTokenExchangeBlock, "delegation none", 1))

	br := newBrowser(o)
	s, tok := connectPreregistered(t, caddy.Base, br)
	scope, _ := tok.Extra("scope").(string)
	if got := strings.Fields(scope); !slices.Contains(got, "notes:read") || slices.Contains(got, "notes:write") {
		t.Errorf("broker token scope %q, want notes:read without notes:write", scope)
	}

	up.Reset()
	resp := postJSON(t, caddy.Base+"/mcp", tok.AccessToken,
		`{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`)
	if challenge := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != http.StatusForbidden ||
		!strings.Contains(challenge, `error="insufficient_scope"`) {
		t.Errorf("notes_write: %s %q, want 403 insufficient_scope", resp.Status, challenge)
	}
	for _, r := range up.Seen() {
		if r.RPCMethod == "tools/call" {
			t.Error("the refused tool call reached the upstream")
		}
	}
	if res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_read"}); err != nil || res.IsError {
		t.Errorf("notes_read: %v %+v", err, res)
	}
}

// postJSON POSTs an MCP JSON-RPC body with token and returns the response, body closed.
func postJSON(t *testing.T, u, token, body string) *http.Response {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, u, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

// hybridNodeDelegationBlock is hybridNodeSite's delegation block.
const hybridNodeDelegationBlock = `delegation {
			audience nextcloud
			scopes notes:read
		}`

// TestInteropHybridNextcloudRefusedScope: the Nextcloud-like IdP (interop/idp.mjs) does
// not allow the broker's client notes:write: it drops the scope without an error, its
// token answer names no scope and its access token is opaque. The broker learns the
// grant by introspection; under delegation none the user's token lacks notes:write and
// notes_write gets 403 insufficient_scope through the caddy binary.
func TestInteropHybridNextcloudRefusedScope(t *testing.T) {
	idp := startNodeIdPConfig(t, profileNextcloud, map[string]any{
		"clients":       []nodeClient{nodeBrokerClient()},
		"allowedScopes": map[string]string{nodeBrokerClientID: "openid offline_access notes:read"},
	})
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	site := hybridNodeSite(idp, up.URL, "\t\ttool_scope notes_write notes:write\n\t\ttool_scope notes_read notes:read")
	if !strings.Contains(site, hybridNodeDelegationBlock) {
		t.Fatal("hybridNodeSite's delegation block changed")
	}
	caddy := startCaddy(t, strings.Replace(site, hybridNodeDelegationBlock, "delegation none", 1))

	tok := brokerToken(t, caddy, idp)
	scope, _ := tok.Extra("scope").(string)
	if got := strings.Fields(scope); !slices.Contains(got, "notes:read") || slices.Contains(got, "notes:write") {
		t.Errorf("broker token scope %q, want notes:read without notes:write", scope)
	}
	resp := postJSON(t, caddy.Base+"/mcp", tok.AccessToken,
		`{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`)
	if challenge := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != http.StatusForbidden ||
		!strings.Contains(challenge, `error="insufficient_scope"`) {
		t.Errorf("notes_write: %s %q, want 403 insufficient_scope", resp.Status, challenge)
	}
	s, err := mcp.NewClient(&mcp.Implementation{Name: "e2e", Version: "1"}, nil).Connect(t.Context(),
		&mcp.StreamableClientTransport{Endpoint: caddy.Base + "/mcp", HTTPClient: testenv.BearerClient(tok.AccessToken), DisableStandaloneSSE: true}, nil)
	if err != nil {
		t.Fatalf("connecting: %v", err)
	}
	defer s.Close()
	if res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_read"}); err != nil || res.IsError {
		t.Errorf("notes_read: %v %+v", err, res)
	}
}
