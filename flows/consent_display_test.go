package flows

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// SECURITY.md, "consent page display": a look-alike Unicode host (сlaude.ai with a
// Cyrillic с) is shown as its ASCII (punycode) form, with the whole redirect URI.
func TestConsentPageShowsASCIIHostAndFullURI(t *testing.T) {
	o := testenv.SharedOP(t)
	const lookalike = "https://\u0441laude.ai/api/mcp/auth_callback?x=1"
	_, front := startHybridFront(t, o, "", func(c *Config) {
		c.Registration = true
	})
	resp := do(t, http.MethodPost, front.URL+pathRegister, http.Header{"Content-Type": {"application/json"}},
		`{"client_name":"Claude","redirect_uris":["`+lookalike+`"],"token_endpoint_auth_method":"none"}`)
	var reg struct {
		ClientID string `json:"client_id"`
	}
	decodeJSON(t, resp, &reg)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("registration: %s", resp.Status)
	}
	br := newHybridBrowser(t)
	_, page := br.get(consentURLFor(t, br, front, hybridAuthorizeQuery(reg.ClientID, lookalike, hybridVerifier, "s", nil)).String())
	if strings.Contains(page, "\u0441laude") {
		t.Error("the page shows the Unicode look-alike host")
	}
	for _, want := range []string{"<strong>xn--laude-0ye.ai</strong>", "https://xn--laude-0ye.ai/api/mcp/auth_callback?x=1"} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %q", want)
		}
	}
}

// Control and bidirectional characters are refused in redirect URIs and client names,
// wherever they come from: registration, metadata documents, configuration, authorize.
func TestControlAndBidiCharactersRefused(t *testing.T) {
	for _, tc := range []struct{ name, uri string }{
		{"right-to-left override in the path", "https://app.example.com/cb\u202etxt.exe"},
		{"right-to-left override in the host", "https://app\u202e.example.com/cb"},
		{"an escaped override in the host", "https://app%E2%80%AE.example.com/cb"},
		{"a left-to-right mark", "https://app.example.com/\u200ecb"},
		{"an isolate", "http://127.0.0.1/cb\u2066x\u2069"},
		{"a C1 control", "https://app.example.com/cb\u0085"},
		{"a host that is no domain name", "https://a\u0000b.example/cb"},
	} {
		t.Run("redirect URI: "+tc.name, func(t *testing.T) {
			if err := CheckRedirectURI(tc.uri); err == nil {
				t.Errorf("CheckRedirectURI(%q) accepted", tc.uri)
			}
		})
	}

	b := newRegistrationBroker(t, nil)
	for _, tc := range []struct{ name, body, code string }{
		{"client_name with an override", `{"client_name":"Cl\u202eedua","redirect_uris":["https://app.example.com/cb"]}`, "invalid_client_metadata"},
		{"client_name with a bell", `{"client_name":"Claude\u0007","redirect_uris":["https://app.example.com/cb"]}`, "invalid_client_metadata"},
		{"client_name with a newline", `{"client_name":"Claude\nApproved by your admin","redirect_uris":["https://app.example.com/cb"]}`, "invalid_client_metadata"},
		{"redirect URI with an isolate", `{"redirect_uris":["https://app.example.com/\u2067cb"]}`, "invalid_redirect_uri"},
	} {
		t.Run("registration: "+tc.name, func(t *testing.T) {
			rec := answerOwn(t, b, registerRequest(tc.body, ""))
			var e oauthError
			_ = json.Unmarshal(rec.Body.Bytes(), &e)
			if rec.Code != http.StatusBadRequest || e.Error != tc.code {
				t.Errorf("%d %s", rec.Code, rec.Body)
			}
		})
	}

	t.Run("metadata document: client_name with an override", func(t *testing.T) {
		doc := map[string]any{}
		for k, v := range claudeCodeDocument {
			doc[k] = v
		}
		doc["client_name"] = "Claude\u202e"
		srv := startDocumentServer(t, serveDocument(doc, "max-age=60"))
		if _, err := newDocumentBroker(t, srv, true).findClient(t.Context(), srv.URL+"/client.json"); err == nil {
			t.Error("a document whose name has an override was accepted")
		}
	})

	t.Run("authorize: a configured client whose name has an override", func(t *testing.T) {
		o := testenv.SharedOP(t)
		_, front := startHybridFront(t, o, "", func(c *Config) {
			c.Clients = append(c.Clients, ClientConfig{ClientID: "bidi", Name: "Good\u202eApp", RedirectURIs: []string{"http://127.0.0.1/cb"}})
		})
		resp := getWithoutRedirect(t, front.URL+pathAuthorize+"?"+hybridAuthorizeQuery("bidi", "http://127.0.0.1:5000/cb", hybridVerifier, "s", nil).Encode())
		if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
			t.Errorf("%s %q", resp.Status, resp.Header.Get("Location"))
		}
	})
}

// The consent page lists every scope the IdP is then asked for: nothing reaches the IdP
// that the user was not shown.
func TestConsentPageListsEveryIdPScope(t *testing.T) {
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", hybridClients)
	br := newHybridBrowser(t)
	consent := consentURLFor(t, br, front, hybridAuthorizeQuery(testenv.NativeClientID, hybridRedirectURI, hybridVerifier, "s", []string{"openid"}))
	_, page := br.get(consent.String())
	idp := br.decide(consent, "approve")
	asked := strings.Fields(idp.Query().Get("scope"))
	if len(asked) == 0 {
		t.Fatalf("no scope in %s", idp.Redacted())
	}
	for _, s := range asked {
		if !strings.Contains(page, "<code>"+s+"</code>") {
			t.Errorf("the IdP is asked for %q, which the page does not list", s)
		}
	}
	u, _ := url.Parse(o.Issuer)
	if !strings.Contains(page, u.Hostname()) {
		t.Errorf("the page does not name the IdP's host %s", u.Hostname())
	}
}
