package testenv

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// nextcloudIdP is an IdP's signing key and JWKS for the stand-in's tests.
type nextcloudIdP struct {
	key  *rsa.PrivateKey
	kid  string
	jwks *httptest.Server
}

const (
	ncIssuer   = "https://cloud.example.test"
	ncHost     = "http://nextcloud.internal/"
	ncClientID = "nextcloud-mcp-server"
)

func startNextcloudIdP(t *testing.T) *nextcloudIdP {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	idp := &nextcloudIdP{key: key, kid: RandomKID()}
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: idp.kid, Algorithm: "RS256", Use: "sig"}}}
	idp.jwks = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(set)
	}))
	t.Cleanup(idp.jwks.Close)
	return idp
}

// token is an access token as the oidc app issues it for user, changed by edit.
func (i *nextcloudIdP) token(t *testing.T, n *NextcloudMCP, scope string, edit func(map[string]any)) string {
	t.Helper()
	now := time.Now().Unix()
	claims := map[string]any{"iss": ncIssuer, "sub": "alice", "aud": n.URL + "/mcp", "exp": now + 900, "iat": now,
		"client_id": "mcp-broker", "azp": "mcp-broker", "preferred_username": "alice", "scope": scope}
	if edit != nil {
		edit(claims)
	}
	return SignJWS(t, i.key, jose.RS256, i.kid, "at+JWT", claims)
}

func startNextcloudMCPFor(t *testing.T, idp *nextcloudIdP) *NextcloudMCP {
	return StartNextcloudMCP(t, NextcloudMCPSettings{Issuer: ncIssuer, NextcloudHost: ncHost, JWKSURI: idp.jwks.URL, ClientID: ncClientID})
}

func connectNextcloud(t *testing.T, n *NextcloudMCP, token string) *mcp.ClientSession {
	t.Helper()
	c := mcp.NewClient(&mcp.Implementation{Name: "testenv-test", Version: "v1.0.0"}, nil)
	s, err := c.Connect(t.Context(), &mcp.StreamableClientTransport{Endpoint: n.URL + "/mcp", HTTPClient: BearerClient(token), DisableStandaloneSSE: true}, nil)
	if err != nil {
		t.Fatalf("connecting: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func toolNames(t *testing.T, s *mcp.ClientSession) []string {
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
	return names
}

// callText calls a tool and returns its text and whether it is an error result.
func callText(t *testing.T, s *mcp.ClientSession, name string, args any) (string, bool) {
	t.Helper()
	res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		t.Fatalf("calling %s: %v", name, err)
	}
	var text []string
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			text = append(text, tc.Text)
		}
	}
	return strings.Join(text, "\n"), res.IsError
}

func TestNextcloudMCPValidatesTokensAsTheServerDoes(t *testing.T) {
	idp := startNextcloudIdP(t)
	n := startNextcloudMCPFor(t, idp)
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	const scope = "openid notes.read"
	rows := []struct {
		name   string
		token  func() string
		accept bool
	}{
		{"aud <URL>/mcp is accepted", func() string { return idp.token(t, n, scope, nil) }, true},
		{"aud <URL> is accepted", func() string { return idp.token(t, n, scope, func(c map[string]any) { c["aud"] = n.URL }) }, true},
		{"aud its client id in a list is accepted", func() string {
			return idp.token(t, n, scope, func(c map[string]any) { c["aud"] = []string{"other", ncClientID} })
		}, true},
		{"no aud and client_id its client id is accepted", func() string {
			return idp.token(t, n, scope, func(c map[string]any) { delete(c, "aud"); c["client_id"] = ncClientID })
		}, true},
		{"iss NEXTCLOUD_HOST without its slash is accepted", func() string {
			return idp.token(t, n, scope, func(c map[string]any) { c["iss"] = "http://nextcloud.internal" })
		}, true},
		{"no exp is accepted", func() string { return idp.token(t, n, scope, func(c map[string]any) { delete(c, "exp") }) }, true},
		{"preferred_username stands in for sub", func() string { return idp.token(t, n, scope, func(c map[string]any) { delete(c, "sub") }) }, true},
		{"another aud is refused", func() string { return idp.token(t, n, scope, func(c map[string]any) { c["aud"] = "nextcloud" }) }, false},
		{"the broker's client id as aud is refused", func() string { return idp.token(t, n, scope, func(c map[string]any) { c["aud"] = "mcp-broker" }) }, false},
		{"another iss is refused", func() string {
			return idp.token(t, n, scope, func(c map[string]any) { c["iss"] = "http://127.0.0.1:9" })
		}, false},
		{"an expired token is refused", func() string {
			return idp.token(t, n, scope, func(c map[string]any) { c["exp"] = time.Now().Add(-time.Second).Unix() })
		}, false},
		{"iat in the future is refused", func() string {
			return idp.token(t, n, scope, func(c map[string]any) { c["iat"] = time.Now().Add(time.Minute).Unix() })
		}, false},
		{"RS512 is refused", func() string {
			now := time.Now().Unix()
			return SignJWS(t, idp.key, jose.RS512, idp.kid, "at+JWT", map[string]any{"iss": ncIssuer, "sub": "alice", "aud": n.URL, "exp": now + 60, "iat": now})
		}, false},
		{"another key is refused", func() string {
			now := time.Now().Unix()
			return SignJWS(t, other, jose.RS256, idp.kid, "at+JWT", map[string]any{"iss": ncIssuer, "sub": "alice", "aud": n.URL, "exp": now + 60, "iat": now})
		}, false},
		{"an opaque token is refused", func() string { return "opaque-token-of-the-oidc-app" }, false},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, n.URL+"/mcp",
				strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`))
			req.Header.Set("Authorization", "Bearer "+row.token())
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Accept", "application/json, text/event-stream")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if row.accept != (resp.StatusCode == http.StatusOK) {
				t.Fatalf("status %s; last refusal %q", resp.Status, n.Seen()[len(n.Seen())-1].Error)
			}
			if !row.accept {
				want := `Bearer error="invalid_token", error_description="Authentication required", resource_metadata="` + n.URL + `/.well-known/oauth-protected-resource"`
				if got := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != http.StatusUnauthorized || got != want {
					t.Errorf("%s %q, want 401 %q", resp.Status, got, want)
				}
			}
		})
	}
}

func TestNextcloudMCPFiltersToolsAndRefusesInTheResult(t *testing.T) {
	idp := startNextcloudIdP(t)
	n := startNextcloudMCPFor(t, idp)

	t.Run("tools/list shows the tools the token's scopes cover", func(t *testing.T) {
		s := connectNextcloud(t, n, idp.token(t, n, "openid notes.read", nil))
		if got := toolNames(t, s); !slices.Equal(got, []string{"nc_auth_check_status", "nc_auth_provision_access", "nc_notes_search_notes"}) {
			t.Errorf("tools %v", got)
		}
		s = connectNextcloud(t, n, idp.token(t, n, "notes.read notes.write", nil))
		if got := toolNames(t, s); !slices.Equal(got, []string{"nc_notes_create_note", "nc_notes_search_notes"}) {
			t.Errorf("tools without openid %v", got)
		}
		s = connectNextcloud(t, n, idp.token(t, n, "", nil))
		if got := toolNames(t, s); len(got) != 4 {
			t.Errorf("tools with no scope at all %v, want every tool", got)
		}
	})

	t.Run("without openid a user cannot provision", func(t *testing.T) {
		s := connectNextcloud(t, n, idp.token(t, n, "notes.read", func(c map[string]any) { c["sub"] = "bob" }))
		if text, isErr := callText(t, s, "nc_auth_provision_access", map[string]any{}); !isErr || !strings.Contains(text, "Missing required scopes: openid") {
			t.Errorf("provisioning without openid: %v %q", isErr, text)
		}
		if text, isErr := callText(t, s, "nc_notes_search_notes", map[string]any{"query": ""}); !isErr || !strings.Contains(text, "not provisioned") {
			t.Errorf("search unprovisioned: %v %q", isErr, text)
		}
	})

	t.Run("provision, read, and a write without its scope is an isError result", func(t *testing.T) {
		s := connectNextcloud(t, n, idp.token(t, n, "openid notes.read", nil))
		if text, isErr := callText(t, s, "nc_notes_search_notes", map[string]any{"query": ""}); !isErr || !strings.Contains(text, "nc_auth_provision_access") {
			t.Fatalf("search before provisioning: %v %q", isErr, text)
		}
		res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "nc_auth_provision_access", Arguments: map[string]any{}})
		if err != nil || res.IsError {
			t.Fatalf("provisioning: %v %+v", err, res)
		}
		var p ProvisionAccess
		b, _ := json.Marshal(res.StructuredContent)
		json.Unmarshal(b, &p)
		if p.Status != "login_required" || !strings.HasPrefix(p.LoginURL, n.URL+"/") {
			t.Fatalf("provisioning answered %+v", p)
		}
		resp, err := http.Get(p.LoginURL)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("opening the login URL: %v %v", err, resp)
		}
		resp.Body.Close()
		if text, isErr := callText(t, s, "nc_auth_check_status", map[string]any{}); isErr || !strings.Contains(text, `"provisioned"`) {
			t.Errorf("status %v %q", isErr, text)
		}
		if text, isErr := callText(t, s, "nc_notes_search_notes", map[string]any{"query": ""}); isErr {
			t.Errorf("search after provisioning: %q", text)
		}
		text, isErr := callText(t, s, "nc_notes_create_note", map[string]any{"title": "t", "content": "c", "category": ""})
		if !isErr || !strings.Contains(text, "Access denied to nc_notes_create_note: Missing required scopes: notes.write. Token has scopes: notes.read, openid") {
			t.Errorf("create without notes.write: %v %q", isErr, text)
		}
		s = connectNextcloud(t, n, idp.token(t, n, "openid notes.read notes.write", nil))
		if text, isErr := callText(t, s, "nc_notes_create_note", map[string]any{"title": "t", "content": "c", "category": ""}); isErr {
			t.Errorf("create with notes.write: %q", text)
		}
	})

	t.Run("protected resource metadata", func(t *testing.T) {
		resp, err := http.Get(n.URL + "/.well-known/oauth-protected-resource/mcp")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var prm struct {
			Resource        string   `json:"resource"`
			ScopesSupported []string `json:"scopes_supported"`
		}
		json.NewDecoder(resp.Body).Decode(&prm)
		if prm.Resource != n.URL+"/mcp" || !slices.Contains(prm.ScopesSupported, NextcloudNotesWrite) || !slices.Contains(prm.ScopesSupported, "openid") {
			t.Errorf("metadata %+v", prm)
		}
	})
}
