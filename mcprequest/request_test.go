package mcprequest

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
)

const toolCall = `{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_write"}}`

// TestInspect: each framing rule refuses with its own fixed value, and a request framed
// the one way the check reads it passes with the tools it calls (SECURITY.md S1.10).
func TestInspect(t *testing.T) {
	const appJSON = "application/json"
	for _, tc := range []struct {
		name       string
		method     string
		query      string
		header     map[string][]string
		body       string
		unknownLen bool // send the body with ContentLength -1, as HTTP/2 and HTTP/3 may
		want       *Refusal
		wantTools  []string
		wantBatch  bool
	}{
		{"PUT is not POST", http.MethodPut, "", map[string][]string{"Content-Type": {appJSON}}, toolCall, false, ErrMethod, nil, false},
		{"lower-case post is not POST", "post", "", map[string][]string{"Content-Type": {appJSON}}, toolCall, false, ErrMethod, nil, false},
		{"GET with a body", http.MethodGet, "", nil, toolCall, false, ErrBodyNotPost, nil, false},
		{"X-HTTP-Method-Override", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}, "X-Http-Method-Override": {"PUT"}}, toolCall, false, ErrMethodOverride, nil, false},
		{"X_Method_Override with underscores", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}, "X_method_override": {"PUT"}}, toolCall, false, ErrMethodOverride, nil, false},
		{"_method in the query, any case", http.MethodPost, "_METHOD=PUT", map[string][]string{"Content-Type": {appJSON}}, toolCall, false, ErrMethodOverride, nil, false},
		{"gzip content coding", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}, "Content-Encoding": {"gzip"}}, toolCall, false, ErrEncoded, nil, false},
		{"a coding after identity", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}, "Content-Encoding": {"identity, br"}}, toolCall, false, ErrEncoded, nil, false},
		{"no content type", http.MethodPost, "", nil, toolCall, false, ErrMediaType, nil, false},
		{"two content types", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON, appJSON}}, toolCall, false, ErrMediaType, nil, false},
		{"charset utf-7", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON + "; charset=utf-7"}}, toolCall, false, ErrMediaType, nil, false},
		{"a declared length over the bound", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}}, strings.Repeat(" ", 200) + "{}", false, ErrBodyTooLarge, nil, false},
		{"an unknown length over the bound", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}}, strings.Repeat(" ", 200) + "{}", true, ErrBodyTooLarge, nil, false},
		{"NaN in a tool call", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}}, `{"id":NaN,"method":"tools/call"}`, false, ErrUnreadable, nil, false},
		{"a latin-1 byte outside strings", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}}, "{\"method\"\xa0:\"ping\"}", false, ErrUnreadable, nil, false},
		{"a NUL, as UTF-16 spells ASCII", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}}, "{\x00}", false, ErrUnreadable, nil, false},

		{"a tool call passes with its tool", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}}, toolCall, false, nil, []string{"notes_write"}, false},
		{"a tool call of unknown length", http.MethodPost, "", map[string][]string{"Content-Type": {`Application/JSON; charset="UTF-8"`}}, toolCall, true, nil, []string{"notes_write"}, false},
		{"a batch", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}}, " [" + toolCall + `,{"method":"ping"}]`, false, nil, []string{"notes_write"}, true},
		{"not a tool call is not decoded", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}}, `{"method":"tools/list",}`, false, nil, nil, false},
		{"identity coding", http.MethodPost, "", map[string][]string{"Content-Type": {appJSON}, "Content-Encoding": {"identity"}}, toolCall, false, nil, []string{"notes_write"}, false},
		{"GET without a body", http.MethodGet, "", nil, "", false, nil, nil, false},
		{"DELETE with an empty body of unknown length", http.MethodDelete, "", nil, "", true, nil, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(tc.method, "https://mcp.example.test/mcp", strings.NewReader(tc.body))
			r.URL.RawQuery = tc.query
			for k, v := range tc.header {
				r.Header[k] = v
			}
			if tc.unknownLen {
				r.ContentLength = -1
				r.Body = io.NopCloser(strings.NewReader(tc.body))
			}
			msg, refused := Inspect(httptest.NewRecorder(), r, 128)
			if refused != tc.want {
				t.Fatalf("refused %v, want %v", refused, tc.want)
			}
			if !slices.Equal(msg.Tools, tc.wantTools) || msg.Batch != tc.wantBatch {
				t.Errorf("message %+v, want tools %q, batch %v", msg, tc.wantTools, tc.wantBatch)
			}
			if refused == nil && tc.method == http.MethodPost {
				// The body is put back whole for the upstream.
				if got, _ := io.ReadAll(r.Body); string(got) != tc.body || r.ContentLength != int64(len(tc.body)) {
					t.Errorf("upstream would read %q (length %d), want %q", got, r.ContentLength, tc.body)
				}
			}
		})
	}
}

// A body that fails while being read is refused as unreadable, never passed on half-read.
func TestInspectBrokenBody(t *testing.T) {
	for _, unknownLen := range []bool{false, true} {
		r := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", nil)
		r.Header.Set("Content-Type", "application/json")
		r.Body = io.NopCloser(io.MultiReader(strings.NewReader(`{"method":`), errReader{}))
		r.ContentLength = 40
		if unknownLen {
			r.ContentLength = -1
		}
		if _, refused := Inspect(httptest.NewRecorder(), r, 1<<10); refused != ErrUnreadable {
			t.Errorf("unknown length %v: refused %v, want %v", unknownLen, refused, ErrUnreadable)
		}
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("connection reset") }

// TestBodilessRequestOfUnknownLength: HTTP/3 (quic-go, which Caddy serves) and HTTP/2
// without END_STREAM on the headers give a request a body of unknown length even when
// none follows. A GET stream or DELETE sent so is no body on GET and must pass; one that
// does carry a body is refused as before.
func TestBodilessRequestOfUnknownLength(t *testing.T) {
	for _, method := range []string{http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodDelete} {
		r := httptest.NewRequest(method, "https://mcp.example.test/mcp", nil)
		r.ContentLength, r.Body = -1, io.NopCloser(strings.NewReader(""))
		if refused := checkFraming(r); refused != nil {
			t.Errorf("%s with an empty body of unknown length: refused %q", method, refused.Description)
		}
		r.ContentLength, r.Body = -1, io.NopCloser(strings.NewReader(`{"jsonrpc":"2.0","id":2,"method":"tools/call"}`))
		if refused := checkFraming(r); refused != ErrBodyNotPost {
			t.Errorf("%s with a body of unknown length: refused %v, want %q", method, refused, ErrBodyNotPost.Description)
		}
	}
}

func TestJSONUTF8(t *testing.T) {
	for _, tc := range []struct {
		contentType string
		want        bool
	}{
		{"application/json", true},
		{"Application/JSON", true},
		{" application/json ; charset=utf-8", true},
		{`application/json; charset="UTF-8"`, true},
		{"application/json; boundary=x", true},
		{"application/json; charset=utf-7", false},
		{"application/json; charset=utf-8; charset=utf-7", false},
		{"application/json; charset*=utf-8''x", false},
		{"application/json; charsetx=utf-8", false},
		{"application/jsonx", false},
		{"text/plain", false},
		{"", false},
	} {
		if got := jsonUTF8(tc.contentType); got != tc.want {
			t.Errorf("jsonUTF8(%q) = %v, want %v", tc.contentType, got, tc.want)
		}
	}
}

func TestSameHeaderName(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"X-Remote-User", "x-remote-user", true},
		{"X_REMOTE_USER", "X-Remote-User", true},
		{"X-Remote-User", "X-Remote-Users", false},
		{"X-Remote-Usex", "X-Remote-User", false},
		{"", "", true},
	} {
		if got := SameHeaderName(tc.a, tc.b); got != tc.want {
			t.Errorf("SameHeaderName(%q, %q) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

// Refusing allocates nothing: the refusals are fixed values.
func TestRefusalAllocatesNothing(t *testing.T) {
	r := httptest.NewRequest(http.MethodPut, "https://mcp.example.test/mcp", nil)
	w := httptest.NewRecorder()
	if n := testing.AllocsPerRun(100, func() { _, _ = Inspect(w, r, 64) }); n != 0 {
		t.Errorf("%v allocations per refusal", n)
	}
}
