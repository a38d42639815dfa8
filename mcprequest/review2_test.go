package mcprequest

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// Review (h-review2): mayMirror, the prefilter that decides whether a body without
// mirrored headers is read for its protocol version, matches the key byte-wise, while
// readMirroredMessage matches it as encoding/json does (escapes decoded, Unicode case
// folding: U+017F folds to s, U+212A to k). A body naming 2026-07-28 under such a key
// passes as legacy without MCP-Protocol-Version, though the broker's own reader (and a
// Go upstream) reads the version.
func TestReviewMayMirrorMissesKeysTheReaderMatches(t *testing.T) {
	for _, key := range []string{
		`io.modelcontextprotocol/\u0070rotocolVersion`,
		"io.modelcontextprotocol/protocolVer\u017fion",
	} {
		body := `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"` + key + `":"2026-07-28"}}}`
		r := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", strings.NewReader(body))
		r.Header = http.Header{"Content-Type": {"application/json"}}
		if _, refused := Inspect(httptest.NewRecorder(), r, 4096); refused != ErrVersionHeaderMissing {
			t.Errorf("key %q: refused %v, want ErrVersionHeaderMissing", key, refused)
		}
	}
}
