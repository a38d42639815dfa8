package flows

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"path"
	"strings"
)

var toolsCallMethod = []byte(`"tools/call"`)

// requiredScopes reads a JSON-RPC body (one request or a batch) and returns the scopes
// its `tools/call`s need under the configured rules, with the tools called. The body is read at most once, up to
// the bound, and put back for the upstream. A body over the bound is refused (413) rather
// than passed on unchecked; one that cannot be read is a 400.
func (b *Broker) requiredScopes(w http.ResponseWriter, r *http.Request) (need, tools []string, status int) {
	if (len(b.toolScopes) == 0 && len(b.cfg.ProvisioningTools) == 0) || r.Method != http.MethodPost || r.Body == nil || r.Body == http.NoBody {
		return nil, nil, 0
	}
	if ce := r.Header.Values("Content-Encoding"); len(ce) > 0 && !identityEncoding(ce) {
		// The rules are checked on the bytes as sent: a compressed body would pass
		// unread to an upstream (or a middleware in front of it) that decompresses it.
		return nil, nil, http.StatusUnsupportedMediaType
	}
	limit := b.cfg.MaxBodyBytes
	if r.ContentLength > limit {
		return nil, nil, http.StatusRequestEntityTooLarge
	}
	body, status := readBody(w, r, limit)
	if status != 0 {
		return nil, nil, status
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	// Most MCP traffic is not a tool call: skip decoding it. Only a JSON escape could
	// spell the method otherwise (tools\/call), or another encoding of JSON than UTF-8:
	// UTF-16 or UTF-32, which Python's json.loads detects on bytes, spell every ASCII
	// character with a NUL, which valid UTF-8 JSON never holds raw.
	if !bytes.Contains(body, toolsCallMethod) && bytes.IndexByte(body, '\\') < 0 && bytes.IndexByte(body, 0) < 0 {
		return nil, nil, 0
	}
	tools, ok := toolNames(body)
	if !ok {
		// Fail closed: a body this decoder cannot read may still be read by a more lenient
		// upstream (Python's json takes NaN), and then run a tool nobody checked.
		return nil, nil, http.StatusBadRequest
	}
	for _, name := range tools {
		for _, s := range b.scopesForTool(name) {
			need = appendUnique(need, s)
		}
	}
	return need, tools, 0
}

// identityEncoding tells whether the Content-Encoding values name no coding but identity.
func identityEncoding(values []string) bool {
	for _, v := range values {
		for c := range strings.SplitSeq(v, ",") {
			if c = strings.TrimSpace(c); c != "" && !strings.EqualFold(c, "identity") {
				return false
			}
		}
	}
	return true
}

// readBody reads a request body of at most limit bytes: in one allocation when its length
// is declared (the server stops the body there), else growing up to the bound.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, int) {
	if n := r.ContentLength; n >= 0 {
		body := make([]byte, n)
		if _, err := io.ReadFull(r.Body, body); err != nil {
			return nil, http.StatusBadRequest
		}
		return body, 0
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, http.StatusRequestEntityTooLarge
		}
		return nil, http.StatusBadRequest
	}
	return body, 0
}

// toolNames lists the tools called by a JSON-RPC request or batch, read as generously as
// any upstream could read them: a member counts under every spelling some JSON decoder
// matches (keys compared with Unicode case folding, as encoding/json compares them), and
// every duplicate counts, whichever one a decoder keeps. ok is false for a body that is
// not valid JSON, or a batch with an element that is not an object.
//
// The body is validated once by encoding/json, then walked by jsonMembers, which on valid
// JSON only has to find where values end: no decoding, no allocation but the names.
func toolNames(body []byte) (names []string, ok bool) {
	if !json.Valid(body) {
		return nil, false
	}
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
// method members is tools/call; ok is false when msg is not an object.
func callNames(msg []byte) (names []string, ok bool) {
	if msg[0] != '{' {
		return nil, false
	}
	call := false
	jsonMembers(msg, func(key, value []byte) {
		if keyIs(key, "method") && stringIs(value, "tools/call") {
			call = true
		}
	})
	if !call {
		return nil, true
	}
	jsonMembers(msg, func(key, params []byte) {
		if !keyIs(key, "params") || params[0] != '{' {
			return
		}
		jsonMembers(params, func(key, value []byte) {
			if keyIs(key, "name") {
				if name, ok := jsonString(value); ok {
					names = append(names, name)
				}
			}
		})
	})
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

// keyIs compares a raw JSON key with name as encoding/json matches field names.
func keyIs(raw []byte, name string) bool {
	s, ok := jsonString(raw)
	return ok && strings.EqualFold(s, name)
}

// stringIs tells whether the raw JSON value is the string want.
func stringIs(raw []byte, want string) bool {
	s, ok := jsonString(raw)
	return ok && s == want
}

// jsonString decodes a raw JSON string value; only one with escapes costs a decode.
func jsonString(raw []byte) (string, bool) {
	if len(raw) < 2 || raw[0] != '"' {
		return "", false
	}
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw[1 : len(raw)-1]), true
	}
	var s string
	return s, json.Unmarshal(raw, &s) == nil
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index just past the JSON string starting at b[i].
func skipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return i
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

// scopesForTool returns the scopes of the first rule whose pattern matches name.
func (b *Broker) scopesForTool(name string) []string {
	for _, rule := range b.toolScopes {
		if ok, _ := path.Match(rule.Tool, name); ok {
			return rule.Scopes
		}
	}
	return nil
}

func appendUnique(list []string, s string) []string {
	for _, x := range list {
		if x == s {
			return list
		}
	}
	return append(list, s)
}
