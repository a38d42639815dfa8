package mcprequest

import (
	"bytes"
	"encoding/base64"
	"net/http"
	"strings"
	"unicode/utf8"
)

// The request headers of the Streamable HTTP transport (MCP 2026-07-28, "Request
// Metadata"): they mirror the body so that intermediaries can route without reading it,
// and any party that reads the body must refuse a request whose headers and body
// disagree, lest a router and the server act on different requests. The broker reads
// the body only when a rule needs it (Inspect); when it does, it checks the mirrored
// headers against the body here and never decides anything on a header alone. The
// Mcp-Param-{Name} headers mirror tool arguments only the tool list names: the broker
// does not recognise them and forwards them untouched, as the transport requires of an
// intermediary.
const (
	HeaderProtocolVersion = "MCP-Protocol-Version"
	HeaderMethod          = "Mcp-Method"
	HeaderName            = "Mcp-Name"
	// HeaderParamPrefix starts the Mcp-Param-{Name} headers.
	HeaderParamPrefix = "Mcp-Param-"
)

// The JSON-RPC error codes of the transport's refusals (MCP 2026-07-28 schema).
const (
	CodeInvalidRequest = -32600
	CodeHeaderMismatch = -32020
)

// The refusals of a request whose mirrored headers disagree with its body: 400 with a
// JSON-RPC HeaderMismatch error, as the transport's Server Validation prescribes.
var (
	ErrVersionHeaderMissing = headerMismatch("Header mismatch: the MCP-Protocol-Version header is required with a body that names its protocol version")
	ErrVersionMismatch      = headerMismatch("Header mismatch: the MCP-Protocol-Version header does not match the body's io.modelcontextprotocol/protocolVersion")
	ErrMethodHeaderMissing  = headerMismatch("Header mismatch: the Mcp-Method header is required")
	ErrMethodMismatch       = headerMismatch("Header mismatch: the Mcp-Method header does not match the body's method")
	ErrNameHeaderMissing    = headerMismatch("Header mismatch: the Mcp-Name header is required for tools/call, resources/read and prompts/get")
	ErrNameMismatch         = headerMismatch("Header mismatch: the Mcp-Name header does not match the body's params.name or params.uri")
	ErrHeaderInvalid        = headerMismatch("Header mismatch: an MCP request header is repeated, empty, malformed or holds invalid characters")
	// ErrBatchWithHeaders refuses a batch that claims 2026-07-28 or carries mirrored
	// headers: that revision sends one message per POST, and one Mcp-Method cannot
	// mirror several.
	ErrBatchWithHeaders = &Refusal{Status: http.StatusBadRequest, RPCCode: CodeInvalidRequest,
		Description: "Invalid Request: from protocol version 2026-07-28 a POST carries one JSON-RPC message, which its headers mirror"}
)

func headerMismatch(description string) *Refusal {
	return &Refusal{Status: http.StatusBadRequest, RPCCode: CodeHeaderMismatch, Description: description}
}

// legacyVersions are the protocol versions before the mirrored headers: a request that
// names one in MCP-Protocol-Version and none in its body is served as it always was.
var legacyVersions = []string{"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"}

// The _meta keys of a request's protocol version and of the capabilities its client
// declares for it.
const (
	metaProtocolVersion    = "io.modelcontextprotocol/protocolVersion"
	metaClientCapabilities = "io.modelcontextprotocol/clientCapabilities"
)

// Base64 sentinel form of a header value (MCP 2026-07-28, "Value Encoding"): exactly
// these lower-case markers around standard Base64 of the UTF-8 value.
const (
	base64Prefix = "=?base64?"
	base64Suffix = "?="
)

// mirroredHeaders are the values of the three mirrored headers, each in every spelling
// an upstream might read as it (SameHeaderName). ok is false when one is repeated,
// empty, or holds a character a header value must not.
type mirroredHeaders struct {
	version, method, name string
	hasVersion, hasMethod bool
	hasName               bool
}

// readMirroredHeaders reads the three headers of h; it allocates nothing.
func readMirroredHeaders(h http.Header) (m mirroredHeaders, ok bool) {
	for k, vs := range h {
		var dst *string
		var has *bool
		switch {
		case len(k) == len(HeaderProtocolVersion) && SameHeaderName(k, HeaderProtocolVersion):
			dst, has = &m.version, &m.hasVersion
		case len(k) == len(HeaderMethod) && SameHeaderName(k, HeaderMethod):
			dst, has = &m.method, &m.hasMethod
		case len(k) == len(HeaderName) && SameHeaderName(k, HeaderName):
			dst, has = &m.name, &m.hasName
		default:
			continue
		}
		if *has || len(vs) > 1 || len(vs) == 1 && vs[0] == "" && dst != &m.version {
			return m, false // repeated (under two spellings, or twice), or an empty mirror
		}
		if len(vs) == 1 && vs[0] != "" { // an empty MCP-Protocol-Version counts as none, as before
			*dst, *has = vs[0], true
		}
	}
	if m.hasVersion && !visibleASCII(m.version, false) || m.hasMethod && !visibleASCII(m.method, false) ||
		m.hasName && !visibleASCII(m.name, true) {
		return m, false
	}
	return m, true
}

// mirror tells whether the headers mirror a body: Mcp-Method or Mcp-Name is present, or
// MCP-Protocol-Version names a revision that mirrors. A legacy MCP-Protocol-Version
// alone mirrors nothing.
func (m *mirroredHeaders) mirror() bool { return m.hasMethod || m.hasName || m.modernVersion() }

// modernVersion tells whether the MCP-Protocol-Version header names a revision that
// mirrors its body in headers: any but the legacy ones.
func (m *mirroredHeaders) modernVersion() bool {
	if !m.hasVersion {
		return false
	}
	for _, v := range legacyVersions {
		if m.version == v {
			return false
		}
	}
	return true
}

// visibleASCII tells whether s holds only visible ASCII (RFC 9110 §5.5, without
// obs-text), and with space, horizontal tab too.
func visibleASCII(s string, space bool) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x21 || c > 0x7e {
			if space && (c == ' ' || c == '\t') {
				continue
			}
			return false
		}
	}
	return true
}

// decodeHeaderValue returns the value a header carries: the decoded Base64 sentinel
// form, or the value itself. ok is false for a sentinel whose Base64 is malformed or
// whose bytes are not UTF-8, as the spec requires of what it encodes.
func decodeHeaderValue(v string) (string, bool) {
	if len(v) < len(base64Prefix)+len(base64Suffix) || v[:len(base64Prefix)] != base64Prefix || v[len(v)-len(base64Suffix):] != base64Suffix {
		return v, true
	}
	enc := v[len(base64Prefix) : len(v)-len(base64Suffix)]
	if strings.ContainsAny(enc, "\r\n") {
		return "", false // which the decoder would skip
	}
	b, err := base64.StdEncoding.Strict().DecodeString(enc)
	if err != nil || !utf8.Valid(b) {
		return "", false
	}
	return string(b), true
}

// mirroredMessage is what a single JSON-RPC message says that its headers mirror, each
// member under every spelling and duplicate a JSON decoder might read (see toolNames),
// as raw JSON values: compared without decoding unless escaped, so that checking the
// headers allocates little.
type mirroredMessage struct {
	id       []byte // the raw id, nil when the message has none
	methods  rawValues
	names    rawValues // params.name
	uris     rawValues // params.uri
	versions rawValues // params._meta["io.modelcontextprotocol/protocolVersion"]
	// What the request says of the multi round-trip pattern (input.go).
	states       rawValues // params.requestState
	responses    rawValues // params.inputResponses
	capabilities rawValues // params._meta["io.modelcontextprotocol/clientCapabilities"]
}

// rawValues are the raw JSON values of one member; the first two are kept in place.
type rawValues struct {
	inline [2][]byte
	more   [][]byte
	n      int
}

func (v *rawValues) add(raw []byte) {
	if v.n < len(v.inline) {
		v.inline[v.n] = raw
	} else {
		v.more = append(v.more, raw)
	}
	v.n++
}

func (v *rawValues) at(i int) []byte {
	if i < len(v.inline) {
		return v.inline[i]
	}
	return v.more[i-len(v.inline)]
}

// allAre tells whether there is at least one value and every one is the JSON string
// want. A value that is not a string matches nothing.
func (v *rawValues) allAre(want string) bool {
	for i := 0; i < v.n; i++ {
		if !rawStringIs(v.at(i), want) {
			return false
		}
	}
	return v.n > 0
}

// rawStringIs tells whether the raw JSON value is the string want; only one with escapes
// costs a decode.
func rawStringIs(raw []byte, want string) bool {
	if len(raw) >= 2 && raw[0] == '"' && plainString(raw) {
		return string(raw[1:len(raw)-1]) == want
	}
	s, ok := jsonString(raw)
	return ok && s == want
}

// readMirroredMessage reads msg, one valid JSON object, into m.
func readMirroredMessage(msg []byte, m *mirroredMessage) {
	jsonMembers(msg, func(key, value []byte) {
		switch {
		case keyIs(key, "id"):
			if m.id == nil {
				m.id = value
			}
		case keyIs(key, "method"):
			m.methods.add(value)
		case keyIs(key, "params") && value[0] == '{':
			jsonMembers(value, func(key, value []byte) {
				switch {
				case keyIs(key, "name"):
					m.names.add(value)
				case keyIs(key, "uri"):
					m.uris.add(value)
				case keyIs(key, "requestState"):
					m.states.add(value)
				case keyIs(key, "inputResponses"):
					m.responses.add(value)
				case keyIs(key, "_meta") && value[0] == '{':
					jsonMembers(value, func(key, value []byte) {
						switch {
						case keyIs(key, metaProtocolVersion):
							m.versions.add(value)
						case keyIs(key, metaClientCapabilities):
							m.capabilities.add(value)
						}
					})
				}
			})
		}
	})
}

// namedMethod tells whether a method's Mcp-Name mirrors params.name (uri false) or
// params.uri (uri true); named is false for a method whose body names nothing.
func namedMethod(method string) (named, uri bool) {
	switch method {
	case "tools/call", "prompts/get":
		return true, false
	case "resources/read":
		return true, true
	}
	return false, false
}

// mayMirror tells whether a body without mirrored headers still needs reading for them:
// it may name its protocol version in _meta. A key may be spelled with escapes
// ("\u0070rotocolVersion") or with letters encoding/json folds to ASCII (ſ, the Kelvin
// sign), which the byte scan cannot see, so such a body is read too.
func mayMirror(body []byte) bool {
	return escapedOrNotASCII(body) || namesProtocolVersion(body)
}

// escapedOrNotASCII tells whether body holds a JSON escape or a byte outside ASCII: either
// may spell a key or a value the byte scans cannot see.
func escapedOrNotASCII(body []byte) bool {
	return bytes.IndexByte(body, '\\') >= 0 || !ascii(body)
}

// namesProtocolVersion tells whether body holds "protocolversion" in ASCII letters of
// any case, as a key the reader would match.
func namesProtocolVersion(body []byte) bool {
	const key = "protocolversion"
	// The next 'p' and the next 'P' are each found with bytes.IndexByte, faster than
	// bytes.IndexAny's byte-wise scan on long bodies.
	lower, upper := indexFrom(body, 0, 'p'), indexFrom(body, 0, 'P')
	for {
		i := min(lower, upper)
		if i < 0 {
			i = max(lower, upper)
		}
		if i < 0 || i+len(key) > len(body) {
			return false
		}
		if bytes.EqualFold(body[i:i+len(key)], []byte(key)) {
			return true
		}
		if i == lower {
			lower = indexFrom(body, i+1, 'p')
		} else {
			upper = indexFrom(body, i+1, 'P')
		}
	}
}

// indexFrom is the index of the first c in b at or after from, or -1.
func indexFrom(b []byte, from int, c byte) int {
	if j := bytes.IndexByte(b[from:], c); j >= 0 {
		return from + j
	}
	return -1
}

// checkMirroredHeaders checks the mirrored headers of a request against its body, valid
// JSON, and returns the request's raw id for the answer to a refusal; m is what it read
// of a single message. The rules
// (MCP 2026-07-28, "Server Validation"):
//
//   - a body naming its protocol version needs MCP-Protocol-Version, equal to it; a
//     header naming a revision after 2025-11-25 needs the body to name the same;
//   - on such a request (one with an id), Mcp-Method is required, and Mcp-Name for
//     tools/call, resources/read and prompts/get;
//   - a present Mcp-Method or Mcp-Name equals the body's method, params.name or
//     params.uri (Mcp-Name after decoding its Base64 sentinel form) on any revision, and
//     an Mcp-Name on a method that names nothing matches nothing;
//   - a repeated or empty header, or one with characters a header value must not hold,
//     is refused;
//   - a batch claiming 2026-07-28 or carrying mirrored headers is refused.
//
// A request with none of the headers and no version in its body is a legacy one: it
// passes as before.
func checkMirroredHeaders(h mirroredHeaders, body []byte, m *mirroredMessage) (id []byte, refused *Refusal) {
	if isBatch(body) {
		if h.mirror() || mayMirror(body) && batchNamesVersion(body) {
			return nil, ErrBatchWithHeaders
		}
		return nil, nil
	}
	// a body that is not an object mirrors nothing
	if i := skipSpace(body, 0); body[i] == '{' {
		readMirroredMessage(body[i:], m)
	}
	if m.id != nil && (m.id[0] == '"' || m.id[0] == '-' || '0' <= m.id[0] && m.id[0] <= '9') {
		id = m.id
	}
	modern := m.versions.n > 0 || h.modernVersion()
	switch {
	case modern && !h.hasVersion:
		return id, ErrVersionHeaderMissing
	case modern && !m.versions.allAre(h.version):
		return id, ErrVersionMismatch
	}
	request := m.id != nil
	method := ""
	if m.methods.n > 0 {
		method, _ = jsonString(m.methods.at(0))
	}
	switch {
	case h.hasMethod && !m.methods.allAre(h.method):
		return id, ErrMethodMismatch
	case !h.hasMethod && modern && request:
		return id, ErrMethodHeaderMissing
	}
	named, uri := namedMethod(method)
	if !h.hasName {
		if named && modern && request {
			return id, ErrNameHeaderMissing
		}
		return id, nil
	}
	name, ok := decodeHeaderValue(h.name)
	switch {
	case !ok:
		return id, ErrHeaderInvalid
	case !named || !m.methods.allAre(method):
		return id, ErrNameMismatch
	case uri && !m.uris.allAre(name), !uri && !m.names.allAre(name):
		return id, ErrNameMismatch
	}
	return id, nil
}

// batchNamesVersion tells whether an element of a batch (valid JSON) names its protocol
// version in _meta.
func batchNamesVersion(body []byte) bool {
	i := skipSpace(body, 0)
	for i = skipSpace(body, i+1); i < len(body) && body[i] != ']'; {
		end := skipValue(body, i)
		if body[i] == '{' {
			var m mirroredMessage
			if readMirroredMessage(body[i:end], &m); m.versions.n > 0 {
				return true
			}
		}
		if i = skipSpace(body, end); i < len(body) && body[i] == ',' {
			i = skipSpace(body, i+1)
		}
	}
	return false
}
