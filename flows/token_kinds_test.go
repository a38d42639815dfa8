package flows

import (
	"net/http"
	"net/url"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestBackgroundTokenRefusedAtMCPEndpoint: a real background token, issued to
// the broker's own client, never authenticates at the MCP endpoint, even with the
// broker's client id among the audiences (which the configuration refuses).
func TestBackgroundTokenRefusedAtMCPEndpoint(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, func(c *Config) { c.Audience = []string{testenv.BrokerClientID} })
	f.grantOfflineAccess(t, f.userToken(t, o.User))
	resp := f.backgroundRequest(t, basicCredentials(testWorkerID, testWorkerSecret), url.Values{"subject": {o.User.Subject}})
	var tok TokenResponse
	decodeJSON(t, resp, &tok)
	if resp.StatusCode != http.StatusOK || tok.AccessToken == "" {
		t.Fatalf("background token: %s", resp.Status)
	}
	f.up.Reset()
	mcp := do(t, http.MethodPost, f.resource, bearer(tok.AccessToken), `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`)
	if mcp.StatusCode != http.StatusUnauthorized || len(f.up.Seen()) != 0 {
		t.Errorf("%s, upstream saw %d requests; want 401 and nothing forwarded", mcp.Status, len(f.up.Seen()))
	}
}
