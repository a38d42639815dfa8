package mcprequest

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
)

// modernCall is a 2026-07-28 tools/call as the transport's own example spells it.
const modernCall = `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{"location":"Seattle, WA"},` +
	`"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}`

// modern is a 2026-07-28 request of method with params (without _meta), as JSON.
func modern(id, method, params string) string {
	meta := `"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}`
	if params != "" {
		meta = params + "," + meta
	}
	idMember := ""
	if id != "" {
		idMember = `"id":` + id + `,`
	}
	return `{"jsonrpc":"2.0",` + idMember + `"method":"` + method + `","params":{` + meta + `}}`
}

// TestInspectMirroredHeaders: every rule of the transport's Server Validation, through
// Inspect: a 2026-07-28 request whose headers and body agree passes with its tools; a
// missing, mismatching, repeated or malformed header is refused with HeaderMismatch and
// the request's id; legacy requests without the headers pass as before; Mcp-Param-*
// headers are not read.
func TestInspectMirroredHeaders(t *testing.T) {
	h := func(kv ...string) http.Header {
		hd := http.Header{"Content-Type": {"application/json"}}
		for i := 0; i+1 < len(kv); i += 2 {
			hd[kv[i]] = append(hd[kv[i]], kv[i+1])
		}
		return hd
	}
	const v, m, n = "MCP-Protocol-Version", "Mcp-Method", "Mcp-Name"
	full := func(kv ...string) http.Header {
		return h(append([]string{v, "2026-07-28", m, "tools/call", n, "get_weather"}, kv...)...)
	}
	for _, tc := range []struct {
		name      string
		header    http.Header
		body      string
		want      *Refusal
		wantTools []string
		wantID    string
	}{
		// Agreement passes.
		{"a 2026-07-28 tools/call whose headers agree", full(), modernCall, nil, []string{"get_weather"}, ""},
		{"header names in any case", http.Header{"Content-Type": {"application/json"}, "Mcp-Protocol-Version": {"2026-07-28"}, "MCP-METHOD": {"tools/call"}, "mcp-name": {"get_weather"}}, modernCall, nil, []string{"get_weather"}, ""},
		{"Mcp-Param-* headers are forwarded unread", full("Mcp-Param-Region", "=?base64?not base64?=", "Mcp-Param-Text", "anything"), modernCall, nil, []string{"get_weather"}, ""},
		{"a tools/list needs no Mcp-Name", h(v, "2026-07-28", m, "tools/list"), modern("2", "tools/list", ""), nil, nil, ""},
		{"resources/read: Mcp-Name mirrors params.uri", h(v, "2026-07-28", m, "resources/read", n, "file:///projects/myapp/config.json"),
			modern("2", "resources/read", `"uri":"file:///projects/myapp/config.json"`), nil, nil, ""},
		{"prompts/get: Mcp-Name mirrors params.name", h(v, "2026-07-28", m, "prompts/get", n, "review"), modern("3", "prompts/get", `"name":"review"`), nil, nil, ""},
		{"the Base64 sentinel form of a non-ASCII name", h(v, "2026-07-28", m, "tools/call", n, "=?base64?SGVsbG8sIOS4lueVjA==?="),
			modern("4", "tools/call", `"name":"Hello, 世界"`), nil, []string{"Hello, 世界"}, ""},
		{"the Base64 sentinel form of a name that looks encoded", h(v, "2026-07-28", m, "tools/call", n, "=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?="),
			modern("5", "tools/call", `"name":"=?base64?literal?="`), nil, []string{"=?base64?literal?="}, ""},
		{"a notification needs no Mcp-Method", h(v, "2026-07-28"), modern("", "notifications/cancelled", ""), nil, nil, ""},
		{"a 2025-11-25 request without mirrored headers", h(v, "2025-11-25"), `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_write"}}`, nil, []string{"notes_write"}, ""},
		{"a request with no headers and no version in its body", h(), `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`, nil, nil, ""},
		{"a 2025-03-26 batch", h(v, "2025-03-26"), `[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},{"jsonrpc":"2.0","id":2,"method":"tools/list"}]`, nil, []string{"a"}, ""},
		{"an unknown version of a legacy body", h(v, "2025-06-18", m, "tools/call", n, "a"), `{"id":"x","method":"tools/call","params":{"name":"a"}}`, nil, []string{"a"}, ""},

		// Missing headers on a 2026-07-28 request.
		{"a body naming its version without MCP-Protocol-Version", h(m, "tools/call", n, "get_weather"), modernCall, ErrVersionHeaderMissing, nil, "1"},
		{"a body naming its version and no header at all", h(), modernCall, ErrVersionHeaderMissing, nil, "1"},
		{"2026-07-28 without Mcp-Method", h(v, "2026-07-28", n, "get_weather"), modernCall, ErrMethodHeaderMissing, nil, "1"},
		{"2026-07-28 tools/call without Mcp-Name", h(v, "2026-07-28", m, "tools/call"), modernCall, ErrNameHeaderMissing, nil, "1"},
		{"2026-07-28 resources/read without Mcp-Name", h(v, "2026-07-28", m, "resources/read"), modern(`"r"`, "resources/read", `"uri":"file:///a"`), ErrNameHeaderMissing, nil, `"r"`},
		{"a 2026-07-28 header on a body without a version", h(v, "2026-07-28", m, "tools/list"), `{"jsonrpc":"2.0","id":7,"method":"tools/list"}`, ErrVersionMismatch, nil, "7"},

		// Mismatches.
		{"MCP-Protocol-Version differs from _meta", h(v, "2026-07-29", m, "tools/call", n, "get_weather"), modernCall, ErrVersionMismatch, nil, "1"},
		{"Mcp-Method differs from method", h(v, "2026-07-28", m, "tools/list", n, "get_weather"), modernCall, ErrMethodMismatch, nil, "1"},
		{"Mcp-Method differs in case only", h(v, "2026-07-28", m, "Tools/Call", n, "get_weather"), modernCall, ErrMethodMismatch, nil, "1"},
		{"Mcp-Name differs from params.name", h(v, "2026-07-28", m, "tools/call", n, "delete_everything"), modernCall, ErrNameMismatch, nil, "1"},
		{"Mcp-Name names a uri on a tools/call", h(v, "2026-07-28", m, "tools/call", n, "file:///a"),
			modern("1", "tools/call", `"name":"a","uri":"file:///a"`), ErrNameMismatch, nil, "1"},
		{"a decoded Mcp-Name differs from params.name", h(v, "2026-07-28", m, "tools/call", n, "=?base64?ZGVsZXRl?="), modernCall, ErrNameMismatch, nil, "1"},
		{"a plain Mcp-Name spelling the encoded form", h(v, "2026-07-28", m, "tools/call", n, "=?base64?Z2V0X3dlYXRoZXI=?="), modernCall, nil, []string{"get_weather"}, ""},
		{"Mcp-Name on a method that names nothing", h(v, "2026-07-28", m, "tools/list", n, "x"), modern("1", "tools/list", ""), ErrNameMismatch, nil, "1"},
		{"a duplicate name member disagreeing with Mcp-Name", full(), modern("1", "tools/call", `"name":"get_weather","Name":"delete_everything"`), ErrNameMismatch, nil, "1"},
		{"a duplicate method member disagreeing with Mcp-Method", full(),
			`{"jsonrpc":"2.0","id":1,"method":"tools/call","METHOD":"tools/list","params":{"name":"get_weather","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}`, ErrMethodMismatch, nil, "1"},
		{"an escaped version key is read", h(v, "2025-11-25", m, "tools/list"),
			`{"id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/\u0070rotocolVersion":"2026-07-28"}}}`, ErrVersionMismatch, nil, "1"},
		{"a version that is not a string", h(v, "2026-07-28", m, "tools/list"),
			`{"id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":20260728}}}`, ErrVersionMismatch, nil, "1"},
		{"a name that is not a string", h(v, "2026-07-28", m, "tools/call", n, "1"), modern("1", "tools/call", `"name":1`), ErrNameMismatch, nil, "1"},
		{"Mcp-Method on a legacy request must still match", h(v, "2025-11-25", m, "tools/list"), `{"id":1,"method":"tools/call","params":{"name":"a"}}`, ErrMethodMismatch, nil, "1"},
		{"Mcp-Name on a legacy request must still match", h(n, "b"), `{"id":1,"method":"tools/call","params":{"name":"a"}}`, ErrNameMismatch, nil, "1"},
		{"an id that is an object is not echoed", h(v, "2026-07-28", m, "tools/list"), modern(`{"a":1}`, "tools/call", `"name":"x"`), ErrMethodMismatch, nil, ""},

		// Malformed headers.
		{"a repeated Mcp-Name", full(n, "get_weather"), modernCall, ErrHeaderInvalid, nil, ""},
		{"Mcp-Name under a second spelling", full("Mcp_Name", "get_weather"), modernCall, ErrHeaderInvalid, nil, ""},
		{"an empty Mcp-Method", h(v, "2026-07-28", m, "", n, "get_weather"), modernCall, ErrHeaderInvalid, nil, ""},
		{"an empty MCP-Protocol-Version is none", h(v, ""), `{"id":1,"method":"tools/call","params":{"name":"a"}}`, nil, []string{"a"}, ""},
		{"an empty MCP-Protocol-Version with a versioned body", h(v, "", m, "tools/call", n, "get_weather"), modernCall, ErrVersionHeaderMissing, nil, "1"},
		{"a control character in Mcp-Name", h(v, "2026-07-28", m, "tools/call", n, "get\x01weather"), modernCall, ErrHeaderInvalid, nil, ""},
		{"a non-ASCII byte in Mcp-Name", h(v, "2026-07-28", m, "tools/call", n, "get_w\xc3\xa9ather"), modernCall, ErrHeaderInvalid, nil, ""},
		{"a space in Mcp-Method", h(v, "2026-07-28", m, "tools/ call", n, "get_weather"), modernCall, ErrHeaderInvalid, nil, ""},
		{"malformed Base64 in the sentinel form", h(v, "2026-07-28", m, "tools/call", n, "=?base64?Z2V0X3dlYXRoZXI?="), modernCall, ErrHeaderInvalid, nil, "1"},
		{"Base64 with characters outside the alphabet", h(v, "2026-07-28", m, "tools/call", n, "=?base64?Z2V0X3dl*XRoZXI=?="), modernCall, ErrHeaderInvalid, nil, "1"},

		// Batches.
		{"a batch with a 2026-07-28 header", h(v, "2026-07-28"), `[` + modernCall + `]`, ErrBatchWithHeaders, nil, ""},
		{"a batch with Mcp-Method", h(m, "tools/call"), `[{"id":1,"method":"tools/call","params":{"name":"a"}}]`, ErrBatchWithHeaders, nil, ""},
		{"a batch whose element names 2026-07-28", h(), `[{"id":1,"method":"tools/list"},` + modernCall + `]`, ErrBatchWithHeaders, nil, ""},

		// Not JSON, with headers to check: fail closed.
		{"invalid JSON with mirrored headers", h(v, "2026-07-28", m, "tools/list"), `{"id":1,"method":"tools/list",}`, ErrUnreadable, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", strings.NewReader(tc.body))
			r.Header = tc.header
			msg, refused := Inspect(httptest.NewRecorder(), r, 4096)
			if refused != tc.want {
				t.Fatalf("refused %v, want %v", refused, tc.want)
			}
			if refused != nil {
				if refused.Status != http.StatusBadRequest || (refused != ErrUnreadable && refused.RPCCode == 0) {
					t.Errorf("refusal %+v: want 400 with a JSON-RPC code", refused)
				}
				if string(msg.ID) != tc.wantID {
					t.Errorf("id %q, want %q", msg.ID, tc.wantID)
				}
				return
			}
			if !slices.Equal(msg.Tools, tc.wantTools) {
				t.Errorf("tools %q, want %q", msg.Tools, tc.wantTools)
			}
			if got, _ := io.ReadAll(r.Body); string(got) != tc.body {
				t.Errorf("upstream would read %q", got)
			}
		})
	}
}

// The refusals carry the codes the 2026-07-28 schema allocates.
func TestMirroredHeaderRefusalCodes(t *testing.T) {
	for _, r := range []*Refusal{ErrVersionHeaderMissing, ErrVersionMismatch, ErrMethodHeaderMissing, ErrMethodMismatch, ErrNameHeaderMissing, ErrNameMismatch, ErrHeaderInvalid} {
		if r.RPCCode != -32020 || r.Status != http.StatusBadRequest || !strings.HasPrefix(r.Description, "Header mismatch: ") {
			t.Errorf("%+v: want 400 HeaderMismatch (-32020)", r)
		}
	}
	if ErrBatchWithHeaders.RPCCode != -32600 {
		t.Errorf("batch refusal code %d, want Invalid Request", ErrBatchWithHeaders.RPCCode)
	}
}

func TestDecodeHeaderValue(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"us-west1", "us-west1", true},
		{"=?base64?SGVsbG8sIOS4lueVjA==?=", "Hello, 世界", true},
		{"=?base64?IHBhZGRlZCA=?=", " padded ", true},
		{"=?base64?bGluZTEKbGluZTI=?=", "line1\nline2", true},
		{"=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?=", "=?base64?literal?=", true},
		{"=?base64??=", "", true},
		{"=?BASE64?SGk=?=", "=?BASE64?SGk=?=", true}, // the markers are case-sensitive: not the sentinel
		{"=?base64?SGk=", "=?base64?SGk=", true},     // no suffix: not the sentinel
		{"=?base64?SGk?=", "", false},                // padding missing
		{"=?base64?SGk=\n?=", "", false},             // a newline inside
		{"=?base64?S-k=?=", "", false},               // URL alphabet
		{"=?base64?SGl=?=", "", false},               // non-zero padding bits
		{"=?base64?YYs=?=", "", false},               // "a\x8b", not UTF-8: no JSON string decodes to it
	} {
		got, ok := decodeHeaderValue(tc.in)
		if ok != tc.ok || got != tc.want {
			t.Errorf("decodeHeaderValue(%q) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestMayMirror(t *testing.T) {
	for body, want := range map[string]bool{
		`{"method":"tools/list"}`: false,
		`{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}`: true,
		`{"_meta":{"IO.MODELCONTEXTPROTOCOL/PROTOCOLVERSION":"x"}}`:          true,
		`{"p":"protocolversio"}`: false,
		`ppppprotocolversion`:    true,
		``:                       false,
	} {
		if got := mayMirror([]byte(body)); got != want {
			t.Errorf("mayMirror(%s) = %v, want %v", body, got, want)
		}
	}
}

// A request the broker does not decode stays as cheap as before: a legacy version
// header alone does not make Inspect decode a body that calls no tool.
func TestInspectLegacyHeaderDecodesNothing(t *testing.T) {
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/list",}` // invalid, and never decoded
	r := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", strings.NewReader(body))
	r.Header = http.Header{"Content-Type": {"application/json"}, "Mcp-Protocol-Version": {"2025-11-25"}}
	if _, refused := Inspect(httptest.NewRecorder(), r, 4096); refused != nil {
		t.Errorf("refused %v", refused)
	}
}

// mayMirrorIndexAny is mayMirror as it was, with bytes.IndexAny: the reference.
func mayMirrorIndexAny(body []byte) bool {
	const key = "protocolversion"
	for i := bytes.IndexAny(body, "pP"); i >= 0 && i+len(key) <= len(body); {
		if bytes.EqualFold(body[i:i+len(key)], []byte(key)) {
			return true
		}
		j := bytes.IndexAny(body[i+1:], "pP")
		if j < 0 {
			return false
		}
		i += 1 + j
	}
	return false
}

// mayCallTool is the call half of mayCallToolOrMirror as it was written before the two
// scans were joined: FuzzMayMirror's reference.
func mayCallTool(body []byte) bool {
	return bytes.Contains(body, toolsCallMethod) || bytes.IndexByte(body, '\\') >= 0 || bytes.IndexByte(body, 0) >= 0 || !ascii(body)
}

// FuzzMayMirror: mayMirror agrees with the IndexAny scan it replaced, and
// mayCallToolOrMirror with mayCallTool and mayMirror.
func FuzzMayMirror(f *testing.F) {
	for _, s := range []string{`{"_meta":{"protocolVersion":"x"}}`, `pPpProtocolVERSION`, `PROTOCOLVERSIO`, `p`, ``, `xxPxxprotocolversion`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, mirror := range []bool{false, true} {
			call, mirrored := mayCallToolOrMirror(body, mirror)
			if call != mayCallTool(body) || mirrored != (mirror || mayMirror(body)) {
				t.Fatalf("mayCallToolOrMirror(%q, %v) = %v, %v", body, mirror, call, mirrored)
			}
		}
		if got, want := namesProtocolVersion(body), mayMirrorIndexAny(body); got != want {
			t.Fatalf("namesProtocolVersion(%q) = %v, want %v", body, got, want)
		}
	})
}
