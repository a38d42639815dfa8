package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"
)

// tsLoginFunc plays the user's browser for the TS client: from the authorization URL the
// SDK produced to the final redirect (redirect_uri?code&state, or ?error), not requested.
type tsLoginFunc func(ctx context.Context, authorizeURL string) (*url.URL, error)

// tsClientOptions says what interop/client.mjs does after connecting.
type tsClientOptions struct {
	ClientID    string           // pre-registered at the AS; empty: DCR
	RedirectURL string           // default http://127.0.0.1:49152/callback
	Calls       []map[string]any // {"name":..., "arguments":...} after tools/list, in order
	StepUp      map[string]any   // a call that needs a scope the first token lacks
	Refresh     bool             // force the SDK's 401 → refresh path
	SDKStepUp   bool             // leave step-up to the SDK alone
	FirstScope  string           // ask for less than the first challenge names
	SDK2        bool             // the 2.x @modelcontextprotocol/client instead of the 1.x SDK
	// Negotiate is the 2.x client's versionNegotiation mode ("auto": 2026-07-28 where the
	// server offers it); empty: legacy, the 2025 handshake.
	Negotiate string
	// ClientMetadataURL is the 2.x client's metadata document URL (CIMD).
	ClientMetadataURL string
	// Offline is a call that needs the user's offline access (after the step-up); the 2.x
	// client declares URL elicitation for it.
	Offline map[string]any
	// Listen keeps a 2026-07-28 subscriptions/listen for tool list changes open through the calls.
	Listen bool
	// Elicit plays the user for a URL-mode elicitation: it opens url and says what the
	// user did ("accept", "decline", "cancel"). Nil: every elicitation fails the run.
	Elicit func(ctx context.Context, url string) (string, error)
}

// tsSummary is client.mjs's report.
type tsSummary struct {
	Type     string `json:"type"`
	Message  string `json:"message"`
	Requests []struct {
		Method          string `json:"method"`
		URL             string `json:"url"`
		Status          int    `json:"status"`
		WWWAuthenticate string `json:"wwwAuthenticate"`
		Session         bool   `json:"session"`
		// The MCP transport headers the client sent (MCP-Protocol-Version, Mcp-Method, Mcp-Name).
		ProtocolVersion string `json:"protocolVersion"`
		MCPMethod       string `json:"mcpMethod"`
		MCPName         string `json:"mcpName"`
		RPCMethod       string `json:"rpcMethod"` // the JSON-RPC body's method, if any
	} `json:"requests"`
	TokenGrants []struct {
		GrantType string `json:"grant_type"`
		Status    int    `json:"status"`
	} `json:"tokenGrants"`
	Authorizations []struct {
		Endpoint            string `json:"endpoint"`
		ClientID            string `json:"client_id"`
		Scope               string `json:"scope"`
		Resource            string `json:"resource"`
		RedirectURI         string `json:"redirect_uri"`
		CodeChallengeMethod string `json:"code_challenge_method"`
	} `json:"authorizations"`
	RegisteredClientID string `json:"registeredClientId"`
	ServerInfo         struct {
		Name string `json:"name"`
	} `json:"serverInfo"`
	SessionID bool     `json:"sessionId"`
	Tools     []string `json:"tools"`
	Calls     []struct {
		Name    string `json:"name"`
		IsError bool   `json:"isError"`
		Text    string `json:"text"`
	} `json:"calls"`
	Refresh *struct {
		Attempted      bool   `json:"attempted"`
		Reason         string `json:"reason"`
		RefreshGrants  int    `json:"refreshGrants"`
		OK             bool   `json:"ok"`
		Rotated        bool   `json:"rotated"`
		NewAccessToken bool   `json:"newAccessToken"`
	} `json:"refresh"`
	StepUp *struct {
		OK             bool   `json:"ok"`
		Error          string `json:"error"`
		Authorizations int    `json:"authorizations"`
		Scope          string `json:"scope"`
	} `json:"stepUp"`
	ClientID        string `json:"clientId"`        // the client_id the SDK used last
	ProtocolVersion string `json:"protocolVersion"` // the revision the connection negotiated
	Elicitations    []struct {
		Message string `json:"message"`
		URL     string `json:"url"` // without the query
		Action  string `json:"action"`
		Via     string `json:"via"` // input_required or url_elicitation_error
	} `json:"elicitations"`
	Offline *struct {
		OK           bool   `json:"ok"`
		Error        string `json:"error"`
		Elicitations int    `json:"elicitations"`
		Text         string `json:"text"`
	} `json:"offline"`
	Listen *struct {
		Honored struct {
			ToolsListChanged bool `json:"toolsListChanged"`
		} `json:"honored"`
		Notifications int    `json:"notifications"`
		Closed        string `json:"closed"`
	} `json:"listen"`
	AccessTokens  []string `json:"accessTokens"` // SHA-256 hex of each access token held
	AuthorizeURLs []string `json:"-"`            // as the SDK produced them
}

// grants lists the grant types the client used at token endpoints, in order.
func (s *tsSummary) grants() []string {
	var out []string
	for _, g := range s.TokenGrants {
		out = append(out, g.GrantType)
	}
	return out
}

// runTSClient runs interop/client.mjs against mcpURL, hands every authorization URL it
// prints to login, and returns its summary. A client error fails the test, with the
// summary so far in the message.
func runTSClient(t *testing.T, mcpURL string, login tsLoginFunc, o tsClientOptions) *tsSummary {
	t.Helper()
	s, err := runTSClientErr(t, mcpURL, login, o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func runTSClientErr(t *testing.T, mcpURL string, login tsLoginFunc, o tsClientOptions) (*tsSummary, error) {
	t.Helper()
	args := []string{"--url", mcpURL, "--timeout", "60000"}
	if o.ClientID != "" {
		args = append(args, "--client-id", o.ClientID)
	}
	if o.RedirectURL != "" {
		args = append(args, "--redirect-url", o.RedirectURL)
	}
	for _, c := range o.Calls {
		b, _ := json.Marshal(c)
		args = append(args, "--call", string(b))
	}
	if o.StepUp != nil {
		b, _ := json.Marshal(o.StepUp)
		args = append(args, "--stepup", string(b))
	}
	if o.Refresh {
		args = append(args, "--refresh")
	}
	if o.FirstScope != "" {
		args = append(args, "--first-scope", o.FirstScope)
	}
	if o.SDKStepUp {
		args = append(args, "--sdk-stepup")
	}
	if o.SDK2 {
		args = append(args, "--sdk", "2")
	}
	if o.Negotiate != "" {
		args = append(args, "--negotiate", o.Negotiate)
	}
	if o.ClientMetadataURL != "" {
		args = append(args, "--client-metadata-url", o.ClientMetadataURL)
	}
	if o.Listen {
		args = append(args, "--listen")
	}
	if o.Offline != nil {
		b, _ := json.Marshal(o.Offline)
		args = append(args, "--offline", string(b))
	}
	p := startNode(t, "client.mjs", nil, args...)
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	var urls []string
	start := time.Now()
	for {
		var msg struct {
			Type string `json:"type"`
			URL  string `json:"url"`
		}
		var raw json.RawMessage
		if err := p.nextJSON(ctx, &raw); err != nil {
			return nil, err
		}
		json.Unmarshal(raw, &msg)
		switch msg.Type {
		case "authorize":
			t.Logf("client.mjs: authorization %d at %v", len(urls)+1, time.Since(start).Round(time.Millisecond))
			urls = append(urls, msg.URL)
			final, err := login(ctx, msg.URL)
			if err != nil {
				return nil, err
			}
			if err := p.send(map[string]string{"redirect": final.String()}); err != nil {
				return nil, err
			}
		case "elicit":
			if o.Elicit == nil {
				return nil, fmt.Errorf("client.mjs asked to open a URL elicitation, and the test has no user for it")
			}
			t.Logf("client.mjs: URL elicitation at %v", time.Since(start).Round(time.Millisecond))
			action, err := o.Elicit(ctx, msg.URL)
			if err != nil {
				return nil, err
			}
			if err := p.send(map[string]string{"action": action}); err != nil {
				return nil, err
			}
		case "summary", "error":
			t.Logf("client.mjs: %s at %v", msg.Type, time.Since(start).Round(time.Millisecond))
			var s tsSummary
			if err := json.Unmarshal(raw, &s); err != nil {
				return nil, err
			}
			s.AuthorizeURLs = urls
			if msg.Type == "error" {
				var e struct {
					Message string          `json:"message"`
					Summary json.RawMessage `json:"summary"`
				}
				json.Unmarshal(raw, &e)
				return &s, &tsClientError{msg: e.Message, summary: string(e.Summary), stderr: tail(p.stderr.String())}
			}
			if err := p.wait(10 * time.Second); err != nil {
				t.Logf("client.mjs: %v", err)
			}
			return &s, nil
		}
	}
}

type tsClientError struct{ msg, summary, stderr string }

func (e *tsClientError) Error() string {
	return "ts client: " + e.msg + "\nsummary so far: " + e.summary + "\nstderr: " + e.stderr
}

// requestsTo counts the client's requests whose URL ends with suffix and got status.
func (s *tsSummary) requestsTo(method, suffix string, status int) int {
	n := 0
	for _, r := range s.Requests {
		if r.Method == method && strings.HasSuffix(r.URL, suffix) && (status == 0 || r.Status == status) {
			n++
		}
	}
	return n
}
