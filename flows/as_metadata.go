package flows

import "net/http"

// AuthorizationServerMetadata is the RFC 8414 document of the broker in hybrid mode.
type AuthorizationServerMetadata struct {
	Issuer                                     string   `json:"issuer"`
	AuthorizationEndpoint                      string   `json:"authorization_endpoint"`
	TokenEndpoint                              string   `json:"token_endpoint"`
	RegistrationEndpoint                       string   `json:"registration_endpoint,omitempty"`
	RevocationEndpoint                         string   `json:"revocation_endpoint"`
	ScopesSupported                            []string `json:"scopes_supported,omitempty"`
	ResponseTypesSupported                     []string `json:"response_types_supported"`
	GrantTypesSupported                        []string `json:"grant_types_supported"`
	TokenEndpointAuthMethodsSupported          []string `json:"token_endpoint_auth_methods_supported"`
	RevocationEndpointAuthMethodsSupported     []string `json:"revocation_endpoint_auth_methods_supported"`
	CodeChallengeMethodsSupported              []string `json:"code_challenge_methods_supported"`
	ClientIDMetadataDocumentSupported          bool     `json:"client_id_metadata_document_supported"`
	AuthorizationResponseIssParameterSupported bool     `json:"authorization_response_iss_parameter_supported"`
}

// authorizationServerMetadata describes the broker as the authorization server MCP
// clients log in with. Its issuer is exactly the string the protected-resource metadata
// lists, which clients compare byte for byte.
func (b *Broker) authorizationServerMetadata() AuthorizationServerMetadata {
	authMethods := []string{"none", "client_secret_basic", "client_secret_post"}
	m := AuthorizationServerMetadata{
		Issuer:                                     b.issuer,
		AuthorizationEndpoint:                      b.issuer + pathAuthorize,
		TokenEndpoint:                              b.issuer + pathToken,
		RevocationEndpoint:                         b.issuer + pathRevoke,
		ScopesSupported:                            b.offer().advertised,
		ResponseTypesSupported:                     []string{"code"},
		GrantTypesSupported:                        []string{"authorization_code", "refresh_token"},
		TokenEndpointAuthMethodsSupported:          authMethods,
		RevocationEndpointAuthMethodsSupported:     authMethods,
		CodeChallengeMethodsSupported:              []string{"S256"},
		ClientIDMetadataDocumentSupported:          !b.cfg.DisableClientMetadataDocuments,
		AuthorizationResponseIssParameterSupported: true,
	}
	if b.cfg.Registration {
		m.RegistrationEndpoint = b.issuer + pathRegister
	}
	return m
}

// serveAuthorizationServerMetadata answers RFC 8414 discovery, readable from any origin
// without credentials (browser clients such as MCP Inspector fetch it).
//
// The same document answers at /.well-known/openid-configuration: MCP clients (the
// TypeScript and Go SDKs) fall back to that path and read only its OAuth fields. It does
// not claim to be an OpenID Provider: the broker issues no ID tokens, so it names no
// jwks_uri, subject types or ID-token algorithms rather than advertising what it lacks.
// The TypeScript SDK validates those OIDC fields only when it had to use the OIDC path,
// which it never does here since the RFC 8414 path, tried first, answers.
func (b *Broker) serveAuthorizationServerMetadata(w http.ResponseWriter, r *http.Request) {
	serveMetadata(b, w, r, b.authorizationServerMetadata)
}
