package mcprequest

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// BenchmarkInspectWarm is Inspect alone on the bodies of flows' BenchmarkHandleWarm: a
// tools/list, a tools/call with a 512-byte argument, and the same call in MCP 2026-07-28
// with its mirrored headers. It uses only the exported API, so that the same file can be
// copied into an earlier tree to compare.
func BenchmarkInspectWarm(b *testing.B) {
	toolCall := `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"` + strings.Repeat("x", 512) + `"}}}`
	modernCall := `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"` +
		strings.Repeat("x", 512) + `"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}`
	for _, bc := range []struct {
		name, body string
		h          map[string]string
	}{
		{"list", `{"jsonrpc":"2.0","id":8,"method":"tools/list"}`, nil},
		{"call", toolCall, nil},
		{"modern", modernCall, map[string]string{"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "notes_write"}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			r := httptest.NewRequest(http.MethodPost, "/mcp", nil)
			r.Header.Set("Content-Type", "application/json")
			r.Header.Set("Authorization", "Bearer x")
			for k, v := range bc.h {
				r.Header.Set(k, v)
			}
			body := strings.NewReader(bc.body)
			w := httptest.NewRecorder()
			b.ReportAllocs()
			for b.Loop() {
				body.Reset(bc.body)
				r.Body, r.ContentLength = readCloser{body}, int64(len(bc.body))
				if _, refused := Inspect(w, r, 1<<20); refused != nil {
					b.Fatal(refused.Description)
				}
			}
		})
	}
}

// readCloser is a body Inspect can read again on every iteration.
type readCloser struct{ *strings.Reader }

func (readCloser) Close() error { return nil }
