package flows

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"golang.org/x/oauth2"
)

// application_type (OpenID Connect Registration §2, sent by MCP 2026-07-28 clients) only
// chooses the redirect rules: native adds private-use schemes; web and none keep https and
// loopback http, so today's clients are refused nothing; an unknown value counts as none.
// The registration stores it and answers with it.
func TestRegisterApplicationType(t *testing.T) {
	for _, tc := range []struct {
		name, appType string
		redirectURIs  []string
		want          string // the stored and echoed application_type; "refused": invalid_redirect_uri
	}{
		{"native with a private-use scheme", "native", []string{"com.example.agent:/oauth/callback"}, "native"},
		{"native with an app scheme and a host", "native", []string{"cursor://anysphere.cursor-mcp/oauth/callback"}, "native"},
		{"native with loopback", "native", []string{"http://127.0.0.1/callback"}, "native"},
		{"native with https", "native", []string{"https://app.example.com/cb"}, "native"},
		{"web with loopback, as today's clients register", "web", []string{"http://127.0.0.1/callback", "http://localhost:8080/cb"}, "web"},
		{"web with https", "web", []string{"https://app.example.com/cb"}, "web"},
		{"none with loopback, as today", "", []string{"http://127.0.0.1/callback"}, ""},
		{"an unknown type counts as none", "desktop", []string{"http://127.0.0.1/callback"}, ""},
		{"none with a private-use scheme, as today", "", []string{"com.example.agent:/oauth/callback"}, "refused"},
		{"web with a private-use scheme", "web", []string{"com.example.agent:/oauth/callback"}, "refused"},
		{"an unknown type with a private-use scheme", "desktop", []string{"com.example.agent:/oauth/callback"}, "refused"},
		{"native with javascript:", "native", []string{"javascript:/alert(1)"}, "refused"},
		{"native with data:", "native", []string{"data:/text/html,hi"}, "refused"},
		{"native with file:", "native", []string{"file:///etc/passwd"}, "refused"},
		{"native with http on a public host", "native", []string{"http://evil.example/cb"}, "refused"},
		{"native with a fragment", "native", []string{"com.example.agent:/cb#x"}, "refused"},
		{"native with userinfo", "native", []string{"com.example.agent://user@host/cb"}, "refused"},
		{"native with an opaque URI", "native", []string{"com.example.agent:cb"}, "refused"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newRegistrationBroker(t, nil)
			md := map[string]any{"redirect_uris": tc.redirectURIs, "token_endpoint_auth_method": "none"}
			if tc.appType != "" {
				md["application_type"] = tc.appType
			}
			body, _ := json.Marshal(md)
			rec := answerOwn(t, b, registerRequest(string(body), ""))
			if tc.want == "refused" {
				wantRegistrationError(t, rec, http.StatusBadRequest, "invalid_redirect_uri")
				return
			}
			if rec.Code != http.StatusCreated {
				t.Fatalf("registration: %d %s", rec.Code, rec.Body)
			}
			var resp map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
				t.Fatal(err)
			}
			if got, _ := resp["application_type"].(string); got != tc.want {
				t.Errorf("response application_type %q, want %q", got, tc.want)
			}
			stored, err := b.registrations.load(t.Context(), resp["client_id"].(string))
			if err != nil || stored.ApplicationType != tc.want {
				t.Errorf("stored %+v, %v", stored, err)
			}
		})
	}
}

// A native client registered with a private-use scheme logs in with it: authorize, the
// consent page naming the app's scheme, the IdP, and the code sent to the app's URI,
// redeemed there.
func TestNativeClientPrivateUseSchemeLogsIn(t *testing.T) {
	const redirect = "com.example.agent:/oauth/callback"
	srv := startDocumentServer(t, serveDocument(claudeCodeDocument, ""))
	e, _ := assertionEnv(t, srv, func(c *Config) { c.Registration = true })
	reg := postJSON(t, e.front.URL+pathRegister, `{"redirect_uris":["`+redirect+`"],"token_endpoint_auth_method":"none","application_type":"native","client_name":"Agent CLI"}`)
	var info clientInformation
	if err := json.Unmarshal(reg, &info); err != nil || info.ApplicationType != ApplicationTypeNative {
		t.Fatalf("registration: %v %s", err, reg)
	}

	br := newHybridBrowser(t)
	verifier := oauth2.GenerateVerifier()
	consentURL := consentURLFor(t, br, e.front, hybridAuthorizeQuery(info.ClientID, redirect, verifier, "s1", []string{"openid"}))
	resp, page := br.get(consentURL.String())
	if resp.StatusCode != http.StatusOK || !strings.Contains(page, "<strong>com.example.agent:</strong> (an application on this computer)") {
		t.Fatalf("consent page: %s %.2000s", resp.Status, page)
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "form-action 'self' com.example.agent:") {
		t.Errorf("CSP %q does not allow the redirect to the app", csp)
	}
	code := br.login(e.front, e.o, info.ClientID, redirect, verifier, []string{"openid"})
	e.exchange(t, info.ClientID, code, verifier, func(f url.Values) { f.Set("redirect_uri", redirect) }).wantTokens(t)

	t.Run("consent is asked again, never remembered", func(t *testing.T) {
		// Another app may claim the scheme and start the request (RFC 8252 §8.6).
		u := br.authorize(e.front, hybridAuthorizeQuery(info.ClientID, redirect, oauth2.GenerateVerifier(), "s3", []string{"openid"}))
		if u.Path != pathConsent {
			t.Errorf("the second authorization in the same browser went to %s, not the consent page", u)
		}
	})
	t.Run("an authorization error is a page with a link to the app, not a redirect", func(t *testing.T) {
		// Any app can claim a private-use scheme (RFC 8252 §8.6): an error is never
		// redirected to one at once (SECURITY.md S1.32).
		q := hybridAuthorizeQuery(info.ClientID, redirect, verifier, "s2", []string{"openid"})
		q.Set("code_challenge_method", "plain")
		resp, page := br.get(e.front.URL + pathAuthorize + "?" + q.Encode())
		if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
			t.Fatalf("%s, Location %q", resp.Status, resp.Header.Get("Location"))
		}
		if !strings.Contains(page, `href="`+redirect+"?") || !strings.Contains(page, "com.example.agent: (an application on this computer)") {
			t.Errorf("the page does not link to the app: %.2000s", page)
		}
	})
}

// A metadata document's application_type applies the same way.
func TestMetadataDocumentApplicationType(t *testing.T) {
	for _, tc := range []struct {
		appType string
		ok      bool
	}{{"native", true}, {"web", false}, {"", false}} {
		doc := map[string]any{"redirect_uris": []string{"com.example.agent:/oauth/callback", "http://127.0.0.1/callback"}}
		if tc.appType != "" {
			doc["application_type"] = tc.appType
		}
		srv := startDocumentServer(t, serveDocument(doc, ""))
		b := newDocumentBroker(t, srv, true)
		c, err := b.findClient(t.Context(), srv.URL+"/client.json")
		if (err == nil) != tc.ok {
			t.Errorf("application_type %q: %v", tc.appType, err)
		}
		if err == nil && c.ApplicationType != tc.appType {
			t.Errorf("application_type %q read as %q", tc.appType, c.ApplicationType)
		}
	}
}
