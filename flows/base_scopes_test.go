package flows

import (
	"net/http"
	"slices"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestBaseScopes: with Config.BaseScopes set, a first login is pointed to the base set
// alone (MCP 2026-07-28 scope selection): the 401 challenge's scope and the protected-
// resource metadata's scopes_supported name it, and an authorization request without
// scope is granted it; the authorization server's metadata still lists every scope it
// grants, so a step-up may ask for the others. Unset, every scope is named, as before.
func TestBaseScopes(t *testing.T) {
	o := testenv.SharedOP(t)
	base := func(c *Config) { c.BaseScopes = []string{"openid", "notes:read"} }
	all := []string{"openid", "notes:read", "notes:write"}

	for _, row := range []struct {
		name      string
		change    func(*Config)
		challenge string   // the 401's scope
		supported []string // the protected-resource metadata's scopes_supported
		idpScope  string   // what the IdP is asked for after an authorization request without scope
	}{
		{"base scopes set", base, "openid notes:read", []string{"openid", "notes:read"}, "openid offline_access notes:read"},
		{"unset: every scope, as before", nil, "openid notes:read notes:write", all, "openid offline_access notes:read notes:write"},
	} {
		t.Run(row.name, func(t *testing.T) {
			_, front := startHybridFront(t, o, "", row.change)
			resp := do(t, http.MethodPost, front.URL+"/mcp", nil, `{"jsonrpc":"2.0","id":1,"method":"initialize"}`)
			want := `Bearer resource_metadata="` + front.URL + wellKnownProtectedResource + `/mcp", scope="` + row.challenge + `"`
			if got := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != http.StatusUnauthorized || got != want {
				t.Errorf("%s\n got %s\nwant %s", resp.Status, got, want)
			}
			var prm ProtectedResourceMetadata
			decodeJSON(t, get(t, front.URL+wellKnownProtectedResource+"/mcp", nil), &prm)
			if !slices.Equal(prm.ScopesSupported, row.supported) {
				t.Errorf("protected resource scopes_supported %v, want %v", prm.ScopesSupported, row.supported)
			}
			var as AuthorizationServerMetadata
			decodeJSON(t, get(t, front.URL+wellKnownAuthorizationServer, nil), &as)
			if !slices.Equal(as.ScopesSupported, all) {
				t.Errorf("authorization server scopes_supported %v, want every scope %v", as.ScopesSupported, all)
			}
			idpURL := newHybridBrowser(t).toIdP(front, hybridAuthorizeQuery(testenv.NativeClientID, hybridRedirectURI, hybridVerifier, "s", nil))
			if got := idpURL.Query().Get("scope"); got != row.idpScope {
				t.Errorf("an authorization request without scope asks the IdP for %q, want %q", got, row.idpScope)
			}
		})
	}
}

// TestInsufficientScopeOneChallenge: a 403 names, in one challenge, the scopes the token
// holds and every scope the request's tool calls need (MCP 2026-07-28: all scopes of the
// operation in a single challenge, so one re-authorization suffices and, for clients that
// replace their scope with the challenge's, nothing held is lost).
func TestInsufficientScopeOneChallenge(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, func(c *Config) {
		c.Scopes = append(c.Scopes, "notes:admin")
		c.BaseScopes = []string{"openid", "notes:read"}
		c.ToolScopes = []ToolScopeRule{
			{Tool: "notes_write", Scopes: []string{"notes:write"}},
			{Tool: "notes_purge", Scopes: []string{"notes:write", "notes:admin"}},
			{Tool: "notes_read", Scopes: []string{"notes:read"}},
		}
	}), up.URL)
	readOnly := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
	for _, row := range []struct{ name, body, scope string }{
		{"one call", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_purge","arguments":{}}}`,
			"openid notes:read notes:write notes:admin"},
		{"a batch: every call's scopes at once", `[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read","arguments":{}}},` +
			`{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_write","arguments":{}}},` +
			`{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"notes_purge","arguments":{}}}]`,
			"openid notes:read notes:write notes:admin"},
	} {
		t.Run(row.name, func(t *testing.T) {
			up.Reset()
			resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(readOnly), row.body)
			want := `Bearer error="insufficient_scope", scope="` + row.scope + `", resource_metadata="` + wantMetadataURL + `"`
			if got := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != http.StatusForbidden || got != want {
				t.Errorf("%s\n got %s\nwant %s", resp.Status, got, want)
			}
			if len(up.Seen()) != 0 {
				t.Error("the refused request reached the upstream")
			}
		})
	}
}
