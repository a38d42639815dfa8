package flows

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

const (
	wantMetadataURL = "https://mcp.example.test/.well-known/oauth-protected-resource/mcp"
	wantChallenge   = `Bearer resource_metadata="` + wantMetadataURL + `", scope="openid notes:read notes:write"`
)

func get(t *testing.T, url string, header http.Header) *http.Response {
	t.Helper()
	return do(t, http.MethodGet, url, header, "")
}

func do(t *testing.T, method, url string, header http.Header, body string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if method == http.MethodPost {
		req.Header.Set("Content-Type", "application/json") // as MCP clients send
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func bearer(token string) http.Header {
	return http.Header{"Authorization": {"Bearer " + token}}
}

func decodeJSON(t *testing.T, resp *http.Response, v any) {
	t.Helper()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("decoding %s response: %v", resp.Status, err)
	}
}

func TestProtectedResourceMetadata(t *testing.T) {
	o := testenv.SharedOP(t)
	front := startFront(t, newTestBroker(t, o, nil), testenv.StartUpstream(t, testenv.TrustedSubjectHeader()).URL)

	for _, path := range []string{"/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"} {
		t.Run(path, func(t *testing.T) {
			resp := get(t, front.URL+path, http.Header{"Origin": {"https://inspector.example"}})
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %s", resp.Status)
			}
			var m map[string]any
			decodeJSON(t, resp, &m)
			want := map[string]any{
				"resource":                 testResource,
				"authorization_servers":    []any{o.Issuer},
				"scopes_supported":         []any{"openid", "notes:read", "notes:write"},
				"bearer_methods_supported": []any{"header"},
				"resource_name":            "MCP server at mcp.example.test",
			}
			gotJSON, _ := json.Marshal(m)
			wantJSON, _ := json.Marshal(want)
			if string(gotJSON) != string(wantJSON) {
				t.Errorf("metadata\n got %s\nwant %s", gotJSON, wantJSON)
			}
			if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "*" {
				t.Errorf("Access-Control-Allow-Origin = %q, want *", got)
			}
			if got := resp.Header.Get("Access-Control-Allow-Credentials"); got != "" {
				t.Errorf("credentials allowed: %q", got)
			}
		})
	}

	t.Run("preflight", func(t *testing.T) {
		resp := do(t, http.MethodOptions, front.URL+"/.well-known/oauth-protected-resource/mcp",
			http.Header{"Origin": {"https://inspector.example"}, "Access-Control-Request-Method": {"GET"}}, "")
		if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("preflight: %s, allow-origin %q", resp.Status, resp.Header.Get("Access-Control-Allow-Origin"))
		}
	})
	t.Run("other methods are refused", func(t *testing.T) {
		if resp := do(t, http.MethodPost, front.URL+"/.well-known/oauth-protected-resource", nil, "{}"); resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("POST: %s", resp.Status)
		}
	})
	t.Run("offline_access is never advertised", func(t *testing.T) {
		resp := get(t, front.URL+"/.well-known/oauth-protected-resource", nil)
		body, _ := io.ReadAll(resp.Body)
		if strings.Contains(string(body), "offline_access") {
			t.Errorf("metadata lists offline_access: %s", body)
		}
	})
}

func TestChallenges(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)

	t.Run("no token", func(t *testing.T) {
		resp := do(t, http.MethodPost, front.URL+"/mcp", nil, `{"jsonrpc":"2.0","id":1,"method":"initialize"}`)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("status %s", resp.Status)
		}
		if got := resp.Header.Get("WWW-Authenticate"); got != wantChallenge {
			t.Errorf("WWW-Authenticate\n got %s\nwant %s", got, wantChallenge)
		}
	})
	t.Run("basic credentials are no bearer token", func(t *testing.T) {
		resp := get(t, front.URL+"/mcp", http.Header{"Authorization": {"Basic dXNlcjpwdw=="}})
		if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") != wantChallenge {
			t.Errorf("%s %q", resp.Status, resp.Header.Get("WWW-Authenticate"))
		}
	})
	t.Run("token in the query string", func(t *testing.T) {
		tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid"}, testResource)
		resp := get(t, front.URL+"/mcp?access_token="+tok, nil)
		var e oauthError
		decodeJSON(t, resp, &e)
		if resp.StatusCode != http.StatusBadRequest || e.Error != "invalid_request" {
			t.Errorf("%s %+v", resp.Status, e)
		}
	})
	t.Run("preflight passes without a token and never reaches the upstream", func(t *testing.T) {
		up.Reset()
		resp := do(t, http.MethodOptions, front.URL+"/mcp",
			http.Header{"Origin": {"https://inspector.example"}, "Access-Control-Request-Method": {"POST"}}, "")
		if resp.StatusCode != http.StatusNoContent || len(up.Seen()) != 0 {
			t.Errorf("%s, upstream saw %d", resp.Status, len(up.Seen()))
		}
	})
	if len(up.Seen()) != 0 {
		t.Errorf("the upstream saw %d unauthenticated requests", len(up.Seen()))
	}
}

// TestRefusedTokensGet401 runs each kind of bad token through the handler: each gets the
// 401 challenge with error="invalid_token", and none reaches the upstream.
func TestRefusedTokensGet401(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)
	opKey := o.SigningKey()
	valid := func() map[string]any { return o.AccessTokenClaims(o.User.Subject, testResource) }
	signed := func(c map[string]any) string { return o.MintJWT(c) }

	for _, tc := range []struct {
		name  string
		token func(t *testing.T) string
	}{
		{"alg none", func(t *testing.T) string {
			return testenv.CompactJWS(t, map[string]any{"alg": "none", "typ": "JWT", "kid": opKey.KeyID}, valid(), nil)
		}},
		{"HS256 signed with the public key", func(t *testing.T) string {
			pub, err := x509.MarshalPKIXPublicKey(opKey.Public().Key)
			if err != nil {
				t.Fatal(err)
			}
			secret := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})
			return testenv.CompactJWS(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": opKey.KeyID}, valid(), func(in []byte) []byte {
				m := hmac.New(sha256.New, secret)
				m.Write(in)
				return m.Sum(nil)
			})
		}},
		{"a key the IdP never published", func(t *testing.T) string {
			return testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, opKey.KeyID, valid())
		}},
		{"wrong issuer", func(t *testing.T) string {
			c := valid()
			c["iss"] = "https://evil.example"
			return signed(c)
		}},
		{"wrong audience", func(t *testing.T) string {
			c := valid()
			c["aud"] = []string{"https://other.example/mcp"}
			return signed(c)
		}},
		{"expired", func(t *testing.T) string {
			c := valid()
			c["iat"], c["nbf"], c["exp"] = time.Now().Add(-2*time.Hour).Unix(), time.Now().Add(-2*time.Hour).Unix(), time.Now().Add(-time.Hour).Unix()
			return signed(c)
		}},
		{"nbf in the future", func(t *testing.T) string {
			c := valid()
			c["nbf"], c["exp"] = time.Now().Add(time.Hour).Unix(), time.Now().Add(2*time.Hour).Unix()
			return signed(c)
		}},
		{"cross-client opaque token", func(t *testing.T) string {
			return o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"})
		}},
		{"inactive opaque token", func(t *testing.T) string { return o.RevokedOpaqueToken(t, verifierResource) }},
		{"garbage", func(t *testing.T) string { return "not-a-token" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.Reset()
			resp := get(t, front.URL+"/mcp", bearer(tc.token(t)))
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status %s", resp.Status)
			}
			if got, want := resp.Header.Get("WWW-Authenticate"), wantChallenge+`, error="invalid_token"`; got != want {
				t.Errorf("WWW-Authenticate\n got %s\nwant %s", got, want)
			}
			var e oauthError
			decodeJSON(t, resp, &e)
			if e.Error != "invalid_token" {
				t.Errorf("error %q", e.Error)
			}
			if n := len(up.Seen()); n != 0 {
				t.Errorf("upstream saw %d requests", n)
			}
		})
	}
}

// connect opens an MCP session through front with token.
func connect(t *testing.T, front, token string) *mcp.ClientSession {
	t.Helper()
	c := mcp.NewClient(&mcp.Implementation{Name: "flows-test", Version: "1"}, nil)
	s, err := c.Connect(t.Context(), &mcp.StreamableClientTransport{
		Endpoint: front + "/mcp", HTTPClient: testenv.BearerClient(token), DisableStandaloneSSE: true, MaxRetries: -1,
	}, nil)
	if err != nil {
		t.Fatalf("connecting: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestNoPassthrough(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)
	tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)

	// A client that names itself someone else in the subject header is overruled.
	c := mcp.NewClient(&mcp.Implementation{Name: "spoofer", Version: "1"}, nil)
	hc := testenv.BearerClient(tok)
	hc.Transport = headerTransport{next: hc.Transport, name: testenv.SubjectHeader, value: "admin"}
	s, err := c.Connect(t.Context(), &mcp.StreamableClientTransport{Endpoint: front.URL + "/mcp", HTTPClient: hc, DisableStandaloneSSE: true}, nil)
	if err != nil {
		t.Fatal(err)
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
	if who.Subject != o.User.Subject {
		t.Errorf("upstream saw subject %q, want %q", who.Subject, o.User.Subject)
	}
	seen := up.Seen()
	if len(seen) == 0 {
		t.Fatal("upstream saw nothing")
	}
	for _, r := range seen {
		if r.Authorization != "" || r.Header.Get("Authorization") != "" {
			t.Errorf("upstream received an Authorization header on %s %s", r.Method, r.RPCMethod)
		}
		if strings.Contains(strings.Join(flatten(r.Header), " "), tok) {
			t.Errorf("upstream received the client's token")
		}
		if r.SubjectHeader != o.User.Subject {
			t.Errorf("subject header %q", r.SubjectHeader)
		}
	}
}

func flatten(h http.Header) []string {
	var out []string
	for k, vs := range h {
		out = append(out, k)
		out = append(out, vs...)
	}
	return out
}

type headerTransport struct {
	next        http.RoundTripper
	name, value string
}

func (h headerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set(h.name, h.value)
	return h.next.RoundTrip(r)
}

func TestToolScopes(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, func(c *Config) { c.MaxBodyBytes = 4096 }), up.URL)
	readOnly := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
	readWrite := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read", "notes:write"}, testResource)

	t.Run("a read-only token lists tools and calls the read tool", func(t *testing.T) {
		s := connect(t, front.URL, readOnly)
		if _, err := s.ListTools(t.Context(), nil); err != nil {
			t.Fatalf("tools/list: %v", err)
		}
		if res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_read"}); err != nil || res.IsError {
			t.Fatalf("notes_read: %v", err)
		}
	})
	t.Run("a read-only token gets the step-up on the write tool", func(t *testing.T) {
		up.Reset()
		resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(readOnly),
			`{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`)
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("status %s", resp.Status)
		}
		want := `Bearer error="insufficient_scope", scope="openid notes:read notes:write", resource_metadata="` + wantMetadataURL + `"`
		if got := resp.Header.Get("WWW-Authenticate"); got != want {
			t.Errorf("WWW-Authenticate\n got %s\nwant %s", got, want)
		}
		if len(up.Seen()) != 0 {
			t.Error("the write call reached the upstream")
		}
	})
	t.Run("through the SDK the write tool fails for a read-only token", func(t *testing.T) {
		s := connect(t, front.URL, readOnly)
		if _, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "x"}}); err == nil {
			t.Fatal("notes_write succeeded without notes:write")
		}
	})
	t.Run("a read-write token calls the write tool", func(t *testing.T) {
		s := connect(t, front.URL, readWrite)
		res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "hello"}})
		if err != nil || res.IsError {
			t.Fatalf("notes_write: %v %+v", err, res)
		}
	})
	t.Run("a batch with one write call is refused whole", func(t *testing.T) {
		up.Reset()
		resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(readOnly), `[
			{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read"}},
			{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}]`)
		if resp.StatusCode != http.StatusForbidden || len(up.Seen()) != 0 {
			t.Errorf("%s, upstream saw %d", resp.Status, len(up.Seen()))
		}
	})
	t.Run("a batch of read calls passes", func(t *testing.T) {
		up.Reset()
		resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(readOnly), `[
			{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read"}},
			{"jsonrpc":"2.0","id":2,"method":"tools/list"}]`)
		if resp.StatusCode == http.StatusForbidden || len(up.Seen()) != 1 {
			t.Errorf("%s, upstream saw %d", resp.Status, len(up.Seen()))
		}
	})
	t.Run("a tool call this decoder cannot read is refused, not passed unchecked", func(t *testing.T) {
		// Python's json (the Nextcloud MCP server) accepts NaN; encoding/json does not.
		for _, body := range []string{
			`{"jsonrpc":"2.0","id":NaN,"method":"tools/call","params":{"name":"notes_write"}}`,
			`[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read"}}, 7]`,
			`{"jsonrpc":"2.0","id":1,"method":"tools\/call","params":{"name":"notes_write"},}`,
		} {
			up.Reset()
			resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(readOnly), body)
			if resp.StatusCode != http.StatusBadRequest || len(up.Seen()) != 0 {
				t.Errorf("%s: %s, upstream saw %d", body, resp.Status, len(up.Seen()))
			}
		}
	})
	t.Run("a body over the bound gets 413 and the upstream is untouched", func(t *testing.T) {
		up.Reset()
		big := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read","arguments":{"text":"` +
			strings.Repeat("a", 5000) + `"}}}`
		resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(readWrite), big)
		if resp.StatusCode != http.StatusRequestEntityTooLarge || len(up.Seen()) != 0 {
			t.Errorf("%s, upstream saw %d", resp.Status, len(up.Seen()))
		}
	})
	t.Run("a chunked body over the bound gets 413 too", func(t *testing.T) {
		up.Reset()
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+"/mcp",
			io.MultiReader(strings.NewReader(`{"jsonrpc":"2.0","method":"tools/call","x":"`), strings.NewReader(strings.Repeat("a", 5000))))
		req.Header.Set("Authorization", "Bearer "+readWrite)
		req.Header.Set("Content-Type", "application/json")
		req.ContentLength = -1
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge || len(up.Seen()) != 0 {
			t.Errorf("%s, upstream saw %d", resp.Status, len(up.Seen()))
		}
	})
}

func TestIsProtectedResourceMetadata(t *testing.T) {
	for _, tc := range []struct {
		path, resource string
		want           bool
	}{
		{wellKnownProtectedResource, "/mcp", true},
		{wellKnownProtectedResource + "/mcp", "/mcp", true},
		{wellKnownProtectedResource, "", true},
		{wellKnownProtectedResource + "/mc", "/mcp", false},
		{wellKnownProtectedResource + "/mcp/", "/mcp", false},
		{wellKnownProtectedResource + "/other", "/mcp", false},
		{wellKnownProtectedResource + "/mcp", "", false},
		{"/mcp", "/mcp", false},
	} {
		if got := isProtectedResourceMetadata(tc.path, tc.resource); got != tc.want {
			t.Errorf("isProtectedResourceMetadata(%q, %q) = %v", tc.path, tc.resource, got)
		}
	}
}
