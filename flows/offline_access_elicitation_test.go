package flows

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/cookiejar"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// elicitationAnswer is a JSON-RPC error response carrying URL elicitations.
type elicitationAnswer struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Error   struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
		Data    struct {
			Elicitations []struct {
				Mode          string `json:"mode"`
				ElicitationID string `json:"elicitationId"`
				URL           string `json:"url"`
				Message       string `json:"message"`
			} `json:"elicitations"`
		} `json:"data"`
	} `json:"error"`
}

func (f *offlineAccessTest) checkElicitation(t *testing.T, a elicitationAnswer, id string) string {
	t.Helper()
	if a.JSONRPC != "2.0" || string(a.ID) != id || a.Error.Code != mcp.CodeURLElicitationRequired || len(a.Error.Data.Elicitations) != 1 {
		t.Fatalf("answer %+v", a)
	}
	e := a.Error.Data.Elicitations[0]
	if e.Mode != "url" || e.ElicitationID == "" || e.Message == "" || !strings.HasPrefix(e.URL, f.front.URL+pathOfflineAccessStart+"?link=") {
		t.Errorf("elicitation %+v", e)
	}
	if !strings.Contains(a.Error.Message, e.URL) {
		t.Error("the error message lacks the link, for clients without URL elicitation")
	}
	// The user learns which background clients the grant is for before granting it.
	if !strings.Contains(e.Message, testWorkerID) || !strings.Contains(a.Error.Message, testWorkerID) {
		t.Errorf("the messages do not name the background client %q: %q / %q", testWorkerID, e.Message, a.Error.Message)
	}
	return e.URL
}

func TestOfflineAccessToolsElicitURL(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	token := f.userToken(t, o.User)
	call := func(id string) string {
		return `{"jsonrpc":"2.0","id":` + id + `,"method":"tools/call","params":{"name":"notes_read"}}`
	}

	t.Run("a tool that needs offline access answers the URL elicitation error", func(t *testing.T) {
		for _, id := range []string{`7`, `"req-7"`} {
			f.up.Reset()
			resp := do(t, http.MethodPost, f.resource, bearer(token), call(id))
			if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
				t.Fatalf("%s %s", resp.Status, resp.Header.Get("Content-Type"))
			}
			var a elicitationAnswer
			decodeJSON(t, resp, &a)
			f.checkElicitation(t, a, id)
			if len(f.up.Seen()) != 0 {
				t.Error("the call reached the upstream")
			}
		}
	})
	t.Run("a batch is answered whole", func(t *testing.T) {
		resp := do(t, http.MethodPost, f.resource, bearer(token), `[`+call(`1`)+`,{"jsonrpc":"2.0","id":2,"method":"tools/list"}]`)
		var as []elicitationAnswer
		decodeJSON(t, resp, &as)
		if resp.StatusCode != http.StatusOK || len(as) != 2 || string(as[0].ID) != "1" || string(as[1].ID) != "2" {
			t.Errorf("%s %+v", resp.Status, as)
		}
	})
	t.Run("an unauthenticated call still gets the 401 first", func(t *testing.T) {
		if resp := do(t, http.MethodPost, f.resource, nil, call(`1`)); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("status %s", resp.Status)
		}
	})

	s := connect(t, f.front.URL, token)
	t.Run("other tools pass", func(t *testing.T) {
		if res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "whoami"}); err != nil || res.IsError {
			t.Fatalf("whoami: %v", err)
		}
	})
	var link string
	t.Run("the go-sdk client surfaces the error with its link", func(t *testing.T) {
		_, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_read"})
		var rpcErr *jsonrpc.Error
		if !errors.As(err, &rpcErr) || rpcErr.Code != mcp.CodeURLElicitationRequired {
			t.Fatalf("error %v", err)
		}
		var a elicitationAnswer
		a.JSONRPC, a.ID = "2.0", json.RawMessage(`0`)
		a.Error.Code, a.Error.Message = int(rpcErr.Code), rpcErr.Message
		if err := json.Unmarshal(rpcErr.Data, &a.Error.Data); err != nil {
			t.Fatal(err)
		}
		link = f.checkElicitation(t, a, `0`)
	})
	if link == "" {
		t.FailNow()
	}
	t.Run("the link leads a browser to the IdP", func(t *testing.T) {
		jar, _ := cookiejar.New(nil)
		browser := &http.Client{Jar: jar, CheckRedirect: noRedirect.CheckRedirect}
		resp, err := browser.Get(link)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if to := redirectTarget(t, resp); to.Scheme+"://"+to.Host+to.Path != o.AuthorizationEndpoint {
			t.Errorf("redirect to %s", to.Redacted())
		}
	})
	t.Run("after granting offline access the same call reaches the upstream", func(t *testing.T) {
		f.grantOfflineAccess(t, token)
		f.up.Reset()
		res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_read"})
		if err != nil || res.IsError {
			t.Fatalf("notes_read: %v %+v", err, res)
		}
		if len(f.up.Seen()) == 0 {
			t.Error("the upstream saw nothing")
		}
	})
}
