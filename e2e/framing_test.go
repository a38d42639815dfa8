package e2e

import (
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestFramingThroughCaddyBinary: what the broker forwards and removes, through the real
// caddy binary and its reverse_proxy in front of the go-sdk upstream (SECURITY.md: tool
// scopes and identity dodged by the request's framing). A tools/call framed any way but
// POST application/json in UTF-8 is refused and never forwarded; `Connection:
// X-Auth-Subject` does not make the proxy drop the subject header the broker set;
// identity headers a client sends never arrive; an upstream's Set-Cookie for the
// broker's cookies never reaches the client; nor do identity headers sent as request
// trailers reach the upstream. A go-sdk client session (its GET stream and its DELETE
// included) still works, and so does a GET over HTTP/2 whose empty body is of unknown
// length, as HTTP/3 sends every request.
func TestFramingThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader(),
		testenv.ResponseHeader("Set-Cookie", "mcp_oauth_consent=forged; Path=/oauth"),
		testenv.ResponseHeader("Set-Cookie", "__Host-mcp_oauth_consent=forged; Path=/; Secure"),
		testenv.ResponseHeader("Set-Cookie", "app_session=kept; Path=/"),
		testenv.ResponseHeader("Access-Control-Allow-Origin", "https://evil.example"),
		testenv.ResponseHeader("Access-Control-Allow-Credentials", "true"))
	upURL, _ := url.Parse(up.URL)
	caddy := startCaddy(t, progressiveSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret,
		"openid notes:read notes:write", upURL.Host, nativeClientBlock),
		withGlobal("\tservers {\n\t\tprotocols h1 h2c\n\t}"))
	claims := o.AccessTokenClaims(o.User.Subject, caddy.Base+"/mcp")
	claims["scope"] = "openid notes:read"
	claims["client_id"] = testenv.NativeClientID
	tok := o.MintJWT(claims)

	const initialize = `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"e2e","version":"1"}}}`
	const call = `{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`
	const modernCall = `{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"},` +
		`"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}`
	send := func(t *testing.T, method, contentType, body string, header map[string]string) *http.Response {
		t.Helper()
		up.Reset()
		req, err := http.NewRequestWithContext(t.Context(), method, caddy.Base+"/mcp", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Accept", "application/json, text/event-stream")
		if contentType != "" {
			req.Header.Set("Content-Type", contentType)
		}
		for k, v := range header {
			req.Header[k] = []string{v}
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}

	// The call in UTF-7, as iconv-lite decodes it: no `"tools/call"` for the check to see.
	const callUTF7 = `{+ACI-jsonrpc+ACI-:+ACI-2.0+ACI-,+ACI-id+ACI-:2,+ACI-method+ACI-:+ACI-tools/call+ACI-,+ACI-params+ACI-:{+ACI-name+ACI-:+ACI-notes+AF8-write+ACI-}}`
	for _, tc := range []struct {
		name, method, contentType, body string
		header                          map[string]string
		want                            int
	}{
		{"PUT with a tools/call body", http.MethodPut, "application/json", call, nil, http.StatusMethodNotAllowed},
		{"lower-case post with a tools/call body", "post", "application/json", call, nil, http.StatusMethodNotAllowed},
		{"charset utf-7", http.MethodPost, "application/json; charset=utf-7", callUTF7, nil, http.StatusUnsupportedMediaType},
		{"text/plain", http.MethodPost, "text/plain", call, nil, http.StatusUnsupportedMediaType},
		{"X-HTTP-Method-Override", http.MethodPost, "application/json", initialize, map[string]string{"X-HTTP-Method-Override": "PATCH"}, http.StatusBadRequest},
		// SECURITY.md S1.23: a router would read a read-only call.
		{"a 2026-07-28 tools/call whose Mcp-Name names another tool", http.MethodPost, "application/json", modernCall,
			map[string]string{"Mcp-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "notes_read"}, http.StatusBadRequest},
		{"a 2026-07-28 tools/call without its headers", http.MethodPost, "application/json", modernCall, nil, http.StatusBadRequest},
	} {
		t.Run(tc.name+" is refused", func(t *testing.T) {
			resp := send(t, tc.method, tc.contentType, tc.body, tc.header)
			if resp.StatusCode != tc.want || len(up.Seen()) != 0 {
				t.Errorf("%s, upstream saw %d requests; want %d and nothing forwarded", resp.Status, len(up.Seen()), tc.want)
			}
		})
	}

	t.Run("Connection: X-Auth-Subject still delivers the subject header", func(t *testing.T) {
		resp := send(t, http.MethodPost, "application/json", initialize, map[string]string{"Connection": "X-Auth-Subject"})
		seen := up.Seen()
		if len(seen) != 1 || seen[0].SubjectHeader != o.User.Subject {
			t.Fatalf("%s: upstream saw %d requests, want one with the subject header %q", resp.Status, len(seen), o.User.Subject)
		}
	})

	t.Run("identity headers a client sends never arrive", func(t *testing.T) {
		resp := send(t, http.MethodPost, "application/json", initialize, map[string]string{
			"Remote-User": "admin", "X-Forwarded-User": "admin", "X-Remote-User": "admin",
			"X-Auth-Request-User": "admin", "X_Auth_Subject": "admin",
		})
		seen := up.Seen()
		if len(seen) != 1 {
			t.Fatalf("%s: upstream saw %d requests", resp.Status, len(seen))
		}
		for name, v := range seen[0].Header {
			if slices.Contains(v, "admin") {
				t.Errorf("upstream received %s: %v", name, v)
			}
		}
	})

	t.Run("identity headers a client sends as trailers never arrive", func(t *testing.T) {
		up.Reset()
		// A body of unknown length goes chunked, with the trailers after it.
		req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, caddy.Base+"/mcp", io.MultiReader(strings.NewReader(initialize)))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Accept", "application/json, text/event-stream")
		req.Header.Set("Content-Type", "application/json")
		req.Trailer = http.Header{"X-Forwarded-User": {"admin"}, "X-Auth-Subject": {"admin"}, "Remote-User": {"admin"}}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		seen := up.Seen()
		if len(seen) != 1 {
			t.Fatalf("%s: upstream saw %d requests", resp.Status, len(seen))
		}
		for name, v := range seen[0].Trailer {
			if slices.Contains(v, "admin") {
				t.Errorf("upstream received the trailer %s: %v", name, v)
			}
		}
	})

	t.Run("a GET stream over HTTP/2 whose empty body is of unknown length is forwarded", func(t *testing.T) {
		up.Reset()
		var protocols http.Protocols
		protocols.SetUnencryptedHTTP2(true)
		h2c := &http.Client{Transport: &http.Transport{Protocols: &protocols}}
		// A body of unknown length: the HEADERS frame leaves the stream open, and the
		// server sees ContentLength -1, as every HTTP/3 request does.
		req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, caddy.Base+"/mcp", io.NopCloser(strings.NewReader("")))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Accept", "text/event-stream")
		resp, err := h2c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.ProtoMajor != 2 {
			t.Fatalf("answered over %s, want HTTP/2", resp.Proto)
		}
		if seen := up.Seen(); len(seen) != 1 || seen[0].Method != http.MethodGet {
			t.Errorf("%s: upstream saw %d requests; want the GET", resp.Status, len(seen))
		}
	})

	t.Run("an upstream Set-Cookie for the consent cookie never reaches the client", func(t *testing.T) {
		resp := send(t, http.MethodPost, "application/json", initialize, nil)
		if got := resp.Header.Values("Set-Cookie"); len(got) != 1 || got[0] != "app_session=kept; Path=/" {
			t.Errorf("%s: client received Set-Cookie %q; want only the upstream's app_session", resp.Status, got)
		}
	})

	t.Run("an upstream's CORS headers are replaced by the broker's", func(t *testing.T) { // SECURITY.md S1.24
		resp := send(t, http.MethodPost, "application/json", initialize, map[string]string{"Origin": "https://inspector.example"})
		if got := resp.Header.Values("Access-Control-Allow-Origin"); len(got) != 1 || got[0] != "*" {
			t.Errorf("%s: Access-Control-Allow-Origin %q, want *", resp.Status, got)
		}
		if got := resp.Header.Values("Access-Control-Allow-Credentials"); len(got) != 0 {
			t.Errorf("%s: Access-Control-Allow-Credentials %q", resp.Status, got)
		}
	})

	t.Run("a go-sdk session with its GET stream and DELETE still works", func(t *testing.T) {
		up.Reset()
		session, err := mcp.NewClient(&mcp.Implementation{Name: "e2e", Version: "1"}, nil).Connect(t.Context(),
			&mcp.StreamableClientTransport{Endpoint: caddy.Base + "/mcp", HTTPClient: testenv.BearerClient(tok)}, nil)
		if err != nil {
			t.Fatalf("connecting: %v\n%s", err, caddy.logs.String())
		}
		if who := whoami(t, session); who.Subject != o.User.Subject {
			t.Errorf("upstream saw %q", who.Subject)
		}
		if err := session.Close(); err != nil {
			t.Errorf("closing: %v", err)
		}
		var methods []string
		for _, r := range up.Seen() {
			methods = append(methods, r.Method)
		}
		if !slices.Contains(methods, http.MethodDelete) {
			t.Errorf("upstream saw %v; want the session's DELETE", methods)
		}
	})
}

// TestModernClientThroughCaddyBinary: a go-sdk client speaking MCP 2026-07-28 reaches a
// stateless go-sdk upstream through the caddy binary with tool rules, so the broker reads
// each body and checks the headers that mirror it (SECURITY.md S1.23): the calls pass with
// their headers as sent, and the tool scope is still enforced.
func TestModernClientThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader(), testenv.Stateless())
	upURL, _ := url.Parse(up.URL)
	caddy := startCaddy(t, progressiveSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret,
		"openid notes:read notes:write", upURL.Host, nativeClientBlock))
	claims := o.AccessTokenClaims(o.User.Subject, caddy.Base+"/mcp")
	claims["scope"] = "openid notes:read"
	claims["client_id"] = testenv.NativeClientID
	tok := o.MintJWT(claims)

	session, err := mcp.NewClient(&mcp.Implementation{Name: "e2e", Version: "1"}, nil).Connect(t.Context(),
		&mcp.StreamableClientTransport{Endpoint: caddy.Base + "/mcp", HTTPClient: testenv.BearerClient(tok)}, nil)
	if err != nil {
		t.Fatalf("connecting: %v\n%s", err, caddy.logs.String())
	}
	defer session.Close()
	if who := whoami(t, session); who.Subject != o.User.Subject {
		t.Errorf("upstream saw %q", who.Subject)
	}
	if _, err := session.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "x"}}); err == nil {
		t.Error("notes_write passed without notes:write")
	}
	modern := 0
	for _, r := range up.Seen() {
		if r.Header.Get("Mcp-Protocol-Version") == "2026-07-28" && r.Header.Get("Mcp-Method") != "" {
			modern++
		}
		if r.RPCMethod == "tools/call" && r.Header.Get("Mcp-Name") != "whoami" {
			t.Errorf("a tools/call reached the upstream with Mcp-Name %q", r.Header.Get("Mcp-Name"))
		}
	}
	if modern == 0 {
		t.Errorf("no 2026-07-28 request reached the upstream: %d requests", len(up.Seen()))
	}
}
