package flows

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"net/http"
	"testing"
	"unicode/utf16"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

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
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	front := startFront(t, newTestBroker(t, o, nil), up.URL)
	readOnly := o.LoginAccessToken(t, testenv.NativeClientID, "", []string{"openid", "notes:read"}, testResource)
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
