package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/modelcontextprotocol/go-sdk/oauthex"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestExampleJSONConfigThroughAdminLoad: docs/examples/config.json, with the test's IdP,
// addresses, storage and key file put in for the example's, loads into a running caddy
// through the admin API's POST /load, and the broker it configures answers: its metadata,
// the challenge, and a client's login and tool calls with tokens delegated by token
// exchange for the example's audience and tool scopes.
func TestExampleJSONConfigThroughAdminLoad(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "mcp-server"))
	upstream, _ := url.Parse(up.URL)
	keyFile := filepath.Join(t.TempDir(), "mcp_oauth.key")
	if err := os.WriteFile(keyFile, []byte(testKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	adminPort := freePort(t)
	caddy := startCaddy(t, `http://127.0.0.1:{port} {
	respond "not configured yet"
}`, withAdmin(adminPort), withEnv("MCP_BROKER_CLIENT_SECRET="+testenv.BrokerClientSecret))
	admin := fmt.Sprintf("127.0.0.1:%d", adminPort)

	raw, err := os.ReadFile("../docs/examples/config.json")
	if err != nil {
		t.Fatal(err)
	}
	// The example's own values, each of which must still be in it, and the test's.
	substitutions := []string{
		"https://keycloak.example.com/realms/main", o.Issuer,
		"https://mcp.example.com", caddy.Base,
		`"mcp.example.com"`, `"127.0.0.1"`,
		`"mcp-broker"`, strconv.Quote(testenv.BrokerClientID),
		"/etc/caddy/mcp_oauth.key", keyFile,
		"/var/lib/caddy", caddy.storage,
		`"localhost:2019"`, strconv.Quote(admin),
		`":443"`, strconv.Quote(fmt.Sprintf("127.0.0.1:%d", caddy.Port)),
		`"127.0.0.1:8000"`, strconv.Quote(upstream.Host),
	}
	for i := 0; i < len(substitutions); i += 2 {
		if !strings.Contains(string(raw), substitutions[i]) {
			t.Fatalf("docs/examples/config.json no longer has %s; update this test's substitutions", substitutions[i])
		}
	}
	var cfg struct {
		Admin   json.RawMessage `json:"admin"`
		Storage json.RawMessage `json:"storage"`
		Apps    struct {
			HTTP struct {
				Servers map[string]map[string]any `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal([]byte(strings.NewReplacer(substitutions...).Replace(string(raw))), &cfg); err != nil {
		t.Fatal(err)
	}
	for _, srv := range cfg.Apps.HTTP.Servers {
		srv["automatic_https"] = map[string]any{"disable": true} // plain http on loopback
	}
	body, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post("http://"+admin+"/load", "application/json", strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /load: %s %s", resp.Status, msg)
	}

	var prm struct {
		Resource             string   `json:"resource"`
		AuthorizationServers []string `json:"authorization_servers"`
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(caddy.Base + "/.well-known/oauth-protected-resource/mcp")
		if err == nil && resp.StatusCode == http.StatusOK {
			json.NewDecoder(resp.Body).Decode(&prm)
			resp.Body.Close()
			break
		}
		if err == nil {
			resp.Body.Close()
		}
		time.Sleep(50 * time.Millisecond)
	}
	if prm.Resource != caddy.Base+"/mcp" || !slices.Equal(prm.AuthorizationServers, []string{caddy.Base}) {
		t.Fatalf("protected resource metadata after POST /load: %+v", prm)
	}
	resp, err = http.Post(caddy.Base+"/mcp", "application/json", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), "resource_metadata=") {
		t.Fatalf("/mcp without a token: %s %q", resp.Status, resp.Header.Get("WWW-Authenticate"))
	}

	// A client registers, logs in and calls tools; the upstream gets tokens exchanged for
	// the example's audience, narrowed per tool by its tool_scopes.
	br := newBrowser(o)
	s, _ := connectHybrid(t, caddy.Base, &auth.AuthorizationCodeHandlerConfig{
		DynamicClientRegistrationConfig: &auth.DynamicClientRegistrationConfig{Metadata: &oauthex.ClientRegistrationMetadata{
			ClientName:              "e2e example client",
			RedirectURIs:            []string{"http://127.0.0.1:49152/callback"},
			GrantTypes:              []string{"authorization_code", "refresh_token"},
			TokenEndpointAuthMethod: "none",
		}},
		RedirectURL:              "http://127.0.0.1:49152/callback",
		AuthorizationCodeFetcher: br.fetch,
	})
	up.Reset()
	for _, call := range []*mcp.CallToolParams{
		{Name: "notes_write", Arguments: map[string]any{"text": "hello"}},
		{Name: "notes_read"},
	} {
		if res, err := s.CallTool(t.Context(), call); err != nil || res.IsError {
			t.Fatalf("%s: %v %+v", call.Name, err, res)
		}
	}
	if who := whoami(t, s); who.Subject != o.User.Subject || !slices.Equal(who.Audience, []string{"mcp-server"}) {
		t.Errorf("whoami: %+v, want the user and audience mcp-server", who)
	}
	var sets []string
	for _, r := range up.Seen() {
		if r.AuthError != "" {
			t.Errorf("upstream refused the delegated token: %s", r.AuthError)
		}
		if r.RPCMethod == "tools/call" && !slices.Contains(sets, fmt.Sprint(r.Identity.Scopes)) {
			sets = append(sets, fmt.Sprint(r.Identity.Scopes))
		}
	}
	slices.Sort(sets)
	if !slices.Equal(sets, []string{"[notes:read]", "[notes:write]"}) {
		t.Errorf("scope sets the upstream saw on tools/call: %v, want [notes:read] and [notes:write] apart", sets)
	}
	caddy.assertLogsFree(testenv.BrokerClientSecret, testKey)
}
