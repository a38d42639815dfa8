package e2e

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// nextcloudAppPasswordExampleSite is docs/examples/nextcloud-app-password.Caddyfile without
// its comments, and with the names an admin replaces replaced: the broker's public name by
// caddy's address ({port}, which startCaddy fills in), the issuer by the Nextcloud-like
// IdP's, nextcloud_url and nextcloud_public_url by two names of the Login Flow v2 stand-in
// (the broker's and the browsers'), the MCP server's address, the client's credentials and
// the key file by the test's. It fails when a name of the example is left.
func nextcloudAppPasswordExampleSite(t *testing.T, idp *NodeIdP, nc *testenv.NextcloudStandIn, public string, up *testenv.Upstream) string {
	t.Helper()
	example, err := os.ReadFile("../docs/examples/nextcloud-app-password.Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	upURL, _ := url.Parse(up.URL)
	substitutions := []string{
		"\nmcp.example.com {", "\nhttp://127.0.0.1:{port} {",
		"https://mcp.example.com", "http://127.0.0.1:{port}",
		"mcp.example.com", "127.0.0.1:{port}", // in the user_agent
		"issuer https://cloud.example.com", "issuer " + idp.Issuer,
		"nextcloud_url http://127.0.0.1:8080", "nextcloud_url " + nc.URL,
		"nextcloud_public_url https://cloud.example.com", "nextcloud_public_url " + public,
		"{env.MCP_BROKER_CLIENT_ID}", nodeBrokerClientID,
		"{env.MCP_BROKER_CLIENT_SECRET}", nodeBrokerClientSecret,
		"{file./etc/caddy/mcp_oauth.key}", testKey,
		"reverse_proxy 127.0.0.1:8000", "reverse_proxy " + upURL.Host,
	}
	stripped := stripCaddyfileComments(string(example))
	for i := 0; i < len(substitutions); i += 2 {
		if !strings.Contains(stripped, substitutions[i]) {
			t.Fatalf("nextcloud-app-password.Caddyfile no longer has %q; update this test's substitutions", substitutions[i])
		}
	}
	site := strings.NewReplacer(substitutions...).Replace(stripped)
	for _, left := range []string{"example.com", "{env.", "{file.", ":8000\n", ":8080\n"} {
		if strings.Contains(site, left) {
			t.Fatalf("nextcloud-app-password.Caddyfile: %q left after replacing the names an admin changes", left)
		}
	}
	return site
}

// TestNextcloudAppPasswordExampleThroughCaddyBinary (issue 12, deployment C): the caddy
// binary runs docs/examples/nextcloud-app-password.Caddyfile, only the names an admin
// replaces replaced, in front of an upstream that takes Basic credentials as the Nextcloud
// MCP server's multi_user_basic mode does, with the Nextcloud-like IdP (the oidc app
// 2.0.9, whose sub is the Nextcloud user id) and the Login Flow v2 + OCS stand-in for
// Nextcloud. The broker reaches the stand-in on 127.0.0.1 and browsers on localhost, so
// that the login URL's rewrite to nextcloud_public_url shows.
//
// A user logs in through the broker (hybrid); tools/list reaches the upstream without
// credentials; a tool call answers the URL elicitation, whose /oauth/app-password link
// sends the browser to Nextcloud's login URL on the public name; the grant is made there.
// When the user grants it, the next tool call reaches the upstream with Basic
// loginName:appPassword of that user and never the client's token, and revoking the
// broker's token deletes the app password in Nextcloud. When another account grants it
// (SECURITY.md S1.21), nothing is stored, the app password is deleted in Nextcloud, and
// the tool call still answers the elicitation. caddy's logs hold no app password, poll or
// login token, code or broker token.
func TestNextcloudAppPasswordExampleThroughCaddyBinary(t *testing.T) {
	for _, row := range []struct {
		name    string
		grantAs string
	}{
		{"the user grants it: Basic upstream, deleted in Nextcloud on revocation", nodeUser},
		{"another account grants it: nothing stored, deleted in Nextcloud", "mallory"},
	} {
		t.Run(row.name, func(t *testing.T) { nextcloudAppPasswordJourney(t, row.grantAs) })
	}
}

func nextcloudAppPasswordJourney(t *testing.T, grantAs string) {
	requireInterop(t)
	idp := startNodeIdPConfig(t, profileNextcloud, map[string]any{"clients": []nodeClient{nodeBrokerClient()}})
	nc := testenv.StartNextcloudStandIn(t)
	public := strings.Replace(nc.URL, "://127.0.0.1:", "://localhost:", 1)
	up := testenv.StartUpstream(t, testenv.BasicPassThrough())
	caddy := startCaddy(t, nextcloudAppPasswordExampleSite(t, idp, nc, public, up))
	userAgent := fmt.Sprintf("MCP (127.0.0.1:%d)", caddy.Port)

	// Hybrid login at the oidc-app-like IdP, through the broker.
	cfg := brokerClient(t, caddy, "e2e Nextcloud app password client")
	cfg.Scopes = []string{"openid", "profile", "email"}
	authURL, verifier := brokerAuthorizeURL(cfg, caddy)
	br := newNodeHybridBrowser(idp)
	final, err := br.login(t.Context(), authURL)
	if err != nil {
		t.Fatalf("hybrid login: %v\n%s", err, tail(caddy.logs.String()))
	}
	tok, err := cfg.Exchange(t.Context(), final.Query().Get("code"), oauth2.VerifierOption(verifier),
		oauth2.SetAuthURLParam("resource", caddy.Base+"/mcp"))
	if err != nil {
		t.Fatalf("code at the broker: %v", err)
	}
	var basic string // the Authorization the upstream got, once it got one
	t.Cleanup(func() {
		caddy.assertLogsFree(append(append(br.codes, nc.Secrets()...),
			tok.AccessToken, tok.RefreshToken, strings.TrimPrefix(basic, "Basic "), nodeBrokerClientSecret, testKey)...)
	})

	s, err := mcp.NewClient(&mcp.Implementation{Name: "e2e", Version: "1"}, nil).Connect(t.Context(),
		&mcp.StreamableClientTransport{Endpoint: caddy.Base + "/mcp", HTTPClient: testenv.BearerClient(tok.AccessToken), DisableStandaloneSSE: true, MaxRetries: -1}, nil)
	if err != nil {
		t.Fatalf("connecting through the broker: %v\n%s", err, tail(caddy.logs.String()))
	}
	defer s.Close()

	if res, err := s.ListTools(t.Context(), nil); err != nil || !slices.ContainsFunc(res.Tools, func(tool *mcp.Tool) bool { return tool.Name == "whoami" }) {
		t.Fatalf("tools/list without an app password: %v %+v", err, res)
	}
	link := elicitedAppPasswordLink(t, s, caddy)
	for _, r := range up.Seen() {
		if r.Authorization != "" {
			t.Errorf("the upstream got Authorization on %s before any app password", r.RPCMethod)
		}
	}

	// The browser opens the link: the broker starts Login Flow v2 on nextcloud_url and
	// sends the browser to the login URL on nextcloud_public_url.
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noRedirect.Get(link)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	login := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusFound || !strings.HasPrefix(login, public+"/index.php/login/v2/flow/") {
		t.Fatalf("the link answered %s to %.60s, want Nextcloud's login URL on %s", resp.Status, login, public)
	}
	if reqs := nc.Requests(); len(reqs) == 0 || reqs[0].Path != "/index.php/login/v2" || reqs[0].UserAgent != userAgent {
		t.Errorf("Nextcloud's first requests %+v, want the flow started with User-Agent %q", reqs, userAgent)
	}
	if err := nc.Grant(login, grantAs); err != nil {
		t.Fatalf("granting at Nextcloud: %v", err)
	}

	if grantAs != nodeUser {
		// The next tool call polls the flow: the app password authenticates as another
		// account, so it is deleted in Nextcloud and the user is asked again.
		elicitedAppPasswordLink(t, s, caddy)
		if n := nc.PendingFlows(); n != 0 {
			t.Errorf("%d flows left at Nextcloud: the broker did not poll", n)
		}
		pws := nc.AppPasswords()
		if len(pws) != 1 || pws[0].UID != grantAs || !pws[0].Deleted {
			t.Errorf("app passwords at Nextcloud %+v, want %s's deleted", pws, grantAs)
		}
		for _, r := range up.Seen() {
			if r.Authorization != "" {
				t.Errorf("the upstream got Authorization on %s after another account's grant", r.RPCMethod)
			}
		}
		return
	}

	// The next tool call polls the flow, stores the app password and carries it.
	if who := whoami(t, s); who.Subject != nodeUser {
		t.Errorf("the upstream's tool saw %q, want %q", who.Subject, nodeUser)
	}
	for _, r := range up.Seen() {
		if strings.Contains(fmt.Sprint(r.Header), tok.AccessToken) {
			t.Errorf("the upstream received the client's token on %s", r.RPCMethod)
		}
		if r.RPCMethod == "tools/call" {
			basic = r.Authorization
		}
	}
	raw, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(basic, "Basic "))
	loginName, password, _ := strings.Cut(string(raw), ":")
	pws := nc.AppPasswords()
	if !strings.HasPrefix(basic, "Basic ") || loginName != nodeUser || len(password) != 72 || !slices.Contains(nc.Secrets(), password) ||
		len(pws) != 1 || pws[0].UID != nodeUser || pws[0].Name != userAgent || pws[0].Deleted {
		t.Fatalf("tools/call reached the upstream with Basic for %q (a %d-character password); app passwords at Nextcloud %+v",
			loginName, len(password), pws)
	}

	// Revoking the broker's token deletes the app password in Nextcloud too.
	resp, err = http.PostForm(caddy.Base+"/oauth/revoke", url.Values{"token": {tok.AccessToken}, "client_id": {cfg.ClientID}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revocation: %s", resp.Status)
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, caddy.Base+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":9,"method":"ping"}`))
	req.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("the revoked token at /mcp: %s, want 401", resp.Status)
	}
	if pws := nc.AppPasswords(); len(pws) != 1 || !pws[0].Deleted {
		t.Errorf("app passwords at Nextcloud after the revocation %+v, want %s's deleted", pws, nodeUser)
	}
	reqs := nc.Requests()
	if last := reqs[len(reqs)-1]; last.Method != http.MethodDelete || last.Path != "/ocs/v2.php/core/apppassword" ||
		last.BasicLoginName != nodeUser || last.OCSAPIRequest != "true" {
		t.Errorf("Nextcloud's last request %+v, want the app password's DELETE", last)
	}
}

// elicitedAppPasswordLink calls a tool and wants the URL elicitation answer whose one
// link is the broker's /oauth/app-password.
func elicitedAppPasswordLink(t *testing.T, s *mcp.ClientSession, caddy *caddyProc) string {
	t.Helper()
	_, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "whoami"})
	var rpcErr *jsonrpc.Error
	if !errors.As(err, &rpcErr) || rpcErr.Code != mcp.CodeURLElicitationRequired {
		t.Fatalf("tools/call without an app password: %v, want the URL elicitation\n%s", err, tail(caddy.logs.String()))
	}
	var data struct {
		Elicitations []struct {
			URL string `json:"url"`
		} `json:"elicitations"`
	}
	if err := json.Unmarshal(rpcErr.Data, &data); err != nil || len(data.Elicitations) != 1 ||
		!strings.HasPrefix(data.Elicitations[0].URL, caddy.Base+"/oauth/app-password?link=") {
		t.Fatalf("elicitation data %s: %v", rpcErr.Data, err)
	}
	return data.Elicitations[0].URL
}
