package e2e

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestAppPasswordThroughCaddyBinary: delegation app_password configured by Caddyfile, with
// the Nextcloud stand-in behind it and an upstream that takes Basic credentials as the
// Nextcloud MCP server's multi_user_basic mode does. A tool call without an app password
// answers the URL elicitation; its link sends the browser to Nextcloud's login URL on the
// public URL; the user grants it there; caddy is killed and started again on the same
// storage, and its poller finishes the flow; the next tool call carries Basic upstream;
// caddy's logs hold no app password, poll or login token.
func TestAppPasswordThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	up := testenv.StartUpstream(t, testenv.BasicPassThrough())
	upURL, _ := url.Parse(up.URL)
	site := fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		mode progressive
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:{port}/mcp
		scopes openid notes:read
		encryption_key %s
		delegation app_password {
			nextcloud_url %s
			nextcloud_public_url https://cloud.example.test
			user_agent "MCP broker e2e"
		}
%s
	}
	reverse_proxy %s
}`, o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, testKey, nc.URL, nativeClientBlock, upURL.Host)
	caddy := startCaddy(t, site)
	token := userTokenFor(t, o, caddy.Base+"/mcp")

	connect := func() *mcp.ClientSession {
		s, err := mcp.NewClient(&mcp.Implementation{Name: "e2e", Version: "1"}, nil).Connect(t.Context(),
			&mcp.StreamableClientTransport{Endpoint: caddy.Base + "/mcp", HTTPClient: testenv.BearerClient(token), DisableStandaloneSSE: true, MaxRetries: -1}, nil)
		if err != nil {
			t.Fatalf("connecting: %v\n%s", err, caddy.logs.String())
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	s := connect()

	// No app password yet: the tool call answers the URL elicitation.
	_, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "whoami"})
	var rpcErr *jsonrpc.Error
	if !errors.As(err, &rpcErr) || rpcErr.Code != mcp.CodeURLElicitationRequired {
		t.Fatalf("error %v", err)
	}
	var data struct {
		Elicitations []struct {
			URL string `json:"url"`
		} `json:"elicitations"`
	}
	if err := json.Unmarshal(rpcErr.Data, &data); err != nil || len(data.Elicitations) != 1 {
		t.Fatalf("elicitation data %s: %v", rpcErr.Data, err)
	}
	link := data.Elicitations[0].URL
	if !strings.HasPrefix(link, caddy.Base+"/oauth/app-password?link=") {
		t.Fatalf("link %q", link)
	}
	for _, r := range up.Seen() {
		if r.Authorization != "" {
			t.Errorf("the upstream got Authorization on %s before any app password", r.RPCMethod)
		}
	}

	// The browser opens the link and lands on Nextcloud's login page, at its public URL.
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noRedirect.Get(link)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	login := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusFound || !strings.HasPrefix(login, "https://cloud.example.test/index.php/login/v2/flow/") {
		t.Fatalf("%s to %.60s", resp.Status, login)
	}
	if reqs := nc.Requests(); len(reqs) == 0 || reqs[0].UserAgent != "MCP broker e2e" {
		t.Errorf("Nextcloud requests %+v", reqs)
	}
	if err := nc.Grant(login, o.User.Subject); err != nil {
		t.Fatal(err)
	}

	// The instance dies before polling; the next one, on the same storage, finishes the flow.
	caddy.cmd.Process.Kill()
	caddy.cmd.Wait()
	caddy.cmd = nil
	caddy.start()
	deadline := time.Now().Add(20 * time.Second)
	for nc.PendingFlows() != 0 && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	if nc.PendingFlows() != 0 {
		t.Fatalf("the restarted caddy did not poll the flow:\n%s", caddy.logs.String())
	}

	up.Reset()
	s = connect()
	if who := whoami(t, s); who.Subject != o.User.Subject {
		t.Errorf("the upstream's tool saw %q", who.Subject)
	}
	var basic string
	for _, r := range up.Seen() {
		if strings.Contains(fmt.Sprint(r.Header), token) {
			t.Error("the upstream received the client's token")
		}
		if strings.HasPrefix(r.Authorization, "Basic ") {
			basic = strings.TrimPrefix(r.Authorization, "Basic ")
		}
	}
	raw, _ := base64.StdEncoding.DecodeString(basic)
	if user, _, _ := strings.Cut(string(raw), ":"); user != o.User.Subject {
		t.Errorf("upstream Basic for %q", user)
	}
	caddy.assertLogsFree(append(nc.Secrets(), token, basic, testenv.BrokerClientSecret, testKey)...)
}
