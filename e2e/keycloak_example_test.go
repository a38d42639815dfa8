package e2e

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/oauthex"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// keycloakExampleSite is docs/examples/keycloak.Caddyfile without its comments, and with
// the names an admin replaces replaced: the broker's public URL by caddy's on port, the
// realm's issuer by the Keycloak-like IdP's, the MCP server's address, the client's
// secret and the key file by the test's. The client ids (mcp-broker, the audience
// nextcloud-mcp-server) stay as the example has them.
func keycloakExampleSite(t *testing.T, idp *NodeIdP, mcpServer *testenv.NextcloudMCP, port int) string {
	t.Helper()
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	up, _ := url.Parse(mcpServer.URL)
	return exampleSite(t, "../docs/examples/keycloak.Caddyfile",
		"https://mcp.example.com", base,
		"\nmcp.example.com {", "\n"+base+" {",
		"https://keycloak.example.com/realms/main", idp.Issuer,
		"{env.MCP_BROKER_CLIENT_SECRET}", nodeBrokerClientSecret,
		"{file./etc/caddy/mcp_oauth.key}", testKey,
		"reverse_proxy 127.0.0.1:8000", "reverse_proxy "+up.Host,
	)
}

// TestKeycloakExampleThroughCaddyBinary (issue 12, deployment A with Keycloak): the caddy
// binary runs docs/examples/keycloak.Caddyfile itself (keycloakExampleSite) in front of
// the stand-in for the Nextcloud MCP server in login_flow mode (testenv.NextcloudMCP,
// whose client id is the example's delegation audience), with the Keycloak-like IdP
// (RFC 8693 token exchange). A user logs in through the broker asking only notes.read:
// tools/list shows the tools notes.read and openid cover (calls no tool_scope rule
// covers get the session's whole grant); the user provisions an app password (its login
// URL opened directly, not through the broker); the read tool works; the write tool,
// which a tool_scope rule covers, is refused by the broker itself with 403
// insufficient_scope and a step-up challenge naming notes.write; after a
// re-authorization asking notes.write it works, and the token the server saw for it was
// exchanged for aud nextcloud-mcp-server with notes.write alone. No token the client
// holds ever reached the server.
func TestKeycloakExampleThroughCaddyBinary(t *testing.T) {
	requireInterop(t)
	idp := startNodeIdPConfig(t, profileKeycloak, map[string]any{"clients": []nodeClient{nodeBrokerClient()}})
	disc, err := idp.Discovery(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	// As the example says: the MCP server's public URL is the broker's, its client id the
	// delegation audience, its issuer the realm's.
	port := freePort(t)
	server := testenv.StartNextcloudMCP(t, testenv.NextcloudMCPSettings{
		Issuer:        idp.Issuer,
		NextcloudHost: "http://nextcloud.test",
		JWKSURI:       disc["jwks_uri"].(string),
		ClientID:      "nextcloud-mcp-server",
		ServerURL:     fmt.Sprintf("http://127.0.0.1:%d", port),
	})
	caddy := startCaddy(t, keycloakExampleSite(t, idp, server, port), withPort(port))

	var held []string // hashes of every token the client held
	newNote := map[string]any{"title": "groceries", "content": "milk", "category": ""}

	// 1. Login asking only the read scope.
	readTok := nextcloudLogin(t, caddy, idp, "notes.read")
	held = append(held, tokenHashes(readTok)...)
	if got := strings.Fields(fmt.Sprint(readTok.Extra("scope"))); !slices.Contains(got, "notes.read") || slices.Contains(got, "notes.write") {
		t.Fatalf("broker token scope %v", got)
	}
	s := connectNextcloud(t, caddy, server, readTok)

	t.Run("tools/list shows the tools notes.read and openid cover", func(t *testing.T) {
		checkNextcloudReadTools(t, s)
	})
	t.Run("the user provisions an app password; the login URL is not the broker's", func(t *testing.T) {
		provisionNextcloud(t, s, server)
	})
	t.Run("the read tool works", func(t *testing.T) {
		if text, res := callNextcloudTool(t, s, "nc_notes_search_notes", map[string]any{"query": ""}); res.IsError {
			t.Errorf("nc_notes_search_notes: %q", text)
		}
	})

	t.Run("the write tool is refused by the broker: 403 insufficient_scope naming notes.write", func(t *testing.T) {
		before := len(server.Seen())
		resp := postJSON(t, caddy.Base+"/mcp", readTok.AccessToken,
			`{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"nc_notes_create_note","arguments":{"title":"groceries","content":"milk","category":""}}}`)
		header := resp.Header.Values("WWW-Authenticate")
		challenges, err := oauthex.ParseWWWAuthenticate(header)
		if err != nil || len(challenges) != 1 || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("nc_notes_create_note without notes.write: %s %q (%v), want the broker's 403", resp.Status, header, err)
		}
		c := challenges[0]
		if c.Scheme != "bearer" || c.Params["error"] != "insufficient_scope" || !slices.Contains(strings.Fields(c.Params["scope"]), "notes.write") ||
			c.Params["resource_metadata"] != caddy.Base+"/.well-known/oauth-protected-resource/mcp" {
			t.Errorf("the step-up challenge %q, want insufficient_scope naming notes.write and the broker's metadata", header)
		}
		if got := server.Seen()[before:]; len(got) != 0 {
			t.Errorf("the refused call reached the server: %+v", got)
		}
	})

	// 2. Re-authorization asking the write scope.
	writeTok := nextcloudLogin(t, caddy, idp, "notes.read", "notes.write")
	held = append(held, tokenHashes(writeTok)...)
	s = connectNextcloud(t, caddy, server, writeTok)
	var writeCall []testenv.NextcloudMCPRequest
	t.Run("after a re-authorization with notes.write the write tool works", func(t *testing.T) {
		before := len(server.Seen())
		if text, res := callNextcloudTool(t, s, "nc_notes_create_note", newNote); res.IsError {
			t.Errorf("nc_notes_create_note: %q", text)
		}
		writeCall = server.Seen()[before:]
		if text, res := callNextcloudTool(t, s, "nc_notes_search_notes", map[string]any{"query": "milk"}); res.IsError || !strings.Contains(text, "groceries") {
			t.Errorf("the new note not found: %q", text)
		}
	})

	t.Run("the write reached the server with a token exchanged for its client id, notes.write alone", func(t *testing.T) {
		if len(writeCall) != 1 || writeCall[0].RPCMethod != "tools/call" {
			t.Fatalf("the server saw for the write: %+v", writeCall)
		}
		c := writeCall[0].Claims
		if !slices.Equal(c.Audience, []string{"nextcloud-mcp-server"}) || !slices.Equal(c.Scopes, []string{"notes.write"}) ||
			c.Issuer != idp.Issuer || c.Subject != nodeUser || c.ClientID != nodeBrokerClientID {
			t.Errorf("claims of the write's token %+v, want aud [nextcloud-mcp-server], scope [notes.write], iss %s, sub %s", c, idp.Issuer, nodeUser)
		}
	})

	t.Run("the server saw only exchanged tokens it accepts, never the client's", func(t *testing.T) {
		seen := server.Seen()
		if len(seen) == 0 {
			t.Fatal("the server saw nothing")
		}
		for _, r := range seen {
			if r.TokenSHA256 == "" || r.Error != "" {
				t.Errorf("%s %s: token refused: %q", r.Method, r.RPCMethod, r.Error)
				continue
			}
			if slices.Contains(held, r.TokenSHA256) {
				t.Fatalf("%s %s reached the server with a token the client holds", r.Method, r.RPCMethod)
			}
			c := r.Claims
			if c.Issuer != idp.Issuer || !slices.Equal(c.Audience, []string{"nextcloud-mcp-server"}) || c.Subject != nodeUser {
				t.Errorf("%s %s: claims %+v, want iss %s aud [nextcloud-mcp-server] sub %s", r.Method, r.RPCMethod, c, idp.Issuer, nodeUser)
			}
			if !slices.Equal(c.Scopes, []string{"notes.write"}) && (!slices.Contains(c.Scopes, "openid") || !slices.Contains(c.Scopes, "notes.read")) {
				t.Errorf("%s %s: scopes %v are neither the whole grant nor the write rule's", r.Method, r.RPCMethod, c.Scopes)
			}
		}
	})
}
