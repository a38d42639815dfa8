package flows

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// The 2026-07-28 tools/call bodies here are written by hand where the go-sdk client
// cannot be made to send them (a retry with a chosen requestState, a client declaring no
// URL elicitation, a declined elicitation); the journey itself is the go-sdk client's.

// roundTripCall is a 2026-07-28 tools/call of tool with arguments, the client
// capabilities caps, and the round trip's members extra ("" or `"requestState":…,`), and
// the headers that mirror it.
func roundTripCall(token string, id int, tool, arguments, caps, extra string) (http.Header, string) {
	body := fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":%q,"arguments":%s,%s`+
		`"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":%s}}}`,
		id, tool, arguments, extra, caps)
	return http.Header{
		"Authorization":        {"Bearer " + token},
		"Accept":               {"application/json, text/event-stream"},
		"Mcp-Protocol-Version": {"2026-07-28"},
		"Mcp-Method":           {"tools/call"},
		"Mcp-Name":             {tool},
	}, body
}

const urlElicitationCaps = `{"elicitation":{"form":{},"url":{}}}`

// rpcAnswer is a JSON-RPC response of the broker's own, result or error.
type rpcAnswer struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Result  struct {
		ResultType    string `json:"resultType"`
		InputRequests map[string]struct {
			Method string `json:"method"`
			Params struct {
				Mode    string `json:"mode"`
				Message string `json:"message"`
				URL     string `json:"url"`
			} `json:"params"`
		} `json:"inputRequests"`
		RequestState string `json:"requestState"`
		Content      []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		} `json:"content"`
		IsError bool `json:"isError"`
	} `json:"result"`
	Error *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func postRPC(t *testing.T, url string, header http.Header, body string) (*http.Response, rpcAnswer) {
	t.Helper()
	resp := do(t, http.MethodPost, url, header, body)
	var a rpcAnswer
	raw, _ := io.ReadAll(resp.Body)
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		// The upstream's answer: its one message is the stream's last data line.
		for line := range strings.Lines(string(raw)) {
			if data, ok := strings.CutPrefix(line, "data: "); ok {
				raw = []byte(data)
			}
		}
	}
	if err := json.Unmarshal(raw, &a); err != nil {
		t.Fatalf("%s: %s", resp.Status, raw)
	}
	return resp, a
}

// checkInputRequired checks a 2026-07-28 InputRequiredResult asking for the offline
// access link, and returns the link and the request state.
func (f *offlineAccessTest) checkInputRequired(t *testing.T, resp *http.Response, a rpcAnswer, id string) (link, state string) {
	t.Helper()
	if resp.StatusCode != http.StatusOK || a.Error != nil || string(a.ID) != id || a.Result.ResultType != "input_required" || len(a.Result.InputRequests) != 1 {
		t.Fatalf("%s %+v: want an InputRequiredResult for id %s", resp.Status, a, id)
	}
	ir, ok := a.Result.InputRequests[inputKeyOfflineAccess]
	if !ok || ir.Method != "elicitation/create" || ir.Params.Mode != "url" || !strings.Contains(ir.Params.Message, testWorkerID) ||
		!strings.HasPrefix(ir.Params.URL, f.front.URL+pathOfflineAccessStart+"?link=") {
		t.Errorf("input requests %+v", a.Result.InputRequests)
	}
	if !strings.HasPrefix(a.Result.RequestState, requestStatePrefix) {
		t.Errorf("request state %q", a.Result.RequestState)
	}
	if resp.Header.Get("Access-Control-Allow-Origin") != "*" || resp.Header.Get("Cache-Control") != "no-store" {
		t.Errorf("headers %v", resp.Header)
	}
	return ir.Params.URL, a.Result.RequestState
}

func (f *offlineAccessTest) assertUpstreamSawNothing(t *testing.T) {
	t.Helper()
	if n := len(f.up.Seen()); n != 0 {
		t.Errorf("the upstream saw %d requests", n)
	}
}

// TestOfflineAccessInputRequest (SECURITY.md S1.26): a 2026-07-28 tool call that needs
// offline access the user has not granted is answered with an InputRequiredResult whose
// URL-mode elicitation carries the one-time link; its retry goes on asking until the
// user granted it, then goes upstream without the broker's own input; the request state
// is refused when forged, another user's, for another request, or expired; a client
// without URL elicitation gets a tool error naming the link.
func TestOfflineAccessInputRequest(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccessBefore(t, o, nil, testenv.Stateless())
	token, other := f.userToken(t, o.User), f.userToken(t, o.OtherUser)
	retry := func(state, responses string) string {
		return `"requestState":` + fmt.Sprintf("%q", state) + `,"inputResponses":` + responses + `,`
	}
	const accepted = `{"mcp_oauth/offline_access":{"action":"accept"}}`

	_, state := func() (string, string) {
		f.up.Reset()
		h, body := roundTripCall(token, 1, "notes_read", `{}`, urlElicitationCaps, "")
		resp, a := postRPC(t, f.resource, h, body)
		link, state := f.checkInputRequired(t, resp, a, "1")
		f.assertUpstreamSawNothing(t)
		return link, state
	}()

	t.Run("a retry before the user granted it gets the same answer again", func(t *testing.T) {
		f.up.Reset()
		h, body := roundTripCall(token, 2, "notes_read", `{}`, urlElicitationCaps, retry(state, accepted))
		resp, a := postRPC(t, f.resource, h, body)
		f.checkInputRequired(t, resp, a, "2")
		f.assertUpstreamSawNothing(t)
	})

	refused := func(t *testing.T, token, arguments, state string) {
		t.Helper()
		f.up.Reset()
		h, body := roundTripCall(token, 3, "notes_read", arguments, urlElicitationCaps, retry(state, accepted))
		resp, a := postRPC(t, f.resource, h, body)
		if resp.StatusCode != http.StatusBadRequest || a.Error == nil || a.Error.Code != -32602 || string(a.ID) != "3" ||
			!strings.Contains(a.Error.Message, "requestState") {
			t.Errorf("%s %+v: want 400 Invalid params", resp.Status, a)
		}
		f.assertUpstreamSawNothing(t)
	}
	t.Run("a forged request state is refused", func(t *testing.T) {
		payload, tag, _ := strings.Cut(strings.TrimPrefix(state, requestStatePrefix), ".")
		forged := []byte(payload)
		forged[len(forged)/2] ^= 1
		refused(t, token, `{}`, requestStatePrefix+string(forged)+"."+tag)
		refused(t, token, `{}`, state+"x")
		refused(t, token, `{}`, requestStatePrefix+"e30.00000000.AAAA")
	})
	t.Run("another user's request state is refused", func(t *testing.T) {
		refused(t, other, `{}`, state)
	})
	t.Run("a request state of another request is refused", func(t *testing.T) {
		refused(t, token, `{"filter":"x"}`, state)
	})
	t.Run("an expired request state is refused", func(t *testing.T) {
		now := f.b.now
		f.b.now = func() time.Time { return now().Add(requestStateTTL) }
		defer func() { f.b.now = now }()
		refused(t, token, `{}`, state)
	})

	t.Run("a client without URL elicitation gets a tool error naming the link", func(t *testing.T) {
		for _, caps := range []string{`{}`, `{"elicitation":{}}`, `{"elicitation":{"form":{}}}`} {
			f.up.Reset()
			h, body := roundTripCall(token, 4, "notes_read", `{}`, caps, "")
			resp, a := postRPC(t, f.resource, h, body)
			if resp.StatusCode != http.StatusOK || a.Error != nil || string(a.ID) != "4" || !a.Result.IsError || a.Result.ResultType != "complete" ||
				len(a.Result.InputRequests) != 0 || len(a.Result.Content) != 1 || a.Result.Content[0].Type != "text" {
				t.Fatalf("%s %+v: want a tool error", resp.Status, a)
			}
			text := a.Result.Content[0].Text
			if !strings.Contains(text, f.front.URL+pathOfflineAccessStart+"?link=") || !strings.Contains(text, "then try again") {
				t.Errorf("the tool error does not say what to do: %q", text)
			}
			f.assertUpstreamSawNothing(t)
		}
	})
	t.Run("a user who declined gets the tool error", func(t *testing.T) {
		h, body := roundTripCall(token, 5, "notes_read", `{}`, urlElicitationCaps, retry(state, `{"mcp_oauth/offline_access":{"action":"decline"}}`))
		resp, a := postRPC(t, f.resource, h, body)
		if resp.StatusCode != http.StatusOK || !a.Result.IsError || len(a.Result.InputRequests) != 0 {
			t.Errorf("%s %+v: want a tool error", resp.Status, a)
		}
	})

	f.grantOfflineAccess(t, token)
	t.Run("once granted, the retry goes upstream without the broker's input", func(t *testing.T) {
		f.up.Reset()
		theirs := `{"mcp_oauth/offline_access":{"action":"accept"},"upstream_key":{"action":"accept"}}`
		h, body := roundTripCall(token, 6, "notes_read", `{}`, urlElicitationCaps, retry(state, theirs))
		resp, a := postRPC(t, f.resource, h, body)
		// The go-sdk upstream checks the mirrored headers against the body it got: an
		// answer shows they still agree.
		if resp.StatusCode != http.StatusOK || a.Error != nil || a.Result.IsError || string(a.ID) != "6" || len(a.Result.Content) == 0 {
			t.Fatalf("%s %+v: want the tool's result", resp.Status, a)
		}
		seen := f.up.Seen()
		if len(seen) != 1 {
			t.Fatalf("the upstream saw %d requests", len(seen))
		}
		var got struct {
			Params map[string]json.RawMessage `json:"params"`
		}
		if err := json.Unmarshal(seen[0].Body, &got); err != nil {
			t.Fatal(err)
		}
		if _, ok := got.Params["requestState"]; ok || strings.Contains(string(seen[0].Body), requestStatePrefix) {
			t.Errorf("the upstream got the broker's request state: %s", seen[0].Body)
		}
		if string(got.Params["inputResponses"]) != `{"upstream_key":{"action":"accept"}}` {
			t.Errorf("the upstream got inputResponses %s, want only its own", got.Params["inputResponses"])
		}
		if string(got.Params["name"]) != `"notes_read"` || seen[0].Header.Get("Content-Length") != fmt.Sprint(len(seen[0].Body)) {
			t.Errorf("body %s, Content-Length %s", seen[0].Body, seen[0].Header.Get("Content-Length"))
		}
	})
	t.Run("a forged state is refused even once granted", func(t *testing.T) {
		refused(t, token, `{}`, state[:len(state)-2]+"AA")
	})
	t.Run("an upstream's own request state passes untouched", func(t *testing.T) {
		f.up.Reset()
		h, body := roundTripCall(token, 7, "notes_read", `{}`, urlElicitationCaps, `"requestState":"upstream-state",`)
		if resp, a := postRPC(t, f.resource, h, body); resp.StatusCode != http.StatusOK || a.Error != nil {
			t.Fatalf("%s %+v", resp.Status, a)
		}
		if seen := f.up.Seen(); len(seen) != 1 || string(seen[0].Body) != body {
			t.Errorf("the upstream got %s, want the body as sent", seen[0].Body)
		}
	})
}

// TestOfflineAccessInputRequestGoSDKClient: the go-sdk client, speaking 2026-07-28 and
// declaring URL elicitation, is asked for the link in an InputRequiredResult, opens it
// (the user grants offline access in the browser), retries on its own, and the call
// succeeds.
func TestOfflineAccessInputRequestGoSDKClient(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccessBefore(t, o, nil, testenv.Stateless())
	token := f.userToken(t, o.User)
	var elicited []string
	c := mcp.NewClient(&mcp.Implementation{Name: "flows-test", Version: "1"}, &mcp.ClientOptions{
		Capabilities: &mcp.ClientCapabilities{Elicitation: &mcp.ElicitationCapabilities{URL: &mcp.URLElicitationCapabilities{}}},
		ElicitationHandler: func(ctx context.Context, req *mcp.ElicitRequest) (*mcp.ElicitResult, error) {
			elicited = append(elicited, req.Params.Mode+" "+req.Params.URL)
			if req.Params.Mode != "url" || !strings.HasPrefix(req.Params.URL, f.front.URL+pathOfflineAccessStart+"?link=") {
				return &mcp.ElicitResult{Action: "decline"}, nil
			}
			// The user opens the link and grants offline access.
			if resp, page := f.callback(t, f.loginAt(t, req.Params.URL)); resp.StatusCode != http.StatusOK {
				t.Errorf("callback: %s %s", resp.Status, page)
			}
			return &mcp.ElicitResult{Action: "accept"}, nil
		},
	})
	s, err := c.Connect(t.Context(), &mcp.StreamableClientTransport{
		Endpoint: f.resource, HTTPClient: testenv.BearerClient(token), DisableStandaloneSSE: true, MaxRetries: -1,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v := s.InitializeResult().ProtocolVersion; v != "2026-07-28" {
		t.Fatalf("the client speaks %s", v)
	}
	f.up.Reset()
	res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_read"})
	if err != nil || res.IsError {
		t.Fatalf("notes_read: %v %+v", err, res)
	}
	if len(elicited) != 1 || !strings.HasPrefix(elicited[0], "url ") {
		t.Errorf("elicited %q, want the link once", elicited)
	}
	calls := 0
	for _, r := range f.up.Seen() {
		if r.RPCMethod == "tools/call" {
			calls++
			if strings.Contains(string(r.Body), "requestState") || strings.Contains(string(r.Body), inputKeyOfflineAccess) {
				t.Errorf("the upstream got the broker's input: %s", r.Body)
			}
		}
	}
	if calls != 1 {
		t.Errorf("the upstream saw %d tool calls, want 1", calls)
	}
}

// TestAppPasswordInputRequest (SECURITY.md S1.26): delegation app_password asks a
// 2026-07-28 client for the Login Flow v2 link the same way; once the user granted it,
// the retry reaches the upstream with the app password and without the broker's input.
func TestAppPasswordInputRequest(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil, testenv.Stateless())
	token := f.token(t, o.User)
	linkPrefix := f.front.URL + pathAppPasswordStart + "?link="

	t.Run("a client without URL elicitation gets a tool error naming the link", func(t *testing.T) {
		h, body := roundTripCall(token, 1, "whoami", `{}`, `{}`, "")
		resp, a := postRPC(t, f.resource, h, body)
		if resp.StatusCode != http.StatusOK || !a.Result.IsError || len(a.Result.Content) != 1 || !strings.Contains(a.Result.Content[0].Text, linkPrefix) {
			t.Errorf("%s %+v: want a tool error naming the link", resp.Status, a)
		}
	})
	h, body := roundTripCall(token, 2, "whoami", `{}`, urlElicitationCaps, "")
	resp, a := postRPC(t, f.resource, h, body)
	ir, ok := a.Result.InputRequests[inputKeyAppPassword]
	if resp.StatusCode != http.StatusOK || a.Result.ResultType != "input_required" || !ok || ir.Params.Mode != "url" ||
		!strings.HasPrefix(ir.Params.URL, linkPrefix) || !strings.HasPrefix(a.Result.RequestState, requestStatePrefix) {
		t.Fatalf("%s %+v: want an InputRequiredResult with the app password link", resp.Status, a)
	}
	if err := nc.Grant(f.open(t, ir.Params.URL), o.User.Subject); err != nil {
		t.Fatal(err)
	}
	f.up.Reset()
	h, body = roundTripCall(token, 3, "whoami", `{}`, urlElicitationCaps,
		`"requestState":"`+a.Result.RequestState+`","inputResponses":{"mcp_oauth/app_password":{"action":"accept"}},`)
	resp, a = postRPC(t, f.resource, h, body)
	if resp.StatusCode != http.StatusOK || a.Error != nil || a.Result.IsError || len(a.Result.Content) == 0 || !strings.Contains(a.Result.Content[0].Text, o.User.Subject) {
		t.Fatalf("%s %+v: want whoami's result", resp.Status, a)
	}
	if user, _ := f.upstreamBasic(t); user != o.User.Subject {
		t.Errorf("upstream Basic for %q", user)
	}
	if seen := f.up.Seen(); len(seen) != 1 || strings.Contains(string(seen[0].Body), "requestState") || strings.Contains(string(seen[0].Body), "inputResponses") {
		t.Errorf("the upstream got the broker's input: %s", seen[0].Body)
	}
}
