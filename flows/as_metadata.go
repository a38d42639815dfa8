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
	TokenEndpointAuthSigningAlgValuesSupported []string `json:"token_endpoint_auth_signing_alg_values_supported,omitempty"`
	RevocationEndpointAuthMethodsSupported     []string `json:"revocation_endpoint_auth_methods_supported"`
	RevocationEndpointAuthSigningAlgValues     []string `json:"revocation_endpoint_auth_signing_alg_values_supported,omitempty"`
	CodeChallengeMethodsSupported              []string `json:"code_challenge_methods_supported"`
	ClientIDMetadataDocumentSupported          bool     `json:"client_id_metadata_document_supported"`
	AuthorizationResponseIssParameterSupported bool     `json:"authorization_response_iss_parameter_supported"`
	// AuthorizationGrantProfilesSupported names the ID-JAG profile when enterprise
	// issuers are trusted (draft-ietf-oauth-identity-assertion-authz-grant); never which
	// issuers.
	AuthorizationGrantProfilesSupported []string `json:"authorization_grant_profiles_supported,omitempty"`
}

// authorizationServerMetadata describes the broker as the authorization server MCP
// clients log in with. Its issuer is exactly the string the protected-resource metadata
// lists, which clients compare byte for byte.
func (b *Broker) authorizationServerMetadata() AuthorizationServerMetadata {
	authMethods := []string{"none", "client_secret_basic", "client_secret_post"}
	var signingAlgs []string
	if !b.cfg.DisableClientMetadataDocuments {
		// Only metadata document clients authenticate with private_key_jwt.
		authMethods = append(authMethods, AuthMethodPrivateKeyJWT)
		for _, a := range clientAssertionAlgorithms {
			signingAlgs = append(signingAlgs, string(a))
		}
	}
	m := AuthorizationServerMetadata{
		Issuer:                            b.issuer,
		AuthorizationEndpoint:             b.issuer + pathAuthorize,
		TokenEndpoint:                     b.issuer + pathToken,
		RevocationEndpoint:                b.issuer + pathRevoke,
		ScopesSupported:                   b.offer().advertised,
		ResponseTypesSupported:            []string{"code"},
		GrantTypesSupported:               []string{"authorization_code", "refresh_token"},
		TokenEndpointAuthMethodsSupported: authMethods,
		TokenEndpointAuthSigningAlgValuesSupported: signingAlgs,
		RevocationEndpointAuthMethodsSupported:     authMethods,
		RevocationEndpointAuthSigningAlgValues:     signingAlgs,
		CodeChallengeMethodsSupported:              []string{"S256"},
		ClientIDMetadataDocumentSupported:          !b.cfg.DisableClientMetadataDocuments,
		AuthorizationResponseIssParameterSupported: true,
	}
	if b.cfg.Registration {
		m.RegistrationEndpoint = b.issuer + pathRegister
	}
	if len(b.enterprise) > 0 {
		m.GrantTypesSupported = append(m.GrantTypesSupported, grantJWTBearer)
		m.AuthorizationGrantProfilesSupported = []string{idJAGProfile}
	}
	return m
}

// serveAuthorizationServerMetadata answers RFC 8414 discovery, readable from any origin
// without credentials (browser clients such as MCP Inspector fetch it).
//
// /.well-known/openid-configuration is routed here too and answers 404: the broker
// issues no ID tokens, so it has no valid OpenID Connect discovery document (OIDC
// Discovery §3 requires jwks_uri, subject_types_supported and
// id_token_signing_alg_values_supported), and serving its OAuth document there would
// claim to be an OpenID Provider. MCP clients try the RFC 8414 path first and find the
// document there. The 404 is readable from any origin, so that a browser client sees a
// missing document rather than a network error.
func (b *Broker) serveAuthorizationServerMetadata(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == wellKnownOpenIDConfiguration && r.Method != http.MethodOptions {
		e := newRequestError(http.StatusNotFound, "invalid_request",
			"the broker is not an OpenID Provider; its metadata is at "+wellKnownAuthorizationServer)
		e.cors = "GET, OPTIONS"
		b.writeError(w, r, e)
		return
	}
	serveMetadata(b, w, r, b.authorizationServerMetadata)
}
