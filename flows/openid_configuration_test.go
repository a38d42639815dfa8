package flows

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/oauthex"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// The broker issues no ID tokens, so it has no valid OpenID Connect discovery document
// to serve (OIDC Discovery §3 requires jwks_uri, subject_types_supported and
// id_token_signing_alg_values_supported): /.well-known/openid-configuration is a 404
// that browser clients can read, and MCP clients find the RFC 8414 document, which
// they try first, instead.
func TestOpenIDConfigurationNotServed(t *testing.T) {
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", nil)
	resp := get(t, front.URL+wellKnownOpenIDConfiguration, http.Header{"Origin": {"https://inspector.example"}})
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("status %s: %s", resp.Status, body)
	}
	if strings.Contains(string(body), `"issuer"`) || strings.Contains(string(body), "authorization_endpoint") {
		t.Errorf("a metadata document is served: %s", body)
	}
	if resp.Header.Get("Access-Control-Allow-Origin") != "*" || resp.Header.Get("Access-Control-Allow-Credentials") != "" {
		t.Errorf("CORS %v", resp.Header)
	}
	// What an MCP client does: the RFC 8414 document answers.
	asm, err := oauthex.GetAuthServerMeta(t.Context(), front.URL+wellKnownAuthorizationServer, front.URL, http.DefaultClient)
	if err != nil || asm == nil || asm.Issuer != front.URL {
		t.Errorf("the RFC 8414 document: %+v, %v", asm, err)
	}
}
