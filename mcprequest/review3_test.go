package mcprequest

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"golang.org/x/text/encoding/unicode"
)

// Review (h-review): S1.39 reads a tool name with bytes that are not UTF-8 as
// encoding/json does, one U+FFFD per invalid byte. An upstream in Node (the TypeScript
// SDK: raw-body or Request.json(), then JSON.parse) decodes the body as WHATWG's UTF-8
// decoder does, one U+FFFD per maximal ill-formed subsequence, and keeps an escaped lone
// surrogate (\ud800) as it is, where encoding/json writes U+FFFD. So the name the rules
// were matched against is not the name that upstream runs ("a??" against "a?" as a glob).
// A call whose tool name is not Unicode text as sent has no one reading; it is refused.
func TestReviewToolNameReadByEveryUpstreamAlike(t *testing.T) {
	for _, name := range []string{
		"notes\xe2\x82",     // a 3-byte sequence cut short: two U+FFFD here, one in Node
		"notes\xf0\x9f\x98", // a 4-byte sequence cut short: three here, one in Node
		`notes\ud800`,       // U+FFFD here, U+D800 in JSON.parse and Python's json
		`notes\udc00\ud800`, // reversed pair: two U+FFFD here, two lone surrogates in Node
	} {
		body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"` + name + `"}}`
		r := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", strings.NewReader(body))
		r.Header = http.Header{"Content-Type": {"application/json"}}
		msg, refused := Inspect(httptest.NewRecorder(), r, 4096)
		if refused == ErrUnreadable {
			continue
		}
		// What a WHATWG decoder, then a JSON parser, reads as the name (JSON.parse then
		// keeps an escaped lone surrogate, which Go cannot hold).
		decoded, _ := unicode.UTF8.NewDecoder().Bytes([]byte(body))
		var one struct {
			Params struct {
				Name string `json:"name"`
			} `json:"params"`
		}
		_ = json.Unmarshal(decoded, &one)
		t.Errorf("name %q: refused %v, tools %q (WHATWG UTF-8 then JSON: %q); want ErrUnreadable", name, refused, msg.Tools, one.Params.Name)
	}
}
