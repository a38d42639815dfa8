package e2e

import (
	"net/http"
	"net/url"
	"strings"
	"testing"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// nodeClientLogin signs the Node IdP's user in as a client and returns its token response.
func nodeClientLogin(t *testing.T, idp *NodeIdP, clientID, secret, redirect, resource string) *oauth2.Token {
	t.Helper()
	c := newNodeIdPClient(t, idp)
	cfg := c.cfg
	cfg.ClientID, cfg.ClientSecret, cfg.RedirectURL = clientID, secret, redirect
	cfg.Scopes = []string{"openid", "notes:read"}
	if secret == "" {
		cfg.Endpoint.AuthStyle = oauth2.AuthStyleInParams // a public client: client_id in the form
	}
	verifier := oauth2.GenerateVerifier()
	cb, err := idp.Login(t.Context(), cfg.AuthCodeURL("st4te", oauth2.S256ChallengeOption(verifier),
		oauth2.SetAuthURLParam("prompt", "consent"), oauth2.SetAuthURLParam("resource", resource)))
	if err != nil {
		t.Fatalf("login: %v\n%s", err, tail(idp.Logs()))
	}
	tok, err := cfg.Exchange(t.Context(), cb.Query().Get("code"), oauth2.VerifierOption(verifier),
		oauth2.SetAuthURLParam("resource", resource))
	if err != nil {
		t.Fatalf("exchanging the code: %v", err)
	}
	return tok
}

// TestTokenKindsThroughCaddyBinary (SECURITY.md, tokens of the wrong kind): with the MCP
// client's id listed in `audience`, as an IdP that sets aud = client id makes operators
// do, that client's real ID token never authenticates at the MCP endpoint, nor does a
// real token issued to the broker's own client; the client's real access token does.
// Real tokens of the Keycloak-like and Nextcloud-like oidc-provider profiles, through the
// caddy binary; the zitadel and background-token rows are flows'
// TestTokenVerifierRefusesOtherKindsOfToken and TestBackgroundTokenRefusedAtMCPEndpoint.
func TestTokenKindsThroughCaddyBinary(t *testing.T) {
	for _, profile := range []string{profileKeycloak, profileNextcloud} {
		t.Run(profile, func(t *testing.T) {
			requireInterop(t)
			idp := startNodeIdP(t, profile, nodeBrokerClient(), nodeNativeClient())
			up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
			upURL, _ := url.Parse(up.URL)
			caddy := startCaddy(t, progressiveSite(idp.Issuer, nodeBrokerClientID, nodeBrokerClientSecret,
				"openid notes:read", upURL.Host, "\t\taudience "+nodeNativeClientID))
			resource := caddy.Base + "/mcp"
			native := nodeClientLogin(t, idp, nodeNativeClientID, "", "http://127.0.0.1:49152/callback", resource)
			broker := nodeClientLogin(t, idp, nodeBrokerClientID, nodeBrokerClientSecret, "http://127.0.0.1:49152/oauth/callback", resource)
			idToken, _ := native.Extra("id_token").(string)
			brokerID, _ := broker.Extra("id_token").(string)
			if idToken == "" || brokerID == "" {
				t.Fatal("no id_token")
			}
			call := func(t *testing.T, token string) (int, int) {
				t.Helper()
				up.Reset()
				req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, resource,
					strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"e2e","version":"1"}}}`))
				req.Header.Set("Authorization", "Bearer "+token)
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Accept", "application/json, text/event-stream")
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				return resp.StatusCode, len(up.Seen())
			}
			for _, row := range []struct {
				name  string
				token string
			}{
				{"the client's ID token", idToken},
				{"the broker client's ID token", brokerID},
				{"an access token issued to the broker's client", broker.AccessToken},
			} {
				t.Run(row.name+" is refused", func(t *testing.T) {
					if status, seen := call(t, row.token); status != http.StatusUnauthorized || seen != 0 {
						t.Errorf("status %d, upstream saw %d requests; want 401 and nothing forwarded\n%s", status, seen, tail(caddy.logs.String()))
					}
				})
			}
			if profile == profileKeycloak {
				// The Nextcloud-like profile's opaque tokens carry no audience at all and are
				// refused for that (TestTSClientProgressiveNodeIdP).
				t.Run("the client's access token is accepted", func(t *testing.T) {
					if status, seen := call(t, native.AccessToken); status != http.StatusOK || seen != 1 {
						t.Errorf("status %d, upstream saw %d requests\n%s", status, seen, tail(caddy.logs.String()))
					}
				})
			}
		})
	}
}
