package flows

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// modernToolCall is a 2026-07-28 tools/call of tool, with the headers that mirror it.
func modernToolCall(id int, tool string) (http.Header, string) {
	body := fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":%q,"arguments":{},`+
		`"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}`, id, tool)
	return http.Header{
		"Accept":               {"application/json, text/event-stream"},
		"Mcp-Protocol-Version": {"2026-07-28"},
		"Mcp-Method":           {"tools/call"},
		"Mcp-Name":             {tool},
	}, body
}

// rpcErrorAnswer is a JSON-RPC error response as the broker writes it.
type rpcErrorAnswer struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Error   struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// TestMirroredHeadersThroughBroker (SECURITY.md S1.23): a go-sdk client speaking 2026-07-28
// reaches a 2026-07-28 upstream through a broker that reads the body (tool rules); a
// request whose headers disagree with its body is refused with 400 HeaderMismatch and
// never forwarded; the tool-scope decision is the body's, checked against its headers;
// Mcp-Param-* headers pass through untouched.
func TestMirroredHeadersThroughBroker(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader(), testenv.Stateless())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)
	writer := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read", "notes:write"}, testResource)
	reader := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)

	t.Run("a 2026-07-28 client calls tools through the broker", func(t *testing.T) {
		up.Reset()
		s := connect(t, front.URL, writer)
		for tool, args := range map[string]any{"whoami": map[string]any{}, "notes_write": map[string]any{"text": "n"}} {
			res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: tool, Arguments: args})
			if err != nil || res.IsError {
				t.Fatalf("%s: %v %+v", tool, err, res.Content[0])
			}
		}
		calls := 0
		for _, r := range up.Seen() {
			if r.RPCMethod != "tools/call" {
				continue
			}
			calls++
			if r.Header.Get("Mcp-Protocol-Version") != "2026-07-28" || r.Header.Get("Mcp-Method") != "tools/call" || r.Header.Get("Mcp-Name") == "" {
				t.Errorf("the upstream got a tools/call without the 2026-07-28 headers: %v", r.Header)
			}
		}
		if calls != 2 {
			t.Errorf("the upstream saw %d tool calls, want 2", calls)
		}
	})

	refused := func(t *testing.T, header http.Header, body string, wantID string) {
		t.Helper()
		up.Reset()
		resp := do(t, http.MethodPost, front.URL+"/mcp", header, body)
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("status %s, want 400", resp.Status)
		}
		var e rpcErrorAnswer
		decodeJSON(t, resp, &e)
		if e.JSONRPC != "2.0" || e.Error.Code != -32020 || !strings.HasPrefix(e.Error.Message, "Header mismatch") || string(e.ID) != wantID {
			t.Errorf("answer %+v (id %s), want a HeaderMismatch error for id %s", e, e.ID, wantID)
		}
		if resp.Header.Get("Access-Control-Allow-Origin") != "*" || resp.Header.Get("Access-Control-Allow-Credentials") != "" {
			t.Errorf("a browser client cannot read the refusal: %v", resp.Header)
		}
		if n := len(up.Seen()); n != 0 {
			t.Errorf("the upstream saw %d requests", n)
		}
	}
	withToken := func(h http.Header, token string) http.Header {
		h.Set("Authorization", "Bearer "+token)
		return h
	}

	t.Run("Mcp-Name naming another tool than the body", func(t *testing.T) {
		h, body := modernToolCall(41, "notes_write")
		h.Set("Mcp-Name", "notes_read") // a router would let this pass as a read
		refused(t, withToken(h, reader), body, "41")
	})
	t.Run("Mcp-Method naming another method", func(t *testing.T) {
		h, body := modernToolCall(42, "whoami")
		h.Set("Mcp-Method", "tools/list")
		refused(t, withToken(h, writer), body, "42")
	})
	t.Run("MCP-Protocol-Version differing from _meta", func(t *testing.T) {
		h, body := modernToolCall(43, "whoami")
		h.Set("Mcp-Protocol-Version", "2025-11-25")
		refused(t, withToken(h, writer), body, "43")
	})
	t.Run("a 2026-07-28 tools/call without Mcp-Name", func(t *testing.T) {
		h, body := modernToolCall(44, "whoami")
		h.Del("Mcp-Name")
		refused(t, withToken(h, writer), body, "44")
	})
	t.Run("an Mcp-Name in the Base64 sentinel form that decodes to another tool", func(t *testing.T) {
		h, body := modernToolCall(45, "notes_write")
		h.Set("Mcp-Name", "=?base64?bm90ZXNfcmVhZA==?=") // notes_read
		refused(t, withToken(h, reader), body, "45")
	})

	t.Run("the scope check reads the body the headers mirror", func(t *testing.T) {
		up.Reset()
		h, body := modernToolCall(46, "notes_write")
		resp := do(t, http.MethodPost, front.URL+"/mcp", withToken(h, reader), body)
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(resp.Header.Get("WWW-Authenticate"), "notes:write") {
			t.Errorf("status %s, challenge %q: want 403 naming notes:write", resp.Status, resp.Header.Get("WWW-Authenticate"))
		}
	})

	t.Run("Mcp-Param-* headers reach the upstream untouched", func(t *testing.T) {
		up.Reset()
		h, body := modernToolCall(47, "whoami")
		h.Set("Mcp-Param-Region", "=?base64?SGVsbG8sIOS4lueVjA==?=")
		h.Set("Mcp-Param-Unknown", "us-west1")
		resp := do(t, http.MethodPost, front.URL+"/mcp", withToken(h, writer), body)
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			t.Fatalf("status %s: %s", resp.Status, b)
		}
		seen := up.Seen()
		if len(seen) != 1 {
			t.Fatalf("the upstream saw %d requests", len(seen))
		}
		for k, want := range map[string]string{"Mcp-Param-Region": "=?base64?SGVsbG8sIOS4lueVjA==?=", "Mcp-Param-Unknown": "us-west1"} {
			if got := seen[0].Header.Values(k); len(got) != 1 || got[0] != want {
				t.Errorf("upstream got %s %q, want %q", k, got, want)
			}
		}
	})
}

// Without tool rules the broker does not read the body: it forwards the request as an
// intermediary, and the upstream, which reads the body, refuses the mismatch itself.
func TestMirroredHeadersUnreadWithoutRules(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader(), testenv.Stateless())
	front := startFront(t, newTestBroker(t, o, func(c *Config) { c.ToolScopes = nil }), up.URL)
	tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
	h, body := modernToolCall(5, "whoami")
	h.Set("Mcp-Name", "notes_write")
	h.Set("Authorization", "Bearer "+tok)
	resp := do(t, http.MethodPost, front.URL+"/mcp", h, body)
	var e rpcErrorAnswer
	decodeJSON(t, resp, &e)
	if resp.StatusCode != http.StatusBadRequest || e.Error.Code != -32020 {
		t.Errorf("status %s, error %+v: want the upstream's HeaderMismatch", resp.Status, e.Error)
	}
	if n := len(up.Seen()); n != 1 {
		t.Errorf("the upstream saw %d requests, want 1", n)
	}
}

// Legacy (2025-11-25) clients and upstreams are served as before with tool rules: the
// session, its GET stream and its DELETE pass through with Mcp-Session-Id untouched.
func TestLegacySessionPassesThrough(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)
	tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read", "notes:write"}, testResource)
	s := connect(t, front.URL, tok)
	if res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "n"}}); err != nil || res.IsError {
		t.Fatalf("notes_write: %v %+v", err, res)
	}
	id := s.ID()
	if id == "" {
		t.Fatal("the legacy upstream assigned no session")
	}
	h := bearer(tok)
	h.Set("Mcp-Session-Id", id)
	h.Set("Mcp-Protocol-Version", "2025-11-25")
	h.Set("Accept", "text/event-stream")
	up.Reset()
	ctxResp := doStream(t, front.URL+"/mcp", h)
	if ctxResp != http.StatusOK {
		t.Errorf("GET stream: %d", ctxResp)
	}
	if resp := do(t, http.MethodDelete, front.URL+"/mcp", h, ""); resp.StatusCode >= 300 {
		t.Errorf("DELETE: %s", resp.Status)
	}
	methods := map[string]bool{}
	for _, r := range up.Seen() {
		if r.Header.Get("Mcp-Session-Id") != id {
			t.Errorf("%s reached the upstream with Mcp-Session-Id %q", r.Method, r.Header.Get("Mcp-Session-Id"))
		}
		methods[r.Method] = true
	}
	if !methods[http.MethodGet] || !methods[http.MethodDelete] {
		t.Errorf("the upstream saw %v, want GET and DELETE", methods)
	}
}

// doStream opens a GET stream and returns its status, closing it at once.
func doStream(t *testing.T, url string, header http.Header) int {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header = header
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestMCPPreflightAllowsTransportHeaders: a browser client's preflight may send the
// 2026-07-28 headers and the Mcp-Param-* headers it asks for; only well-formed names
// are echoed, and a bounded number of them.
func TestMCPPreflightAllowsTransportHeaders(t *testing.T) {
	o := testenv.SharedOP(t)
	front := startFront(t, newTestBroker(t, o, nil), testenv.StartUpstream(t, testenv.TrustedSubjectHeader()).URL)
	preflight := func(requested string) http.Header {
		t.Helper()
		resp := do(t, http.MethodOptions, front.URL+"/mcp", http.Header{
			"Origin": {"https://inspector.example"}, "Access-Control-Request-Method": {"POST"},
			"Access-Control-Request-Headers": {requested},
		}, "")
		if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Access-Control-Allow-Origin") != "*" {
			t.Fatalf("preflight: %s %v", resp.Status, resp.Header)
		}
		return resp.Header
	}
	allowed := func(h http.Header) map[string]bool {
		m := map[string]bool{}
		for name := range strings.SplitSeq(h.Get("Access-Control-Allow-Headers"), ",") {
			m[strings.ToLower(strings.TrimSpace(name))] = true
		}
		return m
	}

	got := allowed(preflight("authorization,content-type,mcp-protocol-version,mcp-method,mcp-name,mcp-param-region,mcp-param-tenant_id,mcp-param-,mcp-param-a b,mcp-param-é,x-other"))
	for _, want := range []string{"authorization", "content-type", "mcp-protocol-version", "mcp-method", "mcp-name", "mcp-param-region", "mcp-param-tenant_id"} {
		if !got[want] {
			t.Errorf("%s not allowed: %v", want, got)
		}
	}
	for _, not := range []string{"mcp-param-", "mcp-param-a b", "mcp-param-a", "mcp-param-é", "x-other", "*"} {
		if got[not] {
			t.Errorf("%q allowed", not)
		}
	}

	var many []string
	for i := range 100 {
		many = append(many, fmt.Sprintf("mcp-param-p%d", i))
	}
	many = append(many, "mcp-param-"+strings.Repeat("x", 200))
	h := preflight(strings.Join(many, ", "))
	if n := strings.Count(strings.ToLower(h.Get("Access-Control-Allow-Headers")), "mcp-param-"); n != maxPreflightParamHeaders {
		t.Errorf("%d Mcp-Param-* headers allowed, want the bound %d", n, maxPreflightParamHeaders)
	}
	if h.Get("Access-Control-Allow-Credentials") != "" || !strings.Contains(h.Get("Vary"), "Access-Control-Request-Headers") {
		t.Errorf("preflight headers %v", h)
	}
}

// TestUpstreamCORSReplaced (SECURITY.md S1.24): an upstream that lets any origin read
// its responses with credentials does not get to: the broker sets the CORS headers of
// every upstream response itself.
func TestUpstreamCORSReplaced(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader(), testenv.Stateless(),
		testenv.ResponseHeader("Access-Control-Allow-Origin", "https://evil.example"),
		testenv.ResponseHeader("Access-Control-Allow-Credentials", "true"),
		testenv.ResponseHeader("access-control-expose-headers", "Set-Cookie"))
	front := startFront(t, newTestBroker(t, o, nil), up.URL)
	tok := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
	h, body := modernToolCall(1, "whoami")
	h.Set("Authorization", "Bearer "+tok)
	h.Set("Origin", "https://inspector.example")
	resp := do(t, http.MethodPost, front.URL+"/mcp", h, body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	if got := resp.Header.Values("Access-Control-Allow-Origin"); len(got) != 1 || got[0] != "*" {
		t.Errorf("Access-Control-Allow-Origin %q, want *", got)
	}
	if got := resp.Header.Values("Access-Control-Allow-Credentials"); len(got) != 0 {
		t.Errorf("Access-Control-Allow-Credentials %q", got)
	}
	if got := resp.Header.Values("Access-Control-Expose-Headers"); len(got) != 1 || got[0] != corsExposeHeaders {
		t.Errorf("Access-Control-Expose-Headers %q", got)
	}
}

// Replacing the CORS headers allocates once, whatever the upstream sent.
func TestReplaceCORSAllocations(t *testing.T) {
	h := http.Header{"Content-Type": {"application/json"}}
	if n := testing.AllocsPerRun(100, func() {
		h["Access-Control-Allow-Credentials"] = []string{"true"}[:1:1]
		replaceCORS(h)
	}); n > 2 { // the test's own slice, and replaceCORS's one
		t.Errorf("%v allocations", n)
	}
}
