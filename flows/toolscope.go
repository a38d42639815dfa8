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

// requestRefusal is why a request to the MCP endpoint is refused before the upstream
// sees it. The refusals are fixed values: refusing allocates nothing.
type requestRefusal struct {
	status      int
	description string
	header      string // a header to set, with value
	value       string
}

func (e *requestRefusal) write(w http.ResponseWriter) {
	if e.header != "" {
		w.Header().Set(e.header, e.value)
	}
	writeError(w, e.status, "invalid_request", e.description)
}

var (
	refuseBodyTooLarge   = &requestRefusal{status: http.StatusRequestEntityTooLarge, description: "request body too large"}
	refuseUnreadable     = &requestRefusal{status: http.StatusBadRequest, description: "request body could not be read"}
	refuseEncoded        = &requestRefusal{status: http.StatusUnsupportedMediaType, description: "request bodies must not be content-encoded", header: "Accept-Encoding", value: "identity"} // RFC 7694 §3
	refuseMediaType      = &requestRefusal{status: http.StatusUnsupportedMediaType, description: "request bodies must be application/json in UTF-8"}
	refuseMethod         = &requestRefusal{status: http.StatusMethodNotAllowed, description: "method not allowed", header: "Allow", value: "GET, HEAD, POST, DELETE, OPTIONS"}
	refuseBodyNotPost    = &requestRefusal{status: http.StatusBadRequest, description: "a request body is accepted only with POST"}
	refuseMethodOverride = &requestRefusal{status: http.StatusBadRequest, description: "method overrides are not accepted"}
)

// methodOverrides are the headers web frameworks read as the request's real method
// (Rails, Laravel, Symfony, Express's method-override, ASP.NET), compared as
// sameHeaderName compares.
var methodOverrides = []string{"X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"}

// requiredScopes reads a JSON-RPC body (one request or a batch) and returns the scopes
// its `tools/call`s need under the configured rules, with the tools called. The body is read at most once, up to
// the bound, and put back for the upstream. A body over the bound is refused (413) rather
// than passed on unchecked; one that cannot be read is a 400.
//
// While any rule applies, the request must be framed the one way the check reads it
// (SECURITY.md, tool scopes dodged by framing): a body only with POST, spelled so;
// no method override; application/json in UTF-8; no content coding. Whatever else an
// upstream framework might read as a tool call is refused, never forwarded.
func (b *Broker) requiredScopes(w http.ResponseWriter, r *http.Request) (need, tools []string, refused *requestRefusal) {
	if len(b.toolScopes) == 0 && len(b.cfg.ProvisioningTools) == 0 {
		return nil, nil, nil
	}
	if refused := checkFraming(r); refused != nil || r.Method != http.MethodPost {
		return nil, nil, refused
	}
	if ce := r.Header.Values("Content-Encoding"); len(ce) > 0 && !identityEncoding(ce) {
		// The rules are checked on the bytes as sent: a compressed body would pass
		// unread to an upstream (or a middleware in front of it) that decompresses it.
		return nil, nil, refuseEncoded
	}
	if ct := r.Header["Content-Type"]; len(ct) != 1 || !jsonUTF8(ct[0]) {
		// Node's Buffer#toString('ascii') drops the high bit, iconv-lite decodes UTF-7:
		// a body declared in another charset may read as a call the check never saw.
		return nil, nil, refuseMediaType
	}
	limit := b.cfg.MaxBodyBytes
	if r.ContentLength > limit {
		return nil, nil, refuseBodyTooLarge
	}
	body, status := readBody(w, r, limit)
	switch status {
	case http.StatusRequestEntityTooLarge:
		return nil, nil, refuseBodyTooLarge
	case http.StatusBadRequest:
		return nil, nil, refuseUnreadable
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	// Most MCP traffic is not a tool call: skip decoding it. Only a JSON escape could
	// spell the method otherwise (tools\/call), or another encoding of JSON than UTF-8:
	// UTF-16 or UTF-32, which Python's json.loads detects on bytes, spell every ASCII
	// character with a NUL, which valid UTF-8 JSON never holds raw. A byte >= 0x80 is
	// decoded too, so that one outside a string (a lenient decoder's whitespace or
	// letter) fails validation.
	if !bytes.Contains(body, toolsCallMethod) && bytes.IndexByte(body, '\\') < 0 && bytes.IndexByte(body, 0) < 0 && ascii(body) {
		return nil, nil, nil
	}
	tools, ok := toolNames(body)
	if !ok {
		// Fail closed: a body this decoder cannot read may still be read by a more lenient
		// upstream (Python's json takes NaN), and then run a tool nobody checked.
		return nil, nil, refuseUnreadable
	}
	for _, name := range tools {
		for _, s := range b.scopesForTool(name) {
			need = appendUnique(need, s)
		}
	}
	return need, tools, nil
}

// checkFraming refuses a request whose method a framework might read as another: a
// method override in a header or the query, a method other than POST spelled any way
// but the canonical upper case, and a body with GET, HEAD, OPTIONS or DELETE.
func checkFraming(r *http.Request) *requestRefusal {
	for k := range r.Header {
		for _, o := range methodOverrides {
			if len(k) == len(o) && sameHeaderName(k, o) {
				return refuseMethodOverride
			}
		}
	}
	if r.URL.RawQuery != "" {
		for k := range r.URL.Query() {
			if strings.EqualFold(k, "_method") {
				return refuseMethodOverride
			}
		}
	}
	switch r.Method {
	case http.MethodPost:
		return nil
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodDelete:
		if r.ContentLength > 0 || (r.ContentLength < 0 && holdsBody(r.Body)) {
			return refuseBodyNotPost
		}
		return nil
	}
	return refuseMethod
}

// holdsBody tells whether a body of unknown length holds a byte. HTTP/3 gives every
// request such a body, HTTP/2 one whose headers did not end the stream: a GET stream or a
// DELETE sent so ends at once and must pass. An error reading it counts as a body.
func holdsBody(body io.ReadCloser) bool {
	if body == nil || body == http.NoBody {
		return false
	}
	var one [1]byte
	n, err := io.ReadFull(body, one[:])
	return n > 0 || !errors.Is(err, io.EOF)
}

// jsonUTF8 tells whether a Content-Type names application/json with no charset other
// than UTF-8. Fails closed: an unreadable parameter (a quoted ';', RFC 2231's charset*)
// refuses the type.
func jsonUTF8(ct string) bool {
	mt, params, _ := strings.Cut(ct, ";")
	if !strings.EqualFold(strings.TrimSpace(mt), "application/json") {
		return false
	}
	for params != "" {
		var p string
		p, params, _ = strings.Cut(params, ";")
		name, value, _ := strings.Cut(p, "=")
		name = strings.TrimSpace(name)
		if len(name) < len("charset") || !strings.EqualFold(name[:len("charset")], "charset") {
			continue
		}
		value = strings.TrimSpace(value)
		if len(value) >= 2 && value[0] == '"' && value[len(value)-1] == '"' {
			value = value[1 : len(value)-1]
		}
		if !strings.EqualFold(name, "charset") || !strings.EqualFold(value, "utf-8") {
			return false
		}
	}
	return true
}

// ascii tells whether b holds no byte >= 0x80.
func ascii(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
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
