package mcprequest

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"strings"
	"unicode"
	"unicode/utf8"
)

var toolsCallMethod = []byte(`"tools/call"`)

// ascii tells whether b holds no byte >= 0x80, eight bytes at a time.
func ascii(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b)&0x8080808080808080 != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

// isBatch tells whether body starts as a JSON array.
func isBatch(body []byte) bool {
	i := skipSpace(body, 0)
	return i < len(body) && body[i] == '['
}

// toolNames lists the tools called by a JSON-RPC request or batch, read as generously as
// any upstream could read them: a member counts under every spelling some JSON decoder
// matches (keys compared with Unicode case folding, as encoding/json compares them), and
// every duplicate counts, whichever one a decoder keeps. ok is false for a body that is
// not valid JSON, a batch with an element that is not an object, or a call whose tool
// name holds U+FFFD (callNames).
//
// The body is validated once (validJSON: json.Valid, faster), then walked by jsonMembers,
// which on valid JSON only has to find where values end: no decoding, no allocation but
// the names.
func toolNames(body []byte) (names []string, ok bool) {
	if !validJSON(body) {
		return nil, false
	}
	return toolNamesOfValid(body)
}

// toolNamesOfValid is toolNames of a body already known to be valid JSON.
func toolNamesOfValid(body []byte) (names []string, ok bool) {
	i := skipSpace(body, 0)
	if body[i] != '[' {
		return callNames(body[i:])
	}
	for i = skipSpace(body, i+1); body[i] != ']'; {
		end := skipValue(body, i)
		n, ok := callNames(body[i:end])
		if !ok {
			return nil, false
		}
		names = append(names, n...)
		if i = skipSpace(body, end); body[i] == ',' {
			i = skipSpace(body, i+1)
		}
	}
	return names, true
}

// callNames returns the tool names of one JSON-RPC message (valid JSON) when any of its
// method members is tools/call; ok is false when msg is not an object, or a tool name
// holds U+FFFD (as sent, or as what a decoder makes of bytes that are not Unicode text).
func callNames(msg []byte) (names []string, ok bool) {
	if msg[0] != '{' {
		return nil, false
	}
	// One walk finds the methods and keeps every params object (each duplicate counts),
	// which are read only when the message is a call.
	call := false
	var kept [2][]byte
	params := kept[:0]
	jsonMembers(msg, func(key, value []byte) {
		switch {
		case keyIs(key, "method"):
			if stringIs(value, "tools/call") {
				call = true
			}
		case value[0] == '{' && keyIs(key, "params"):
			params = append(params, value)
		}
	})
	if !call {
		return nil, true
	}
	notText := false
	for _, p := range params {
		jsonMembers(p, func(key, value []byte) {
			if keyIs(key, "name") {
				if name, ok := jsonString(value); ok {
					names = append(names, name)
					notText = notText || strings.ContainsRune(name, utf8.RuneError)
				}
			}
		})
	}
	if notText {
		// A byte that is not UTF-8 or an escaped lone surrogate: readers differ on it
		// (one U+FFFD per byte here, per ill-formed sequence in Node; JSON.parse keeps the
		// surrogate), so no rule can be matched against the name the upstream runs.
		return nil, false
	}
	if len(names) == 0 {
		// A call without a name is still a call: rules like "*" apply to it.
		names = append(names, "")
	}
	return names, true
}

// jsonMembers calls fn with the raw key (quoted) and raw value of every member of the
// JSON object obj, which must be valid JSON.
func jsonMembers(obj []byte, fn func(key, value []byte)) {
	for i := skipSpace(obj, 1); obj[i] != '}'; {
		keyEnd := skipString(obj, i)
		v := skipSpace(obj, skipSpace(obj, keyEnd)+1) // past the colon
		vEnd := skipValue(obj, v)
		fn(obj[i:keyEnd], obj[v:vEnd])
		if i = skipSpace(obj, vEnd); obj[i] == ',' {
			i = skipSpace(obj, i+1)
		}
	}
}

// keyIs compares a raw JSON key with name as encoding/json matches field names (Unicode
// simple case folding); only a key with escapes costs a decode.
func keyIs(raw []byte, name string) bool {
	if len(raw) >= 2 && raw[0] == '"' && bytes.IndexByte(raw, '\\') < 0 {
		return foldedKeyIs(raw[1:len(raw)-1], name)
	}
	s, ok := jsonString(raw)
	return ok && strings.EqualFold(s, name)
}

// foldedKeyIs is equalFold(key, name), byte by byte while both are ASCII, where Unicode
// folding is ASCII's: most keys are ASCII, and most differ from name in their length or
// first letters. From the first byte of either that is not ASCII on, equalFold decides:
// a non-ASCII letter may fold to an ASCII one (the Kelvin sign to k, ſ to s) in other
// bytes, so a key of another length matches only if it holds one.
func foldedKeyIs(key []byte, name string) bool {
	if len(key) != len(name) && ascii(key) && ascii([]byte(name)) {
		return false
	}
	for i := 0; i < len(key) && i < len(name); i++ {
		c, d := key[i], name[i]
		if c >= utf8.RuneSelf || d >= utf8.RuneSelf {
			return equalFold(key[i:], name[i:])
		}
		if c != d && lowerASCII(c) != lowerASCII(d) {
			return false
		}
	}
	return len(key) == len(name)
}

// lowerASCII is the ASCII letter c in lower case; any other byte as it is.
func lowerASCII(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// equalFold is strings.EqualFold of b and s, without converting b.
func equalFold(b []byte, s string) bool {
	for len(b) > 0 && len(s) > 0 {
		r, n := utf8.DecodeRune(b)
		t, m := utf8.DecodeRuneInString(s)
		b, s = b[n:], s[m:]
		if r == t {
			continue
		}
		if t < r {
			r, t = t, r
		}
		if t < utf8.RuneSelf {
			if 'A' <= r && r <= 'Z' && t == r+'a'-'A' {
				continue
			}
			return false
		}
		f := unicode.SimpleFold(r)
		for f != r && f < t {
			f = unicode.SimpleFold(f)
		}
		if f != t {
			return false
		}
	}
	return len(b) == 0 && len(s) == 0
}

// stringIs tells whether the raw JSON value is the string want.
func stringIs(raw []byte, want string) bool { return rawStringIs(raw, want) }

// jsonString decodes a raw JSON string value; only one with escapes or invalid UTF-8
// costs a decode, which turns each invalid byte into U+FFFD as the upstream's reader does.
func jsonString(raw []byte) (string, bool) {
	if len(raw) < 2 || raw[0] != '"' {
		return "", false
	}
	if plainString(raw) {
		return string(raw[1 : len(raw)-1]), true
	}
	var s string
	return s, json.Unmarshal(raw, &s) == nil
}

// plainString tells whether the raw JSON string reads as its own bytes: no escape and
// valid UTF-8.
func plainString(raw []byte) bool {
	return bytes.IndexByte(raw, '\\') < 0 && utf8.Valid(raw)
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index just past the JSON string starting at b[i] (len(b) when
// it does not end). It jumps from quote to quote with bytes.IndexByte, fast on long
// strings: in valid JSON a quote ends the string unless an odd number of backslashes
// stands before it, the last of which escapes it.
func skipString(b []byte, i int) int {
	open := i
	for i++; i < len(b); i++ {
		q := bytes.IndexByte(b[i:], '"')
		if q < 0 {
			return len(b)
		}
		i += q
		n := 0
		for j := i - 1; j > open && b[j] == '\\'; j-- {
			n++
		}
		if n%2 == 0 {
			return i + 1
		}
	}
	return len(b)
}

// skipValue returns the index just past the JSON value starting at b[i].
func skipValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for ; i < len(b); i++ {
			switch b[i] {
			case '"':
				i = skipString(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
		return i
	default: // number, true, false, null
		for i < len(b) {
			switch b[i] {
			case ',', '}', ']', ' ', '\t', '\r', '\n':
				return i
			}
			i++
		}
		return i
	}
}
