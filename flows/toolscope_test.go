package flows

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"unicode/utf16"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

func TestToolNames(t *testing.T) {
	for _, tc := range []struct {
		name  string
		body  string
		want  []string
		valid bool
	}{
		{"one call", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_write"}}`, []string{"notes_write"}, true},
		{"not a call", `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"name":"notes_write"}}`, nil, true},
		{"escaped method", `{"method":"tools\/call","params":{"name":"notes_write"}}`, []string{"notes_write"}, true},
		{"unicode-escaped key and name", `{"\u006dethod":"tools/call","params":{"n\u0061me":"notes_\u0077rite"}}`, []string{"notes_write"}, true},
		{"keys in another case", `{"Method":"tools/call","PARAMS":{"Name":"notes_write"}}`, []string{"notes_write"}, true},
		{"Kelvin sign folds like encoding/json", "{\"method\":\"tools/call\",\"params\":{\"name\":\"a\",\"\u212aey\":1}}", []string{"a"}, true},
		{"every duplicate name counts", `{"method":"tools/call","params":{"name":"notes_write","Name":"notes_read"}}`, []string{"notes_write", "notes_read"}, true},
		{"a duplicate method that calls", `{"method":"tools/list","method":"tools/call","params":{"name":"x"}}`, []string{"x"}, true},
		{"batch", `[{"method":"tools/call","params":{"name":"a"}} , {"method":"ping"},{"method":"tools/call","params":{"name":"b","arguments":{"n":[1,{"name":"c"}]}}}]`, []string{"a", "b"}, true},
		{"nested strings with brackets", `{"method":"tools/call","params":{"arguments":{"s":"}]\"{["},"name":"a"}}`, []string{"a"}, true},
		{"numbers and literals", `{"id":-1.5e3,"ok":true,"no":null,"method":"tools/call","params":{"x":false,"name":"a"}}`, []string{"a"}, true},
		{"NaN is refused", `{"id":NaN,"method":"tools/call","params":{"name":"a"}}`, nil, false},
		{"trailing comma is refused", `{"method":"tools/call","params":{"name":"a"},}`, nil, false},
		{"batch element not an object", `[{"method":"tools/call","params":{"name":"a"}},7]`, nil, false},
		{"empty batch", `[]`, nil, true},
		{"a scalar", `"tools/call"`, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := toolNames([]byte(tc.body))
			if ok != tc.valid || !slices.Equal(got, tc.want) {
				t.Errorf("toolNames = %q, %v; want %q, %v", got, ok, tc.want, tc.valid)
			}
		})
	}
}

// FuzzToolNames: whatever encoding/json reads as a tools/call of some tool, toolNames
// names that tool too, and it never panics.
func FuzzToolNames(f *testing.F) {
	for _, s := range []string{
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`,
		`[{"method":"tools/call","params":{"name":"a"}},{"method":"tools/list"}]`,
		`{"method":"tools\/call","params":{"Name":"a","name":"b"}}`,
		`{"params":{"name":"z"},"method":"tools/call"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		names, ok := toolNames(body)
		var one struct {
			Method string `json:"method"`
			Params struct {
				Name string `json:"name"`
			} `json:"params"`
		}
		if json.Unmarshal(body, &one) == nil && one.Method == "tools/call" {
			if !ok || !slices.Contains(names, one.Params.Name) {
				t.Fatalf("encoding/json calls %q; toolNames found %q (ok %v)", one.Params.Name, names, ok)
			}
		}
	})
}

// TestBodilessRequestOfUnknownLength: HTTP/3 (quic-go, which Caddy serves) and HTTP/2
// without END_STREAM on the headers give a request a body of unknown length even when
// none follows. A GET stream or DELETE sent so is no body on GET and must pass; one that
// does carry a body is refused as before.
func TestBodilessRequestOfUnknownLength(t *testing.T) {
	for _, method := range []string{http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodDelete} {
		r := httptest.NewRequest(method, "https://mcp.example.test/mcp", nil)
		r.ContentLength, r.Body = -1, io.NopCloser(strings.NewReader(""))
		if refused := checkFraming(r); refused != nil {
			t.Errorf("%s with an empty body of unknown length: refused %q", method, refused.description)
		}
		r.ContentLength, r.Body = -1, io.NopCloser(strings.NewReader(`{"jsonrpc":"2.0","id":2,"method":"tools/call"}`))
		if refused := checkFraming(r); refused != refuseBodyNotPost {
			t.Errorf("%s with a body of unknown length: refused %v, want %q", method, refused, refuseBodyNotPost.description)
		}
	}
}

// utf16LE encodes s as UTF-16LE without a BOM, as Python's json.loads(bytes) detects it
// (RFC 8259 §8.1 leaves other encodings to "closed ecosystems"; the MCP Python SDK, which
// the Nextcloud MCP server runs on, calls json.loads on the raw body bytes).
func utf16LE(s string) []byte {
	var b bytes.Buffer
	for _, u := range utf16.Encode([]rune(s)) {
		_ = binary.Write(&b, binary.LittleEndian, u)
	}
	return b.Bytes()
}

// TestToolScopeEncodings: a tools/call the broker cannot read as UTF-8 JSON must be
// refused, not passed to an upstream that may read it after all (a decompressing
// middleware, Python's json.loads detecting UTF-16/32) and run a tool no one checked
// (SECURITY.md S1.10).
func TestToolScopeEncodings(t *testing.T) {
	o := verifierOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)
	readOnly := loginAccessToken(t, o, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
	const call = `{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`

	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write([]byte(call))
	_ = zw.Close()

	for _, tc := range []struct {
		name     string
		body     []byte
		encoding string
	}{
		{"UTF-16LE body", utf16LE(call), ""},
		{"UTF-16LE body with BOM", append([]byte{0xff, 0xfe}, utf16LE(call)...), ""},
		{"gzip content encoding", gz.Bytes(), "gzip"},
		{"deflate content encoding, even on a plain body", []byte(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`), "deflate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up.Reset()
			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+"/mcp", bytes.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Authorization", "Bearer "+readOnly)
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Accept", "application/json, text/event-stream")
			if tc.encoding != "" {
				req.Header.Set("Content-Encoding", tc.encoding)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if n := len(up.Seen()); n != 0 || resp.StatusCode < 400 || resp.StatusCode >= 500 {
				t.Errorf("%s: upstream saw %d requests, want the broker to refuse with a 4xx", resp.Status, n)
			}
		})
	}
}
