package flows

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/oauthex"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

func TestAuthorizationServerMetadata(t *testing.T) {
	o := testenv.SharedOP(t)
	for _, registration := range []bool{true, false} {
		name := "registration off"
		if registration {
			name = "registration on"
		}
		t.Run(name, func(t *testing.T) {
			_, front := startHybridFront(t, o, "", func(c *Config) { c.Registration = registration })
			iss := front.URL
			want := map[string]any{
				"issuer":                                                iss,
				"authorization_endpoint":                                iss + "/oauth/authorize",
				"token_endpoint":                                        iss + "/oauth/token",
				"revocation_endpoint":                                   iss + "/oauth/revoke",
				"scopes_supported":                                      []any{"openid", "notes:read", "notes:write"},
				"response_types_supported":                              []any{"code"},
				"grant_types_supported":                                 []any{"authorization_code", "refresh_token"},
				"token_endpoint_auth_methods_supported":                 []any{"none", "client_secret_basic", "client_secret_post", "private_key_jwt"},
				"token_endpoint_auth_signing_alg_values_supported":      []any{"RS256", "PS256", "ES256", "EdDSA"},
				"revocation_endpoint_auth_methods_supported":            []any{"none", "client_secret_basic", "client_secret_post", "private_key_jwt"},
				"revocation_endpoint_auth_signing_alg_values_supported": []any{"RS256", "PS256", "ES256", "EdDSA"},
				"code_challenge_methods_supported":                      []any{"S256"},
				"client_id_metadata_document_supported":                 true,
				"authorization_response_iss_parameter_supported":        true,
			}
			if registration {
				want["registration_endpoint"] = iss + "/oauth/register"
			}
			wantJSON, _ := json.Marshal(want)

			// /.well-known/openid-configuration is not served: TestOpenIDConfigurationNotServed.
			for _, path := range []string{"/.well-known/oauth-authorization-server"} {
				t.Run(path, func(t *testing.T) {
					resp := get(t, front.URL+path, http.Header{"Origin": {"https://inspector.example"}})
					if resp.StatusCode != http.StatusOK {
						t.Fatalf("status %s", resp.Status)
					}
					var m map[string]any
					decodeJSON(t, resp, &m)
					gotJSON, _ := json.Marshal(m)
					if string(gotJSON) != string(wantJSON) {
						t.Errorf("metadata\n got %s\nwant %s", gotJSON, wantJSON)
					}
					if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "*" {
						t.Errorf("Access-Control-Allow-Origin = %q, want *", got)
					}
					if got := resp.Header.Get("Access-Control-Allow-Credentials"); got != "" {
						t.Errorf("credentials allowed: %q", got)
					}
					// The Go SDK's client reads it: issuer equal to the URL, PKCE, safe URLs.
					asm, err := oauthex.GetAuthServerMeta(t.Context(), front.URL+path, iss, http.DefaultClient)
					if err != nil || asm == nil {
						t.Fatalf("go-sdk refuses the metadata: %v", err)
					}
					if !asm.AuthorizationResponseIssParameterSupported || !asm.ClientIDMetadataDocumentSupported {
						t.Errorf("go-sdk reads %+v", asm)
					}
				})
			}
		})
	}

	_, front := startHybridFront(t, o, "", nil)
	t.Run("the issuer is the protected resource's authorization server", func(t *testing.T) {
		var prm ProtectedResourceMetadata
		decodeJSON(t, get(t, front.URL+"/.well-known/oauth-protected-resource/mcp", nil), &prm)
		var asm AuthorizationServerMetadata
		decodeJSON(t, get(t, front.URL+"/.well-known/oauth-authorization-server", nil), &asm)
		if len(prm.AuthorizationServers) != 1 || prm.AuthorizationServers[0] != asm.Issuer {
			t.Errorf("PRM names %v, AS metadata issuer is %q", prm.AuthorizationServers, asm.Issuer)
		}
	})
	t.Run("preflight", func(t *testing.T) {
		for _, path := range []string{"/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"} {
			resp := do(t, http.MethodOptions, front.URL+path,
				http.Header{"Origin": {"https://inspector.example"}, "Access-Control-Request-Method": {"GET"}}, "")
			if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Access-Control-Allow-Origin") != "*" ||
				!strings.Contains(resp.Header.Get("Access-Control-Allow-Methods"), "GET") {
				t.Errorf("%s preflight: %s, allow-origin %q", path, resp.Status, resp.Header.Get("Access-Control-Allow-Origin"))
			}
		}
	})
	t.Run("other methods are refused", func(t *testing.T) {
		if resp := do(t, http.MethodPost, front.URL+"/.well-known/oauth-authorization-server", nil, "{}"); resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("POST: %s", resp.Status)
		}
	})
	t.Run("offline_access is never advertised", func(t *testing.T) {
		body, _ := io.ReadAll(get(t, front.URL+"/.well-known/oauth-authorization-server", nil).Body)
		if strings.Contains(string(body), "offline_access") {
			t.Errorf("metadata lists offline_access: %s", body)
		}
	})
	t.Run("no OpenID Provider claims", func(t *testing.T) {
		body, _ := io.ReadAll(get(t, front.URL+"/.well-known/openid-configuration", nil).Body)
		for _, field := range []string{"jwks_uri", "id_token_signing_alg_values_supported", "subject_types_supported", "userinfo_endpoint"} {
			if strings.Contains(string(body), field) {
				t.Errorf("the broker issues no ID tokens but its metadata has %s", field)
			}
		}
	})
}
