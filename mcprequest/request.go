// Package mcprequest reads a request to an MCP endpoint the way the broker checks it
// before an upstream sees it. Inspect is the entry point: it applies the framing rules
// (SECURITY.md S1.10: a body only with POST, spelled so; no method override; one
// application/json in UTF-8; no content coding), reads the body once up to a bound and
// puts it back for the upstream, and returns a Message: whether the body is a batch and
// which tools it calls, read as generously as any JSON decoder could read them (the
// scanner in jsonrpc.go, allocation-light on the hot path), having checked the MCP
// 2026-07-28 headers that mirror the body against it (headers.go). A request it will not
// vouch for gets a Refusal, one of the fixed Err values, with the status and
// description to answer with; the package writes no response and knows nothing of
// scopes or tool rules, which are the caller's policy. SameHeaderName compares header
// names as the upstream frameworks the rules guard against compare them.
package mcprequest

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
)

// Refusal is why a request is refused before the upstream sees it: the HTTP status and
// the OAuth error_description to answer with (error code invalid_request), and a header
// to set on the answer when Header is not empty. A refusal with an RPCCode is the MCP
// transport's own (headers.go): it is answered as a JSON-RPC error response with that
// code and Description as its message, not as an OAuth error. The refusals are the
// package's fixed Err values, compared by identity: refusing allocates nothing.
type Refusal struct {
	Status      int
	Description string
	Header      string
	Value       string
	RPCCode     int
}

func (r *Refusal) Error() string { return r.Description }

// The refusals Inspect returns.
var (
	ErrBodyTooLarge   = &Refusal{Status: http.StatusRequestEntityTooLarge, Description: "request body too large"}
	ErrUnreadable     = &Refusal{Status: http.StatusBadRequest, Description: "request body could not be read"}
	ErrEncoded        = &Refusal{Status: http.StatusUnsupportedMediaType, Description: "request bodies must not be content-encoded", Header: "Accept-Encoding", Value: "identity"} // RFC 7694 §3
	ErrMediaType      = &Refusal{Status: http.StatusUnsupportedMediaType, Description: "request bodies must be application/json in UTF-8"}
	ErrMethod         = &Refusal{Status: http.StatusMethodNotAllowed, Description: "method not allowed", Header: "Allow", Value: "GET, HEAD, POST, DELETE, OPTIONS"}
	ErrBodyNotPost    = &Refusal{Status: http.StatusBadRequest, Description: "a request body is accepted only with POST"}
	ErrMethodOverride = &Refusal{Status: http.StatusBadRequest, Description: "method overrides are not accepted"}
)

// Message is what Inspect read of a request's JSON-RPC body: one request or a batch.
type Message struct {
	// Batch tells whether the body is a JSON-RPC batch (a JSON array).
	Batch bool
	// Tools are the tools the body calls with tools/call, every spelling and duplicate a
	// JSON decoder might read counted; "" stands for a call that names none.
	Tools []string
	// ID is the raw JSON-RPC id (a string or a number) of a single request whose
	// mirrored headers were checked, for the JSON-RPC answer the broker may give it
	// itself (a refusal for those headers, an input request); nil otherwise.
	ID []byte
	// RoundTrip tells whether the body is a single request that names, in its _meta and
	// its MCP-Protocol-Version header alike, a protocol version after 2025-11-25: one of
	// MCP 2026-07-28's multi round-trip requests, where a server asks the client for input
	// by answering an InputRequiredResult, never by a request of its own (input.go).
	RoundTrip bool
	// URLElicitation tells whether such a request's client declares URL-mode
	// elicitation in the request's _meta clientCapabilities.
	URLElicitation bool
	// Retry tells whether such a request carries params.requestState or
	// params.inputResponses, under any spelling: it may retry an InputRequiredResult.
	Retry bool
	// Body is the body as read, which r.Body reads again; nil for a request without one.
	Body []byte
}

// methodOverrides are the headers web frameworks read as the request's real method
// (Rails, Laravel, Symfony, Express's method-override, ASP.NET), compared as
// SameHeaderName compares.
var methodOverrides = []string{"X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"}

// Inspect checks the framing of r and, for a POST, reads its JSON-RPC body of at most
// limit bytes once and puts it back in r.Body for the upstream (a request of another
// method carries no body to read: its Message is empty). Having read the body, it checks
// the MCP request headers that mirror it (headers.go): a mismatch is refused with the
// transport's HeaderMismatch error, and msg.ID names the request it answers. A body over the bound is
// refused (413) rather than passed on unchecked; one that cannot be read, or is not JSON
// this package can read, is a 400: a more lenient upstream might read a tool call in it
// that nobody checked. w is only handed to http.MaxBytesReader, which asks the server to
// close the connection after an oversized body; nothing is written to it.
//
// Whatever else an upstream framework might read as a tool call is refused, never
// forwarded (SECURITY.md S1.10). The caller decides whether the rules apply at all.
func Inspect(w http.ResponseWriter, r *http.Request, limit int64) (Message, *Refusal) {
	if refused := checkFraming(r); refused != nil || r.Method != http.MethodPost {
		return Message{}, refused
	}
	if refused := checkContentHeaders(r.Header); refused != nil {
		return Message{}, refused
	}
	if r.ContentLength > limit {
		return Message{}, ErrBodyTooLarge
	}
	body, refused := readBody(w, r, limit)
	if refused != nil {
		return Message{}, refused
	}
	// net/http's transport knows this pair as a body in memory and sends it with the
	// headers in one write; a reader of another type costs a flush of its own.
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	msg := Message{Batch: isBatch(body), Body: body}
	headers, ok := readMirroredHeaders(r.Header)
	if !ok {
		return msg, ErrHeaderInvalid
	}
	call, mirrored := mayCallToolOrMirror(body, headers.mirror())
	if !call && !mirrored {
		return msg, nil
	}
	if !validJSON(body) {
		// Fail closed: a body this decoder cannot read may still be read by a more lenient
		// upstream (Python's json takes NaN), and then run a tool nobody checked.
		return Message{}, ErrUnreadable
	}
	if mirrored {
		var m mirroredMessage
		if msg.ID, refused = checkMirroredHeaders(headers, body, &m); refused != nil {
			return msg, refused
		}
		if m.versions.n > 0 && headers.modernVersion() {
			msg.RoundTrip = true
			msg.URLElicitation = declaresURLElicitation(&m.capabilities)
			msg.Retry = m.states.n > 0 || m.responses.n > 0
		}
	}
	if !call {
		return msg, nil
	}
	tools, ok := toolNamesOfValid(body)
	if !ok {
		// A batch element that is not an object, or a tool name that is not Unicode text
		// as sent: fail closed as above.
		return Message{}, ErrUnreadable
	}
	msg.Tools = tools
	return msg, nil
}

// mayCallToolOrMirror tells whether body needs decoding to know it calls no tool (call),
// and whether it needs reading for mirrored headers (mirrored: mirror || mayMirror(body)),
// with the scan the two share (escapedOrNotASCII) done once.
//
// Most MCP traffic is not a tool call: it skips the decoding. Only a JSON escape could
// spell the method otherwise (tools\/call), or another encoding of JSON than UTF-8: UTF-16
// or UTF-32, which Python's json.loads detects on bytes, spell every ASCII character with
// a NUL, which valid UTF-8 JSON never holds raw. A byte >= 0x80 is decoded too, so that
// one outside a string (a lenient decoder's whitespace or letter) fails validation.
func mayCallToolOrMirror(body []byte, mirror bool) (call, mirrored bool) {
	unusual := escapedOrNotASCII(body)
	call = unusual || bytes.Contains(body, toolsCallMethod) || bytes.IndexByte(body, 0) >= 0
	mirrored = mirror || unusual || namesProtocolVersion(body)
	return call, mirrored
}

// checkFraming refuses a request whose method a framework might read as another: a
// method override in a header or the query, a method other than POST spelled any way
// but the canonical upper case, and a body with GET, HEAD, OPTIONS or DELETE.
func checkFraming(r *http.Request) *Refusal {
	for k := range r.Header {
		for _, o := range methodOverrides {
			if SameHeaderName(k, o) {
				return ErrMethodOverride
			}
		}
	}
	if r.URL.RawQuery != "" {
		for k := range r.URL.Query() {
			if strings.EqualFold(k, "_method") {
				return ErrMethodOverride
			}
		}
	}
	switch r.Method {
	case http.MethodPost:
		return nil
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodDelete:
		if r.ContentLength > 0 || (r.ContentLength < 0 && holdsBody(r.Body)) {
			return ErrBodyNotPost
		}
		return nil
	}
	return ErrMethod
}

// checkContentHeaders refuses a POST body the check would not read as its upstream may:
// a content coding, or a media type other than one application/json in UTF-8.
func checkContentHeaders(h http.Header) *Refusal {
	if ce := h["Content-Encoding"]; len(ce) > 0 && !identityEncoding(ce) {
		// The rules are checked on the bytes as sent: a compressed body would pass
		// unread to an upstream (or a middleware in front of it) that decompresses it.
		return ErrEncoded
	}
	if ct := h["Content-Type"]; len(ct) != 1 || !jsonUTF8(ct[0]) {
		// Node's Buffer#toString('ascii') drops the high bit, iconv-lite decodes UTF-7:
		// a body declared in another charset may read as a call the check never saw.
		return ErrMediaType
	}
	return nil
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
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, *Refusal) {
	if n := r.ContentLength; n >= 0 {
		body := make([]byte, n)
		if _, err := io.ReadFull(r.Body, body); err != nil {
			return nil, ErrUnreadable
		}
		return body, nil
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, ErrBodyTooLarge
		}
		return nil, ErrUnreadable
	}
	return body, nil
}

// SameHeaderName tells whether two header names are one to an upstream that folds case
// and reads '_' as '-', as CGI and WSGI do (HTTP_X_REMOTE_USER).
func SameHeaderName(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		if HeaderNameFold(a[i]) != HeaderNameFold(b[i]) {
			return false
		}
	}
	return true
}

// HeaderNameFold is c as SameHeaderName compares it: ASCII letters in lower case, '_'
// as '-'.
func HeaderNameFold(c byte) byte {
	switch {
	case c == '_':
		return '-'
	case 'A' <= c && c <= 'Z':
		return c + 'a' - 'A'
	}
	return c
}
