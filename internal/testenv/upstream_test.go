package testenv

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/modelcontextprotocol/go-sdk/oauthex"
)

// connect opens an MCP session to u with client's HTTP client.
func connect(t *testing.T, u *Upstream, client *http.Client) (*mcp.ClientSession, error) {
	t.Helper()
	c := mcp.NewClient(&mcp.Implementation{Name: "testenv-test", Version: "v1.0.0"}, nil)
	session, err := c.Connect(t.Context(), &mcp.StreamableClientTransport{Endpoint: u.URL, HTTPClient: client}, nil)
	if err == nil {
		t.Cleanup(func() { session.Close() })
	}
	return session, err
}

// callTool calls a tool and decodes its structured result into out.
func callTool(t *testing.T, s *mcp.ClientSession, name string, args, out any) {
	t.Helper()
	res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		t.Fatalf("calling %s: %v", name, err)
	}
	if res.IsError {
		t.Fatalf("%s failed: %+v", name, res.Content)
	}
	b, err := json.Marshal(res.StructuredContent)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, out); err != nil {
		t.Fatalf("decoding %s result %s: %v", name, b, err)
	}
}

func TestUpstreamReportsTheTokensIdentity(t *testing.T) {
	up := StartUpstream(t, AccessTokens(testOP.Issuer, testOP.JWKSURI, "mcp-server"))
	tok := loginTokens(t, testOP, loginParams{
		clientID: NativeClientID, scopes: []string{"openid", "notes:read"}, resources: []string{"mcp-server"},
	})

	session, err := connect(t, up, BearerClient(tok.AccessToken))
	if err != nil {
		t.Fatalf("connecting with a valid token: %v", err)
	}
	tools, err := session.ListTools(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tool := range tools.Tools {
		names = append(names, tool.Name)
	}
	slices.Sort(names)
	if want := []string{"notes_read", "notes_write", "whoami"}; !slices.Equal(names, want) {
		t.Errorf("tools = %v, want %v", names, want)
	}

	var id Identity
	callTool(t, session, "whoami", map[string]any{}, &id)
	want := Identity{Subject: testOP.User.Subject, Audience: []string{"mcp-server"}, Scopes: []string{"openid", "notes:read"}}
	if id.Subject != want.Subject || !slices.Equal(id.Audience, want.Audience) || !slices.Equal(id.Scopes, want.Scopes) {
		t.Errorf("whoami = %+v, want %+v", id, want)
	}

	var notes Notes
	callTool(t, session, "notes_write", NoteInput{Text: "hello"}, &notes)
	callTool(t, session, "notes_read", map[string]any{}, &notes)
	if notes.Subject != testOP.User.Subject || !slices.Equal(notes.Notes, []string{"hello"}) {
		t.Errorf("notes_read = %+v", notes)
	}

	var calls int
	for _, s := range up.Seen() {
		if s.AuthError != "" || s.Authorization != "Bearer "+tok.AccessToken || s.Subject != testOP.User.Subject {
			t.Errorf("seen %+v, want authenticated as %s", s, testOP.User.Subject)
		}
		if s.RPCMethod == "tools/call" {
			calls++
		}
	}
	if calls != 3 {
		t.Errorf("saw %d tools/call requests, want 3", calls)
	}
	up.Reset()
	if n := len(up.Seen()); n != 0 {
		t.Errorf("Seen after Reset has %d requests", n)
	}
}

func TestUpstreamChecksTokens(t *testing.T) {
	up := StartUpstream(t, AccessTokens(testOP.Issuer, testOP.JWKSURI, "mcp-server"))
	claims := func(change func(map[string]any)) map[string]any {
		c := testOP.AccessTokenClaims(testOP.User.Subject, "mcp-server")
		c["scope"] = "notes:read"
		change(c)
		return c
	}
	stranger, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: jose.JSONWebKey{Key: stranger, KeyID: testOP.SigningKey().KeyID}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	payload, _ := json.Marshal(claims(func(map[string]any) {}))
	forged, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	forgedJWT, _ := forged.CompactSerialize()
	nativeToken := loginTokens(t, testOP, loginParams{clientID: NativeClientID, scopes: []string{"openid"}}).AccessToken
	brokerToken := loginTokens(t, testOP, loginParams{clientID: BrokerClientID, clientSecret: BrokerClientSecret, scopes: []string{"openid", "notes:read"}}).AccessToken
	var exchanged exchangeAnswer
	postForm(t, testOP.TokenEndpoint, BrokerClientID, BrokerClientSecret, url.Values{
		"grant_type":         {TokenExchangeGrantType},
		"subject_token":      {brokerToken},
		"subject_token_type": {"urn:ietf:params:oauth:token-type:access_token"},
		"audience":           {"mcp-server"},
	}, &exchanged)

	for _, tc := range []struct {
		name          string
		authorization string
		wantStatus    int
		wantError     string
	}{
		{"minted token for the upstream is accepted", "Bearer " + testOP.MintJWT(claims(func(map[string]any) {})), http.StatusOK, ""},
		{"token exchanged for the upstream is accepted", "Bearer " + exchanged.AccessToken, http.StatusOK, ""},
		{"broker's own token is refused", "Bearer " + brokerToken, http.StatusUnauthorized, "audience"},
		{"no token is refused", "", http.StatusUnauthorized, "no bearer token"},
		{"garbage is refused", "Bearer garbage", http.StatusUnauthorized, "malformed"},
		{"token for another audience is refused", "Bearer " + nativeToken, http.StatusUnauthorized, "audience"},
		{"wrong issuer is refused", "Bearer " + testOP.MintJWT(claims(func(c map[string]any) { c["iss"] = "http://127.0.0.1:1" })), http.StatusUnauthorized, "issuer"},
		{"expired token is refused", "Bearer " + testOP.MintJWT(claims(func(c map[string]any) { c["exp"] = time.Now().Add(-time.Minute).Unix() })), http.StatusUnauthorized, "expired"},
		{"token not yet valid is refused", "Bearer " + testOP.MintJWT(claims(func(c map[string]any) { c["nbf"] = time.Now().Add(time.Minute).Unix() })), http.StatusUnauthorized, "not valid yet"},
		{"token without exp is refused", "Bearer " + testOP.MintJWT(claims(func(c map[string]any) { delete(c, "exp") })), http.StatusUnauthorized, "no exp"},
		{"token signed by another key is refused", "Bearer " + forgedJWT, http.StatusUnauthorized, "verify"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.Reset()
			status := postInitialize(t, up.URL, map[string]string{"Authorization": tc.authorization})
			if status != tc.wantStatus {
				t.Errorf("status = %d, want %d", status, tc.wantStatus)
			}
			seen := up.Seen()
			if len(seen) != 1 {
				t.Fatalf("seen %d requests, want 1", len(seen))
			}
			if seen[0].Authorization != tc.authorization || seen[0].RPCMethod != "initialize" {
				t.Errorf("seen %+v", seen[0])
			}
			if tc.wantError == "" && seen[0].AuthError != "" || !strings.Contains(seen[0].AuthError, tc.wantError) {
				t.Errorf("AuthError = %q, want it to mention %q", seen[0].AuthError, tc.wantError)
			}
		})
	}
}

func TestUpstreamRequireScopes(t *testing.T) {
	up := StartUpstream(t, AccessTokens(testOP.Issuer, testOP.JWKSURI, "mcp-server"), RequireScopes("notes:write"))
	for _, tc := range []struct {
		name       string
		scope      string
		wantStatus int
	}{
		{"token with the scope is accepted", "notes:read notes:write", http.StatusOK},
		{"token without the scope is forbidden", "notes:read", http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := testOP.AccessTokenClaims(testOP.User.Subject, "mcp-server")
			c["scope"] = tc.scope
			if status := postInitialize(t, up.URL, map[string]string{"Authorization": "Bearer " + testOP.MintJWT(c)}); status != tc.wantStatus {
				t.Errorf("status = %d, want %d", status, tc.wantStatus)
			}
		})
	}
}

func TestUpstreamTrustedSubjectHeader(t *testing.T) {
	up := StartUpstream(t, TrustedSubjectHeader())
	if _, err := connect(t, up, http.DefaultClient); err == nil {
		t.Error("connected without the subject header")
	}
	session, err := connect(t, up, &http.Client{Transport: headerTransport{SubjectHeader, "alice"}})
	if err != nil {
		t.Fatal(err)
	}
	var id Identity
	callTool(t, session, "whoami", map[string]any{}, &id)
	if id.Subject != "alice" || id.Audience != nil || id.Scopes != nil {
		t.Errorf("whoami = %+v, want subject alice alone", id)
	}
	seen := up.Seen()
	if seen[0].AuthError == "" || seen[len(seen)-1].SubjectHeader != "alice" {
		t.Errorf("seen = %+v", seen)
	}
}

type headerTransport struct{ name, value string }

func (h headerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set(h.name, h.value)
	return http.DefaultTransport.RoundTrip(r)
}

// postInitialize sends an MCP initialize request with headers and returns
// the status.
func postInitialize(t *testing.T, endpoint string, headers map[string]string) int {
	t.Helper()
	body := `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}`
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, endpoint, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	for k, v := range headers {
		if v != "" {
			req.Header.Set(k, v)
		}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestUpstreamProtectedResourceMetadata: with ProtectedResourceMetadata the Upstream
// serves an RFC 9728 document that go-sdk's own client reads, and SetScopesSupported
// changes it.
func TestUpstreamProtectedResourceMetadata(t *testing.T) {
	u := StartUpstream(t, TrustedSubjectHeader(), ProtectedResourceMetadata("notes.read", "openid"))
	read := func() []string {
		t.Helper()
		prm, err := oauthex.GetProtectedResourceMetadata(t.Context(), u.MetadataURL, u.URL, http.DefaultClient)
		if err != nil {
			t.Fatal(err)
		}
		return prm.ScopesSupported
	}
	if got := read(); !slices.Equal(got, []string{"notes.read", "openid"}) {
		t.Errorf("scopes_supported %v", got)
	}
	u.SetScopesSupported("notes.write")
	if got := read(); !slices.Equal(got, []string{"notes.write"}) {
		t.Errorf("scopes_supported %v after a change", got)
	}
	if StartUpstream(t, TrustedSubjectHeader()).MetadataURL != "" {
		t.Error("a metadata URL without ProtectedResourceMetadata")
	}
}
