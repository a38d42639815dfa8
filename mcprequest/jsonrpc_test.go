package mcprequest

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
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
		// Readers differ on a byte that is not UTF-8 (encoding/json: U+FFFD per byte; Node:
		// per ill-formed sequence) and on an escaped lone surrogate: refused (S1.41).
		{"invalid UTF-8 in a name is refused", "{\"method\":\"tools/call\",\"params\":{\"name\":\"a\x8b\"}}", nil, false},
		{"a lone surrogate in a name is refused", `{"method":"tools/call","params":{"name":"a\ud800"}}`, nil, false},
		{"U+FFFD in a duplicate name is refused", `{"method":"tools/call","params":{"name":"a","NAME":"\ufffd"}}`, nil, false},
		{"a surrogate pair in a name", `{"method":"tools/call","params":{"name":"a\ud83d\ude00"}}`, []string{"a\U0001f600"}, true},
		{"invalid UTF-8 in the method", "{\"method\":\"tools/call\xff\",\"params\":{\"name\":\"a\"}}", nil, true},
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
		// 2026-07-28 bodies, whose headers checkMirroredHeaders compares.
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}`,
		`{"id":"r","method":"resources/read","params":{"uri":"file:///a","_meta":{"io.modelcontextprotocol/\u0070rotocolVersion":"2026-07-28"}}}`,
		`[{"id":1,"method":"tools/call","params":{"name":"a","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}]`,
		`{"id":{},"method":"tools/call","params":{"name":1,"uri":null,"_meta":[]}}`,
		`null`,
	} {
		f.Add([]byte(s))
	}
	// Headers of a 2026-07-28 tools/call, for checkMirroredHeaders on every input.
	headers, _ := readMirroredHeaders(http.Header{"Mcp-Protocol-Version": {"2026-07-28"}, "Mcp-Method": {"tools/call"}, "Mcp-Name": {"=?base64?YQ==?="}})
	f.Fuzz(func(t *testing.T, body []byte) {
		if json.Valid(body) {
			// Never panics, and passes only a body that mirrors its headers.
			if _, refused := checkMirroredHeaders(headers, body, new(mirroredMessage)); refused == nil {
				var one struct {
					Method string `json:"method"`
					Params struct {
						Name string `json:"name"`
					} `json:"params"`
				}
				if json.Unmarshal(body, &one) == nil && (one.Method != "tools/call" || one.Params.Name != "a") && !isBatch(body) {
					t.Fatalf("passed %s with headers of a tools/call of a", body)
				}
			}
		}
		names, ok := toolNames(body)
		var one struct {
			Method string `json:"method"`
			Params struct {
				Name string `json:"name"`
			} `json:"params"`
		}
		if json.Unmarshal(body, &one) == nil && one.Method == "tools/call" {
			// A call with a name holding U+FFFD is refused: readers differ on what it was
			// (S1.41).
			if refusedText := !ok && holdsReplacement(body); !refusedText && (!ok || !slices.Contains(names, one.Params.Name)) {
				t.Fatalf("encoding/json calls %q; toolNames found %q (ok %v)", one.Params.Name, names, ok)
			}
		}
	})
}

// holdsReplacement tells whether a string of the JSON body, a key or a value, reads as
// holding U+FFFD.
func holdsReplacement(body []byte) bool {
	var v any
	if json.Unmarshal(body, &v) != nil {
		return false
	}
	var walk func(any) bool
	walk = func(v any) bool {
		switch v := v.(type) {
		case string:
			return strings.ContainsRune(v, utf8.RuneError)
		case []any:
			return slices.ContainsFunc(v, walk)
		case map[string]any:
			for k, x := range v {
				if strings.ContainsRune(k, utf8.RuneError) || walk(x) {
					return true
				}
			}
		}
		return false
	}
	return walk(v)
}

// equalFold agrees with strings.EqualFold, which encoding/json's key matching follows.
func TestEqualFold(t *testing.T) {
	for _, tc := range [][2]string{
		{"method", "method"}, {"METHOD", "method"}, {"Method", "methoD"}, {"\u212aey", "key"}, {"key", "\u212aEY"},
		{"ſ", "S"}, {"method", "methods"}, {"", ""}, {"", "a"}, {"\xff", "\xff"}, {"\xff", "\ufffd"}, {"é", "É"}, {"é", "e"},
	} {
		if got, want := equalFold([]byte(tc[0]), tc[1]), strings.EqualFold(tc[0], tc[1]); got != want {
			t.Errorf("equalFold(%q, %q) = %v, want %v", tc[0], tc[1], got, want)
		}
	}
}

// skipStringByteWise is skipString as it was, one byte at a time: the reference the
// IndexByte version must agree with.
func skipStringByteWise(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return min(i, len(b))
}

// FuzzSkipString: skipString ends a string where a byte-wise scan ends it, escapes and
// runs of backslashes included, on any bytes after the opening quote.
func FuzzSkipString(f *testing.F) {
	for _, s := range []string{`"a"`, `"\""`, `"\\"`, `"\\\""x"`, `"\\\\"`, `"x\`, `"`, `"` + strings.Repeat("x", 300) + `\\\"y"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		b = append([]byte{'"'}, b...)
		if got, want := skipString(b, 0), skipStringByteWise(b, 0); got != want {
			t.Fatalf("skipString(%q) = %d, want %d", b, got, want)
		}
	})
}

// ascii finds a high byte at any position, in the words and in the tail.
func TestASCII(t *testing.T) {
	for n := range 20 {
		b := []byte(strings.Repeat("a", 19))
		if !ascii(b[:n]) {
			t.Fatalf("ascii(%d ASCII bytes) = false", n)
		}
		for i := range n {
			c := slices.Clone(b[:n])
			c[i] = 0x80
			if ascii(c) {
				t.Errorf("ascii missed 0x80 at %d of %d", i, n)
			}
		}
	}
}

// FuzzKeyIs: keyIs, with its ASCII fast path, agrees with decoding the key and comparing
// it with strings.EqualFold, as encoding/json matches field names, for every name the
// package reads and for names that fold to them across lengths.
func FuzzKeyIs(f *testing.F) {
	names := []string{"method", "params", "name", "id", "uri", "requestState", "inputResponses", "_meta",
		"elicitation", "url", metaProtocolVersion, metaClientCapabilities, "", "ſ", "k", "\u212a", "é"}
	for _, s := range []string{`"method"`, `"METHOD"`, `"Name"`, "\"\u212aey\"", `"\u006dethod"`, "\"na\xffme\"",
		"\"reque\u017ftState\"", `"_META"`, `""`, `"s"`, `"K"`, `"É"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var key string
		// A key as the scanner hands it over: one JSON string, quote to quote.
		decoded := len(raw) > 0 && raw[0] == '"' && skipString(raw, 0) == len(raw) && json.Unmarshal(raw, &key) == nil
		for _, name := range names {
			got := keyIs(raw, name)
			if !decoded {
				// Not a JSON string: keyIs reads only what the scanner passes it, valid
				// JSON; it must not panic on the rest.
				continue
			}
			if want := strings.EqualFold(key, name); got != want {
				t.Fatalf("keyIs(%q, %q) = %v; encoding/json reads %q: %v", raw, name, got, key, want)
			}
		}
	})
}
