package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// nextcloudSiteA is deployment A of the Nextcloud guide for the `oidc` app, as
// Caddyfile.example has it, with the test's addresses: the broker is the MCP clients'
// authorization server (hybrid), users log in at Nextcloud, and the MCP server, in its
// login_flow mode, gets for each call a token it validates itself: the refresh grant (the
// app has no RFC 8693) of a JWT whose audience is the MCP server's URL. No tool_scope
// rule: the MCP server filters its tools and enforces each tool's scope itself.
func nextcloudSiteA(idp *NodeIdP, mcpServer *testenv.NextcloudMCP) string {
	up, _ := url.Parse(mcpServer.URL)
	return fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		mode hybrid
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:{port}/mcp
		scopes openid notes.read notes.write
		encryption_key %s
		delegation refresh {
			audience %s/mcp
		}
	}
	reverse_proxy %s
}`, idp.Issuer, nodeBrokerClientID, nodeBrokerClientSecret, testKey, mcpServer.URL, up.Host)
}

// TestNextcloudDeploymentAThroughCaddyBinary (issue 12, deployment A): the caddy binary
// in front of the stand-in for the Nextcloud MCP server in login_flow mode
// (testenv.NextcloudMCP), with the Nextcloud-like IdP (the oidc app 2.0.9; the broker's
// client there of token type JWT, with no resource identifier). A user logs in through
// the broker asking only notes.read: tools/list shows the tools that scope covers (the
// server hides nc_notes_create_note); the user provisions an app password (the openid
// the broker delegates makes that possible; the login URL is opened directly, not
// through the broker); the read tool works; the write tool answers the server's own
// isError refusal in an HTTP 200, since no tool_scope rule stops it at the broker; after a
// re-authorization asking notes.write it works. Every token the server saw was a JWT it
// accepts (iss the IdP, aud its URL, sub the user), never one the client holds.
//
// The audience reaches the JWT two ways, one row each: the broker sends the delegation
// audience as the RFC 8707 resource at the IdP's authorization endpoint; or the admin
// sets it as the resource identifier of the broker's client in the oidc app.
//
// The first row runs Caddyfile.example itself, only its hosts, secrets and key replaced
// (nextcloudExampleSite), so that what the README tells an admin to copy is what passes.
func TestNextcloudDeploymentAThroughCaddyBinary(t *testing.T) {
	for _, row := range []struct {
		name               string
		resourceIdentifier bool
		example            bool
	}{
		{"Caddyfile.example: audience sent as the resource at the IdP", false, true},
		{"audience set as the client's resource identifier in the oidc app", true, false},
	} {
		t.Run(row.name, func(t *testing.T) { nextcloudDeploymentA(t, row.resourceIdentifier, row.example) })
	}
}

// nextcloudExampleSite is Caddyfile.example without its comments, and with the names an
// admin replaces replaced:
// the broker's public URL by caddy's on port, both of Nextcloud's URLs by the IdP's, the
// MCP server's address, the client's credentials and the key file by the test's.
func nextcloudExampleSite(t *testing.T, idp *NodeIdP, mcpServer *testenv.NextcloudMCP, port int) string {
	t.Helper()
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	up, _ := url.Parse(mcpServer.URL)
	return exampleSite(t, "../Caddyfile.example",
		"https://mcp.example.com", base,
		"\nmcp.example.com {", "\n"+base+" {",
		"http://nextcloud.internal", idp.Issuer,
		"https://cloud.example.com", idp.Issuer,
		"{env.MCP_BROKER_CLIENT_ID}", nodeBrokerClientID,
		"{env.MCP_BROKER_CLIENT_SECRET}", nodeBrokerClientSecret,
		"{file./etc/caddy/mcp_oauth.key}", testKey,
		"reverse_proxy 127.0.0.1:8000", "reverse_proxy "+up.Host,
	)
}

// exampleSite is the example Caddyfile at path without its comments, with oldnew's pairs
// (old, new, as strings.NewReplacer takes them) replaced: the names an admin replaces,
// and nothing else. It fails the test when a name an admin would replace is left.
func exampleSite(t *testing.T, path string, oldnew ...string) string {
	t.Helper()
	example, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	site := strings.NewReplacer(oldnew...).Replace(stripCaddyfileComments(string(example)))
	for _, left := range []string{"example.com", ".internal", "{env.", "{file.", ":8000\n"} {
		if strings.Contains(site, left) {
			t.Fatalf("%s: %q left after replacing the names an admin changes", path, left)
		}
	}
	return site
}

// stripCaddyfileComments drops the comment lines of a Caddyfile.
func stripCaddyfileComments(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func nextcloudDeploymentA(t *testing.T, resourceIdentifier, example bool) {
	requireInterop(t)
	idp := startNodeIdPConfig(t, profileNextcloud, map[string]any{
		"clients":    []nodeClient{nodeBrokerClient()},
		"tokenTypes": map[string]string{nodeBrokerClientID: "jwt"},
	})
	disc, err := idp.Discovery(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	settings := testenv.NextcloudMCPSettings{
		Issuer:        idp.Issuer, // the issuer its discovery finds
		NextcloudHost: idp.Issuer,
		JWKSURI:       disc["jwks_uri"].(string),
		ClientID:      "nextcloud-mcp-server",
	}
	var caddy *caddyProc
	var server *testenv.NextcloudMCP
	if example {
		// As Caddyfile.example says: the MCP server's public URL is the broker's.
		port := freePort(t)
		settings.ServerURL = fmt.Sprintf("http://127.0.0.1:%d", port)
		server = testenv.StartNextcloudMCP(t, settings)
		caddy = startCaddy(t, nextcloudExampleSite(t, idp, server, port), withPort(port))
	} else {
		server = testenv.StartNextcloudMCP(t, settings)
		if resourceIdentifier {
			idp.setClientSettings(t, nodeBrokerClientID, map[string]string{"resourceUrl": server.URL + "/mcp"})
		}
		caddy = startCaddy(t, nextcloudSiteA(idp, server))
	}

	var held []string // hashes of every token the client held
	login := func(t *testing.T, scopes ...string) *oauth2.Token {
		t.Helper()
		tok := nextcloudLogin(t, caddy, idp, scopes...)
		held = append(held, tokenHashes(tok)...)
		return tok
	}
	connect := func(t *testing.T, tok *oauth2.Token) *mcp.ClientSession {
		t.Helper()
		return connectNextcloud(t, caddy, server, tok)
	}
	call := callNextcloudTool
	newNote := map[string]any{"title": "groceries", "content": "milk", "category": ""}

	// 1. Login asking only the read scope.
	readTok := login(t, "notes.read")
	if got := strings.Fields(fmt.Sprint(readTok.Extra("scope"))); !slices.Contains(got, "notes.read") || slices.Contains(got, "notes.write") {
		t.Fatalf("broker token scope %v", got)
	}
	s := connect(t, readTok)

	t.Run("tools/list shows the tools notes.read and openid cover", func(t *testing.T) {
		checkNextcloudReadTools(t, s)
	})

	t.Run("the user provisions an app password; the login URL is not the broker's", func(t *testing.T) {
		provisionNextcloud(t, s, server)
	})

	t.Run("the read tool works", func(t *testing.T) {
		if text, res := call(t, s, "nc_notes_search_notes", map[string]any{"query": ""}); res.IsError {
			t.Errorf("nc_notes_search_notes: %q", text)
		}
	})

	t.Run("the write tool is refused by the server, in the tool result", func(t *testing.T) {
		text, res := call(t, s, "nc_notes_create_note", newNote)
		if !res.IsError || !strings.Contains(text, "Missing required scopes: notes.write") {
			t.Errorf("nc_notes_create_note without notes.write: isError %v %q", res.IsError, text)
		}
	})

	// 2. Re-authorization asking the write scope.
	writeTok := login(t, "notes.read", "notes.write")
	s = connect(t, writeTok)
	t.Run("after a re-authorization with notes.write the write tool works", func(t *testing.T) {
		if text, res := call(t, s, "nc_notes_create_note", newNote); res.IsError {
			t.Errorf("nc_notes_create_note: %q", text)
		}
		if text, res := call(t, s, "nc_notes_search_notes", map[string]any{"query": "milk"}); res.IsError || !strings.Contains(text, "groceries") {
			t.Errorf("the new note not found: %q", text)
		}
	})

	t.Run("the server saw only delegated JWTs it accepts, never the client's", func(t *testing.T) {
		seen := server.Seen()
		if len(seen) == 0 {
			t.Fatal("the server saw nothing")
		}
		audience := []string{server.ServerURL + "/mcp"}
		var sawWrite bool
		for _, r := range seen {
			if r.TokenSHA256 == "" || r.Error != "" {
				t.Errorf("%s %s: token refused: %q", r.Method, r.RPCMethod, r.Error)
				continue
			}
			if slices.Contains(held, r.TokenSHA256) {
				t.Fatalf("%s %s reached the server with a token the client holds", r.Method, r.RPCMethod)
			}
			c := r.Claims
			if c.Issuer != idp.Issuer || !slices.Equal(c.Audience, audience) || c.Subject != nodeUser || c.ClientID != nodeBrokerClientID {
				t.Errorf("%s %s: claims %+v, want iss %s aud %v sub %s", r.Method, r.RPCMethod, c, idp.Issuer, audience, nodeUser)
			}
			if !slices.Contains(c.Scopes, "openid") || !slices.Contains(c.Scopes, "notes.read") {
				t.Errorf("%s %s: scopes %v lack openid or notes.read", r.Method, r.RPCMethod, c.Scopes)
			}
			sawWrite = sawWrite || slices.Contains(c.Scopes, "notes.write")
		}
		if !sawWrite {
			t.Errorf("no token with notes.write reached the server after the re-authorization")
		}
	})
}

// nextcloudLogin registers an MCP client at the broker, logs the IdP's user in through
// the broker asking scopes, and returns the broker's tokens. When the test ends, caddy's
// logs must hold none of them, nor the codes of the login.
func nextcloudLogin(t *testing.T, caddy *caddyProc, idp *NodeIdP, scopes ...string) *oauth2.Token {
	t.Helper()
	cfg := brokerClient(t, caddy, "e2e Nextcloud client")
	cfg.Scopes = scopes
	authURL, verifier := brokerAuthorizeURL(cfg, caddy)
	br := newNodeHybridBrowser(idp)
	final, err := br.login(t.Context(), authURL)
	if err != nil {
		t.Fatalf("hybrid login: %v\n%s", err, tail(caddy.logs.String()))
	}
	tok, err := cfg.Exchange(t.Context(), final.Query().Get("code"), oauth2.VerifierOption(verifier),
		oauth2.SetAuthURLParam("resource", caddy.Base+"/mcp"))
	if err != nil {
		t.Fatalf("code at the broker: %v (login ended at %s)", err, final.Redacted())
	}
	t.Cleanup(func() {
		caddy.assertLogsFree(append(br.codes, tok.AccessToken, tok.RefreshToken, nodeBrokerClientSecret, testKey)...)
	})
	return tok
}

// tokenHashes are the hex SHA-256 of a broker token's access and refresh tokens, as
// testenv.NextcloudMCP records the tokens it sees.
func tokenHashes(tok *oauth2.Token) []string {
	var out []string
	for _, s := range []string{tok.AccessToken, tok.RefreshToken} {
		sum := sha256.Sum256([]byte(s))
		out = append(out, hex.EncodeToString(sum[:]))
	}
	return out
}

// connectNextcloud connects an MCP client through the broker with the broker's token tok.
func connectNextcloud(t *testing.T, caddy *caddyProc, server *testenv.NextcloudMCP, tok *oauth2.Token) *mcp.ClientSession {
	t.Helper()
	s, err := mcp.NewClient(&mcp.Implementation{Name: "e2e", Version: "1"}, nil).Connect(t.Context(),
		&mcp.StreamableClientTransport{Endpoint: caddy.Base + "/mcp", HTTPClient: testenv.BearerClient(tok.AccessToken), DisableStandaloneSSE: true}, nil)
	if err != nil {
		t.Fatalf("connecting through the broker: %v\n%s\nthe server refused: %v", err, tail(caddy.logs.String()), refusals(server))
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// callNextcloudTool calls a tool and returns its text; a refusal by the MCP server is a
// tool result, so an HTTP or protocol error fails the test.
func callNextcloudTool(t *testing.T, s *mcp.ClientSession, name string, args map[string]any) (string, *mcp.CallToolResult) {
	t.Helper()
	res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		t.Fatalf("%s: %v (a refusal must be a tool result, not an HTTP error)", name, err)
	}
	var text []string
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			text = append(text, tc.Text)
		}
	}
	return strings.Join(text, "\n"), res
}

// checkNextcloudReadTools checks that tools/list shows what notes.read and openid cover:
// the MCP server hides the tools whose scopes the delegated token lacks.
func checkNextcloudReadTools(t *testing.T, s *mcp.ClientSession) {
	t.Helper()
	res, err := s.ListTools(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tool := range res.Tools {
		names = append(names, tool.Name)
	}
	slices.Sort(names)
	if want := []string{"nc_auth_check_status", "nc_auth_provision_access", "nc_notes_search_notes"}; !slices.Equal(names, want) {
		t.Errorf("tools %v, want %v (openid delegated, notes.write not)", names, want)
	}
}

// provisionNextcloud runs the MCP server's own provisioning of an app password for the
// user (the data leg): nc_auth_provision_access answers a login URL on the MCP server,
// not the broker's, which the user's browser opens directly; nc_auth_check_status then
// answers provisioned.
func provisionNextcloud(t *testing.T, s *mcp.ClientSession, server *testenv.NextcloudMCP) {
	t.Helper()
	text, res := callNextcloudTool(t, s, "nc_auth_provision_access", map[string]any{})
	var p testenv.ProvisionAccess
	b, _ := json.Marshal(res.StructuredContent)
	json.Unmarshal(b, &p)
	if res.IsError || p.Status != "login_required" || !strings.HasPrefix(p.LoginURL, server.URL+"/") {
		t.Fatalf("provisioning: %q %+v", text, p)
	}
	resp, err := http.Get(p.LoginURL) // the user's browser, straight to the MCP server's Nextcloud login
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("the login URL: %v %v", err, resp)
	}
	resp.Body.Close()
	if text, res := callNextcloudTool(t, s, "nc_auth_check_status", map[string]any{}); res.IsError || !strings.Contains(text, `"provisioned"`) || !server.Provisioned(nodeUser) {
		t.Errorf("status after the login: %q", text)
	}
}

// setClientSettings changes a client's settings in the Nextcloud-like IdP, as an admin
// does in the oidc app (POST /test/client-settings of idp.mjs).
func (n *NodeIdP) setClientSettings(t *testing.T, clientID string, settings map[string]string) {
	t.Helper()
	body, _ := json.Marshal(settings)
	resp, err := http.Post(n.Issuer+"/test/client-settings?client_id="+url.QueryEscape(clientID), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("client settings at the IdP: %s", resp.Status)
	}
}

// refusals lists why the server refused tokens, for a failure message.
func refusals(server *testenv.NextcloudMCP) []string {
	var out []string
	for _, r := range server.Seen() {
		if r.Error != "" {
			out = append(out, r.Error)
		}
	}
	return out
}

// TestNextcloudDeploymentAIssuerMismatchThroughCaddyBinary: the oidc app puts in iss the
// host its token endpoint was reached on, and the MCP server accepts only its configured
// issuer and NEXTCLOUD_HOST. A broker whose `issuer` is neither (here: the MCP server
// knows Nextcloud by other names) gets every delegated token refused. The MCP client gets
// 502 server_error from the broker, not the MCP server's 401: that challenge would send it
// to log in again, for a token refused the same way (and names the MCP server's own
// address). Caddy's log names the subject and the error the MCP server gave, which is how
// an admin tells this failure from a refusal by the broker.
func TestNextcloudDeploymentAIssuerMismatchThroughCaddyBinary(t *testing.T) {
	requireInterop(t)
	idp := startNodeIdPConfig(t, profileNextcloud, map[string]any{
		"clients":    []nodeClient{nodeBrokerClient()},
		"tokenTypes": map[string]string{nodeBrokerClientID: "jwt"},
	})
	disc, err := idp.Discovery(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	server := testenv.StartNextcloudMCP(t, testenv.NextcloudMCPSettings{
		Issuer:        "https://cloud.example.test",
		NextcloudHost: "http://nextcloud.internal",
		JWKSURI:       disc["jwks_uri"].(string),
		ClientID:      "nextcloud-mcp-server",
	})
	idp.setClientSettings(t, nodeBrokerClientID, map[string]string{"resourceUrl": server.URL + "/mcp"})
	caddy := startCaddy(t, nextcloudSiteA(idp, server))
	tok := nextcloudLogin(t, caddy, idp, "notes.read")

	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, caddy.Base+"/mcp",
		strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"e2e","version":"1"}}}`))
	req.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var answer struct {
		Error string `json:"error"`
	}
	json.NewDecoder(resp.Body).Decode(&answer)
	resp.Body.Close()
	if challenge := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != http.StatusBadGateway || answer.Error != "server_error" || challenge != "" {
		t.Errorf("%s %q %q: want 502 server_error without the MCP server's challenge", resp.Status, answer.Error, challenge)
	}
	if logs, ok := caddy.waitForLog("the upstream answered 401", `invalid_token`); !ok {
		t.Errorf("caddy's log does not say the MCP server refused the delegated token:\n%s", tail(logs))
	}
	seen := server.Seen()
	if len(seen) == 0 || !strings.Contains(seen[len(seen)-1].Error, `invalid issuer "`+idp.Issuer+`"`) {
		t.Errorf("the server's refusals: %v", refusals(server))
	}
}

// TestNextcloudDeploymentAScopesFromUpstreamMetadataThroughCaddyBinary: deployment A with
// the per-app scopes left to the MCP server: `scopes openid` and `upstream_metadata` at
// the MCP server's protected-resource metadata. Once the broker has read it, it offers
// notes.read and notes.write, a client asking notes.read gets it, and the read tool works.
func TestNextcloudDeploymentAScopesFromUpstreamMetadataThroughCaddyBinary(t *testing.T) {
	requireInterop(t)
	idp := startNodeIdPConfig(t, profileNextcloud, map[string]any{
		"clients":    []nodeClient{nodeBrokerClient()},
		"tokenTypes": map[string]string{nodeBrokerClientID: "jwt"},
	})
	disc, err := idp.Discovery(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	server := testenv.StartNextcloudMCP(t, testenv.NextcloudMCPSettings{
		Issuer: idp.Issuer, NextcloudHost: idp.Issuer, JWKSURI: disc["jwks_uri"].(string), ClientID: "nextcloud-mcp-server",
	})
	const configured = "scopes openid notes.read notes.write"
	site := nextcloudSiteA(idp, server)
	if !strings.Contains(site, configured) {
		t.Fatal("nextcloudSiteA's scopes changed")
	}
	caddy := startCaddy(t, strings.Replace(site, configured,
		"scopes openid\n\t\tupstream_metadata "+server.URL+"/.well-known/oauth-protected-resource/mcp", 1))

	offered := func() []string {
		resp, err := http.Get(caddy.Base + "/.well-known/oauth-authorization-server")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var md struct {
			ScopesSupported []string `json:"scopes_supported"`
		}
		json.NewDecoder(resp.Body).Decode(&md)
		return md.ScopesSupported
	}
	deadline := time.Now().Add(15 * time.Second)
	for !slices.Contains(offered(), "notes.write") {
		if time.Now().After(deadline) {
			t.Fatalf("the broker offers %v: never learned the MCP server's scopes\n%s", offered(), tail(caddy.logs.String()))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := offered(); !slices.Contains(got, "notes.read") || !slices.Contains(got, "openid") {
		t.Errorf("the broker offers %v", got)
	}

	tok := nextcloudLogin(t, caddy, idp, "notes.read")
	if got := strings.Fields(fmt.Sprint(tok.Extra("scope"))); !slices.Contains(got, "notes.read") || slices.Contains(got, "notes.write") {
		t.Errorf("broker token scope %v", got)
	}
	s, err := mcp.NewClient(&mcp.Implementation{Name: "e2e", Version: "1"}, nil).Connect(t.Context(),
		&mcp.StreamableClientTransport{Endpoint: caddy.Base + "/mcp", HTTPClient: testenv.BearerClient(tok.AccessToken), DisableStandaloneSSE: true}, nil)
	if err != nil {
		t.Fatalf("connecting: %v; the server refused: %v", err, refusals(server))
	}
	defer s.Close()
	res, err := s.ListTools(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(res.Tools, func(tool *mcp.Tool) bool { return tool.Name == "nc_notes_search_notes" }) ||
		slices.ContainsFunc(res.Tools, func(tool *mcp.Tool) bool { return tool.Name == "nc_notes_create_note" }) {
		t.Errorf("tools/list through the broker: %d tools", len(res.Tools))
	}
}
