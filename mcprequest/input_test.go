package mcprequest

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// modernRequest is a 2026-07-28 tools/call of get_weather with params extra and _meta
// capabilities caps, and the headers that mirror it.
func modernRequest(extra, caps string) (http.Header, string) {
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Oslo"},` + extra +
		`"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":` + caps + `}}}`
	return http.Header{"Content-Type": {"application/json"}, "Mcp-Protocol-Version": {"2026-07-28"}, "Mcp-Method": {"tools/call"}, "Mcp-Name": {"get_weather"}}, body
}

func TestInspectRoundTrip(t *testing.T) {
	legacy := http.Header{"Content-Type": {"application/json"}, "Mcp-Protocol-Version": {"2025-11-25"}}
	for _, tc := range []struct {
		name                  string
		header                http.Header
		body                  string
		roundTrip, url, retry bool
	}{
		{"a 2025-11-25 request speaks no round trip", legacy, `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","requestState":"x"}}`, false, false, false},
		{"a 2026-07-28 request without elicitation", nil, "", true, false, false},
		{"elicitation without modes is form only", nil, `{"elicitation":{}}`, true, false, false},
		{"form mode only", nil, `{"elicitation":{"form":{}}}`, true, false, false},
		{"URL mode declared", nil, `{"elicitation":{"form":{},"url":{}}}`, true, true, false},
		{"URL mode spelled otherwise, as a decoder reads it", nil, `{"Elicitation":{"URL":{}}}`, true, true, false},
		{"URL mode that is not an object", nil, `{"elicitation":{"url":true}}`, true, false, false},
		{"a retry with requestState", nil, `{}|"requestState":"s",`, true, false, true},
		{"a retry with inputResponses", nil, `{}|"inputResponses":{"a":{"action":"accept"}},`, true, false, true},
		{"a retry with RequestState", nil, `{}|"RequestState":"s",`, true, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			header, body := tc.header, tc.body
			if header == nil {
				caps, extra, _ := strings.Cut(tc.body, "|")
				if caps == "" {
					caps = "{}"
				}
				header, body = modernRequest(extra, caps)
			}
			r := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", strings.NewReader(body))
			r.Header = header
			msg, refused := Inspect(httptest.NewRecorder(), r, 4096)
			if refused != nil {
				t.Fatalf("refused: %v", refused)
			}
			if msg.RoundTrip != tc.roundTrip || msg.URLElicitation != tc.url || msg.Retry != tc.retry {
				t.Errorf("round trip %v, URL elicitation %v, retry %v; want %v, %v, %v", msg.RoundTrip, msg.URLElicitation, msg.Retry, tc.roundTrip, tc.url, tc.retry)
			}
			if string(msg.Body) != body {
				t.Errorf("body %q", msg.Body)
			}
		})
	}
}

func TestReadRetry(t *testing.T) {
	_, body := modernRequest(`"requestState":"mine","RequestState":"theirs","inputResponses":{"a":{"action":"accept"},"b\u0021":{"action":"decline"}},`, "{}")
	in := ReadRetry([]byte(body))
	if len(in.States) != 2 || in.States[0] != "mine" || in.States[1] != "theirs" {
		t.Errorf("states %q", in.States)
	}
	if len(in.Responses) != 2 || string(in.Responses["a"]) != `{"action":"accept"}` || string(in.Responses["b!"]) != `{"action":"decline"}` {
		t.Errorf("responses %v", in.Responses)
	}
}

func TestRequestDigest(t *testing.T) {
	_, first := modernRequest("", `{"elicitation":{"url":{}}}`)
	d, ok := RequestDigest([]byte(first))
	if !ok || len(d) != 32 {
		t.Fatalf("digest %x %v", d, ok)
	}
	same := []string{
		// The retry: another id, the round trip's members, other _meta.
		strings.Replace(strings.Replace(first, `"id":1`, `"id":"two"`, 1), `"arguments"`, `"requestState":"s","inputResponses":{"k":{}},"arguments"`, 1),
		strings.Replace(first, `"2026-07-28","io`, `"2026-07-28","progressToken":7,"io`, 1),
		// The same arguments written otherwise.
		strings.Replace(first, `{"city":"Oslo"}`, `{ "city" : "Oslo" }`, 1),
	}
	for _, body := range same {
		if got, _ := RequestDigest([]byte(body)); !bytes.Equal(got, d) {
			t.Errorf("another digest for the same request %s", body)
		}
	}
	other := []string{
		strings.Replace(first, `"Oslo"`, `"Bergen"`, 1),
		strings.Replace(first, `"get_weather"`, `"get_forecast"`, 1),
		strings.Replace(first, `"tools/call"`, `"prompts/get"`, 1),
	}
	for _, body := range other {
		if got, _ := RequestDigest([]byte(body)); bytes.Equal(got, d) {
			t.Errorf("the same digest for another request %s", body)
		}
	}
	if _, ok := RequestDigest([]byte(`[1]`)); ok {
		t.Error("a batch has a digest")
	}
}

func TestStripInput(t *testing.T) {
	own := func(s string) bool { return strings.HasPrefix(s, "broker.") }
	_, plain := modernRequest("", `{"elicitation":{"url":{}}}`)
	for _, tc := range []struct {
		name, extra, want string
	}{
		{"the broker's state and its only response go", `"requestState":"broker.x","inputResponses":{"broker":{"action":"accept"}},`, ""},
		{"another spelling goes too", `"RequestState":"broker.x","InputResponses":{"broker":{"action":"accept"}},`, ""},
		{"the upstream's state and responses stay", `"requestState":"theirs","inputResponses":{"broker":{"action":"accept"},"theirs":{"action":"accept"}},`,
			`"requestState":"theirs","inputResponses":{"theirs":{"action":"accept"}},`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, body := modernRequest(tc.extra, `{"elicitation":{"url":{}}}`)
			_, want := modernRequest(tc.want, `{"elicitation":{"url":{}}}`)
			got := StripInput([]byte(body), own, []string{"broker"})
			if !json.Valid(got) {
				t.Fatalf("not JSON: %s", got)
			}
			var g, w any
			_ = json.Unmarshal(got, &g)
			_ = json.Unmarshal([]byte(want), &w)
			gj, _ := json.Marshal(g)
			wj, _ := json.Marshal(w)
			if !bytes.Equal(gj, wj) {
				t.Errorf("stripped\n%s\nwant\n%s", got, want)
			}
			// What the headers mirror is still there, so Inspect passes the stripped body.
			h, _ := modernRequest("", "{}")
			r := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/mcp", bytes.NewReader(got))
			r.Header = h
			msg, refused := Inspect(httptest.NewRecorder(), r, 4096)
			if refused != nil || len(msg.Tools) != 1 || msg.Tools[0] != "get_weather" {
				t.Errorf("the stripped body: %v %q", refused, msg.Tools)
			}
			if b, _ := io.ReadAll(r.Body); !bytes.Equal(b, got) {
				t.Error("the body was not put back")
			}
		})
	}
	if got := StripInput([]byte(plain), own, []string{"broker"}); !json.Valid(got) || !strings.Contains(string(got), `"city":"Oslo"`) {
		t.Errorf("a body without input: %s", got)
	}
}
