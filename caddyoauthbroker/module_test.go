package caddyoauthbroker

import (
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

const testKey = "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=" // 32 bytes of 'a'

func validHandler() *Handler {
	return &Handler{
		Mode:           "progressive",
		Issuer:         "https://cloud.example.com",
		ClientID:       "mcp-broker",
		Resource:       "https://mcp.example.com/mcp",
		EncryptionKeys: []string{testKey},
		Clients: []*Client{{
			ClientID:     "claude",
			RedirectURIs: []string{"http://127.0.0.1/callback", "https://claude.ai/api/mcp/auth_callback"},
		}},
		Delegation: &Delegation{Mode: "none"},
		ToolScopes: []*ToolScope{{Tool: "notes_*", Scopes: []string{"notes:write"}}},
	}
}

func TestValidateAcceptsAGoodConfig(t *testing.T) {
	if err := validHandler().Validate(); err != nil {
		t.Fatal(err)
	}
	// In progressive mode the IdP grants scopes: a tool scope the broker does not advertise
	// is the IdP's to grant.
	h := validHandler()
	h.Scopes = []string{"openid", "notes:read"}
	if err := h.Validate(); err != nil {
		t.Fatalf("progressive, a tool scope not among scopes: %v", err)
	}
	h = validHandler()
	h.Resource = "http://127.0.0.1:8080/mcp"
	if err := h.Validate(); err != nil {
		t.Fatalf("http resource on loopback: %v", err)
	}
	h = validHandler()
	h.Delegation.SubjectHeader = "X-Forwarded-User_1!#$%&'*+.^`|~"
	h.Scopes = []string{"openid", "notes:read", "https://api.example.com/notes.read"}
	if err := h.Validate(); err != nil {
		t.Fatalf("a header name of every token character, URL-shaped scopes: %v", err)
	}
	h = validHandler()
	h.Mode = "hybrid"
	h.Scopes = []string{"openid", "notes:write"}
	h.Clients = append(h.Clients, &Client{ClientID: "agent", Secret: strings.Repeat("a1", 32)})
	if err := h.Validate(); err != nil {
		t.Fatalf("a client with a secret and no redirect URI (JWT bearer only): %v", err)
	}
}

// TestValidateScopesLearnedLater: with upstream_metadata set, a tool_scope or base_scopes
// scope not among scopes may be learned from the upstream after start, so it is not an
// error; it is logged at WARN, naming the rule, when the configuration loads.
func TestValidateScopesLearnedLater(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	h := validHandler()
	h.Mode = "hybrid"
	h.logger = zap.New(core)
	h.UpstreamMetadata = "http://mcp-internal:8000/.well-known/oauth-protected-resource/mcp"
	h.Scopes = []string{"openid"}
	h.BaseScopes = []string{"openid", "notes:read"}
	if err := h.Validate(); err != nil {
		t.Fatalf("scopes the upstream may supply: %v", err)
	}
	var rules []string
	for _, e := range logs.All() {
		if tool, ok := e.ContextMap()["tool_scope"]; ok {
			rules = append(rules, tool.(string))
		}
	}
	if logs.Len() != 2 || !slices.Equal(rules, []string{"notes_*"}) {
		t.Errorf("warnings %d for rules %v, want one for base_scopes and one naming notes_*", logs.Len(), rules)
	}
}

func TestValidateErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(h *Handler)
		want   string
	}{
		{"unknown mode", func(h *Handler) { h.Mode = "magic" }, `mode: unknown mode "magic"; want hybrid or progressive`},
		{"missing issuer", func(h *Handler) { h.Issuer = "" }, "issuer: required"},
		{"relative issuer", func(h *Handler) { h.Issuer = "cloud.example.com" }, `issuer: want an absolute http(s) URL, got "cloud.example.com"`},
		{"bad public issuer", func(h *Handler) { h.PublicIssuer = "ftp://x" }, "public_issuer: want an absolute http(s) URL"},
		{"missing client_id", func(h *Handler) { h.ClientID = "" }, "client_id: required"},
		{"missing resource", func(h *Handler) { h.Resource = "" }, "resource: required"},
		{"http resource off loopback", func(h *Handler) { h.Resource = "http://mcp.example.com/mcp" }, "resource: want https (http only on a loopback host)"},
		{"relative resource", func(h *Handler) { h.Resource = "/mcp" }, "resource: want an absolute https URL"},
		{"resource with fragment", func(h *Handler) { h.Resource = "https://mcp.example.com/mcp#x" }, "resource: must not carry a query or fragment"},
		{"resource with query", func(h *Handler) { h.Resource = "https://mcp.example.com/mcp?a=b" }, "resource: must not carry a query or fragment"},
		{"resource with trailing slash", func(h *Handler) { h.Resource = "https://mcp.example.com/mcp/" }, "resource: want the canonical form"},
		{"resource with uppercase host", func(h *Handler) { h.Resource = "https://MCP.example.com/mcp" }, "resource: want the canonical form"},
		{"duplicate client", func(h *Handler) {
			h.Clients = append(h.Clients, &Client{ClientID: "claude", RedirectURIs: []string{"https://x.example/cb"}})
		},
			`clients: "claude" defined twice`},
		{"client without redirect", func(h *Handler) { h.Clients[0].RedirectURIs = nil }, `clients "claude": redirect_uris required for a client without a secret`},
		{"client with http redirect off loopback", func(h *Handler) { h.Clients[0].RedirectURIs = []string{"http://evil.example/cb"} },
			`clients "claude": redirect_uris "http://evil.example/cb": redirect_uri must be https, or http on a loopback host`},
		{"client redirect with userinfo", func(h *Handler) { h.Clients[0].RedirectURIs = []string{"http://localhost:@evil.com/cb"} },
			"redirect_uri must not contain userinfo"},
		{"unknown delegation", func(h *Handler) { h.Delegation = &Delegation{Mode: "passthrough"} }, `delegation: unknown mode "passthrough"`},
		{"app_password without nextcloud_url", func(h *Handler) { h.Delegation = &Delegation{Mode: "app_password"} },
			"delegation app_password: nextcloud_url is required"},
		{"app_password with a relative nextcloud_url", func(h *Handler) {
			h.Delegation = &Delegation{Mode: "app_password", NextcloudURL: "nextcloud:80"}
		}, `delegation app_password: nextcloud_url "nextcloud:80": want an http or https URL`},
		{"app_password with userinfo in nextcloud_public_url", func(h *Handler) {
			h.Delegation = &Delegation{Mode: "app_password", NextcloudURL: "http://nc", NextcloudPublicURL: "https://u:p@cloud.example.com"}
		}, "delegation app_password: nextcloud_public_url"},
		{"app_password with an audience", func(h *Handler) {
			h.Delegation = &Delegation{Mode: "app_password", NextcloudURL: "http://nc", Audience: "nextcloud"}
		}, "delegation app_password: audience and scopes do not apply"},
		{"app_password with a control character in user_agent", func(h *Handler) {
			h.Delegation = &Delegation{Mode: "app_password", NextcloudURL: "http://nc", UserAgent: "MCP\r\nX-Evil: 1"}
		}, "delegation app_password: user_agent"},
		{"nextcloud_url outside mode app_password", func(h *Handler) {
			h.Delegation = &Delegation{Mode: "refresh", NextcloudURL: "http://nc"}
		}, "delegation: nextcloud_url, nextcloud_public_url, user_claim and user_agent belong to mode app_password"},
		{"tool_scope without scopes", func(h *Handler) { h.ToolScopes = []*ToolScope{{Tool: "x"}} }, "tool_scopes[0]: want a tool name or glob and at least one scope"},
		{"tool_scope bad glob", func(h *Handler) { h.ToolScopes = []*ToolScope{{Tool: "[", Scopes: []string{"s"}}} }, `tool_scopes "[": bad glob`},
		// First match wins: a second rule for the same tool would never apply, so the tool would
		// need only the first rule's scopes, not the ones the second asks for.
		{"tool_scope repeated", func(h *Handler) {
			h.ToolScopes = append(h.ToolScopes, &ToolScope{Tool: "notes_*", Scopes: []string{"notes:admin"}})
		}, `tool_scopes "notes_*": shadowed by the earlier "notes_*"`},
		{"tool_scope shadowed by an earlier glob", func(h *Handler) {
			h.ToolScopes = append(h.ToolScopes, &ToolScope{Tool: "notes_delete", Scopes: []string{"notes:admin"}})
		}, `tool_scopes "notes_delete": shadowed by the earlier "notes_*"`},
		// A scope no client can be granted would refuse the tool's calls for good.
		{"tool_scope naming a scope not among scopes", func(h *Handler) {
			h.Mode, h.Scopes = "hybrid", []string{"openid", "notes:read", "notes:write"}
			h.ToolScopes = append(h.ToolScopes, &ToolScope{Tool: "deck_*", Scopes: []string{"notes:read", "deck:write"}})
		}, `tool_scopes "deck_*": deck:write not among scopes`},
		{"tool_scope naming a scope the default scopes lack", func(h *Handler) { h.Mode, h.Scopes = "", nil },
			`tool_scopes "notes_*": notes:write not among scopes`},
		{"base_scopes naming a scope not among scopes", func(h *Handler) { h.BaseScopes = []string{"openid", "notes:list"} },
			"base_scopes: notes:list not among scopes"},
		{"base_scopes with offline_access", func(h *Handler) { h.BaseScopes = []string{"openid", "offline_access"} },
			"base_scopes: offline_access is never advertised"},
		{"base_scopes with a quote", func(h *Handler) { h.BaseScopes = []string{`notes"read`} }, `base_scopes: scopes[0]: "notes\"read" is not a scope token`},
		{"negative ttl", func(h *Handler) { h.CodeTTL = caddy.Duration(-1) }, "code_ttl: must not be negative"},
		{"negative grace", func(h *Handler) { h.RefreshGrace = caddy.Duration(-1) }, "refresh_grace: must not be negative"},
		{"negative session max lifetime", func(h *Handler) { h.SessionMaxLifetime = caddy.Duration(-1) }, "session_max_lifetime: must not be negative"},
		{"negative confirm interval", func(h *Handler) { h.IdPConfirmInterval = caddy.Duration(-1) }, "idp_confirm_interval: must not be negative"},
		{"background client without secret", func(h *Handler) { h.BackgroundClients = []*BackgroundClient{{ClientID: "w"}} },
			"background_clients[0]: want an id and a secret"},
		{"duplicate background client", func(h *Handler) {
			h.BackgroundClients = []*BackgroundClient{{ClientID: "w", ClientSecret: "a"}, {ClientID: "w", ClientSecret: "b"}}
		}, `background_clients: "w" defined twice`},
		{"offline_access bad glob", func(h *Handler) { h.OfflineAccess = &OfflineAccess{Tools: []string{"["}} }, `offline_access: tools "[": bad glob`},
		{"negative registration rate", func(h *Handler) { h.RegistrationRate = -1 }, "registration_rate: must not be negative"},
		{"negative total registration rate", func(h *Handler) { h.RegistrationRateTotal = -1 }, "registration_rate_total: must not be negative"},
		{"negative introspection cache ttl", func(h *Handler) { h.IntrospectionCacheTTL = caddy.Duration(-1) }, "introspection_cache_ttl: must not be negative"},
		{"the broker's own client id as an audience", func(h *Handler) { h.Audience = []string{"mcp-client", h.ClientID} }, "audience: must not list client_id"},
		{"negative cold verify rate", func(h *Handler) { h.ColdVerifyRate = -1 }, "cold_verify_rate: must not be negative"},
		{"negative global cold verify rate", func(h *Handler) { h.ColdVerifyRateGlobal = -1 }, "cold_verify_rate_global: must not be negative"},
		{"negative background token rate", func(h *Handler) { h.BackgroundTokenRate = -1 }, "background_token_rate: must not be negative"},
		{"client name with a bidi override", func(h *Handler) { h.Clients[0].Name = "Claude\u202e" },
			`clients "claude": name: client_name must not contain control or bidirectional-formatting characters`},
		{"client redirect with a bidi override", func(h *Handler) { h.Clients[0].RedirectURIs = []string{"https://claude.ai/\u202ecb"} },
			"redirect_uri must not contain control or bidirectional-formatting characters"},
		{"subject header with a space", func(h *Handler) { h.Delegation.SubjectHeader = "X Auth Subject" },
			`delegation: subject_header "X Auth Subject": not an HTTP header name`},
		{"subject header with a colon", func(h *Handler) { h.Delegation.SubjectHeader = "X-Auth-Subject:" },
			`delegation: subject_header "X-Auth-Subject:": not an HTTP header name`},
		{"subject header with a line break", func(h *Handler) { h.Delegation.SubjectHeader = "X-A\r\nX-B" },
			"delegation: subject_header"},
		{"an empty scope", func(h *Handler) { h.Scopes = []string{"openid", "profile", ""} }, "scopes[2]: empty"},
		{"a scope with a quote", func(h *Handler) { h.Scopes = []string{`notes"read`} }, `scopes[0]: "notes\"read" is not a scope token`},
		{"a scope with a space", func(h *Handler) { h.Scopes = []string{"openid", "notes read"} }, `scopes[1]: "notes read" is not a scope token`},
		{"a client scope with a non-ASCII letter", func(h *Handler) { h.Clients[0].Scopes = []string{"notes:léser"} }, `clients "claude": scopes[0]: "notes:léser" is not a scope token`},
		{"a tool scope with a backslash", func(h *Handler) { h.ToolScopes[0].Scopes = []string{`notes\write`} }, `tool_scopes "notes_*": scopes[0]: "notes\\write" is not a scope token`},
		{"a delegation scope with DEL", func(h *Handler) { h.Delegation.Scopes = []string{"notes\x7f"} }, `delegation: scopes[0]: "notes\x7f" is not a scope token`},
		{"an offline_access scope with a tab", func(h *Handler) { h.OfflineAccess = &OfflineAccess{Scopes: []string{"a\tb"}} }, `offline_access: scopes[0]: "a\tb" is not a scope token`},
		{"an empty audience", func(h *Handler) { h.Audience = []string{"", "mcp"} }, "audience[0]: empty"},
		{"an empty client scope", func(h *Handler) { h.Clients[0].Scopes = []string{""} }, `clients "claude": scopes[0]: empty`},
		{"an empty delegation scope", func(h *Handler) { h.Delegation.Scopes = []string{"notes:read", ""} }, "delegation: scopes[1]: empty"},
		{"upstream_metadata not a URL", func(h *Handler) { h.UpstreamMetadata = "mcp-internal/.well-known/oauth-protected-resource" },
			`upstream_metadata: want an absolute http(s) URL, got "mcp-internal/.well-known/oauth-protected-resource"`},
		{"an unknown narrow", func(h *Handler) { h.Delegation.Narrow = "everything" }, `delegation: narrow: unknown value "everything"; want tool_calls or none`},
		{"narrow none with delegation scopes", func(h *Handler) {
			h.Delegation.Narrow = "none"
			h.Delegation.Scopes = []string{"notes:read"}
		}, "delegation: scopes are never delegated with narrow none"},
		{"an empty tool scope", func(h *Handler) { h.ToolScopes[0].Scopes = []string{""} }, `tool_scopes "notes_*": scopes[0]: empty`},
		{"an empty offline_access scope", func(h *Handler) { h.OfflineAccess = &OfflineAccess{Scopes: []string{""}} }, "offline_access: scopes[0]: empty"},
		{"private documents with documents off", func(h *Handler) {
			off := false
			h.ClientMetadataDocuments, h.ClientMetadataAllowPrivate = &off, true
		}, "client_metadata_allow_private: set, but client_metadata_documents is off"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := validHandler()
			tc.change(h)
			err := h.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
