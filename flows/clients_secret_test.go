package flows

import (
	"encoding/base64"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// Configured clients with a secret (SECURITY.md S1.37): confidential at every endpoint
// that authenticates clients, public ones as before.

const (
	configuredBasicClient = "configured-agent"
	configuredPostClient  = "configured-post"
)

var (
	configuredBasicSecret = strings.Repeat("b7", 32) // as `openssl rand -hex 32` makes them
	configuredPostSecret  = strings.Repeat("c4", 32)
)

// withConfiguredSecretClients adds a client_secret_basic and a client_secret_post client.
func withConfiguredSecretClients(c *Config) {
	c.Clients = append(c.Clients,
		ClientConfig{ClientID: configuredBasicClient, RedirectURIs: []string{tokenTestRedirect}, Secret: configuredBasicSecret},
		ClientConfig{ClientID: configuredPostClient, RedirectURIs: []string{tokenTestRedirect}, Secret: configuredPostSecret, AuthMethod: AuthMethodPost})
}

// basicAuth is the Authorization header of client_secret_basic (RFC 6749 §2.3.1).
func basicAuth(id, secret string) http.Header {
	h := http.Header{}
	h.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(url.QueryEscape(id)+":"+url.QueryEscape(secret))))
	return h
}

func TestConfiguredConfidentialClient(t *testing.T) {
	e := newTokenEnv(t, testenv.SharedOP(t), withConfiguredSecretClients)
	e.remember(configuredBasicSecret, configuredPostSecret)
	withoutClientID := func(f url.Values) { f.Del("client_id") }
	for _, c := range e.b.cfg.Clients {
		if c.Secret != "" {
			t.Errorf("the broker keeps client %q's secret, not only its hash", c.ClientID)
		}
	}

	t.Run("the code grant with basic credentials", func(t *testing.T) {
		code, verifier := e.code(t, configuredBasicClient)
		tok := e.post(t, pathToken, exchangeForm(configuredBasicClient, code, verifier, withoutClientID),
			basicAuth(configuredBasicClient, configuredBasicSecret)).wantTokens(t)
		if tok.RefreshToken == "" {
			t.Fatal("no refresh token")
		}

		t.Run("refresh needs the secret", func(t *testing.T) {
			e.refresh(t, configuredBasicClient, tok.RefreshToken, nil).wantError(t, http.StatusUnauthorized, "invalid_client")
			form := url.Values{"grant_type": {grantRefreshToken}, "refresh_token": {tok.RefreshToken}}
			e.post(t, pathToken, form, basicAuth(configuredBasicClient, configuredBasicSecret)).wantTokens(t)
		})
		t.Run("revocation needs the secret", func(t *testing.T) {
			access := e.login(t).AccessToken // a token of another client: only the endpoint's authentication is under test
			form := url.Values{"client_id": {configuredBasicClient}, "token": {access}}
			e.post(t, pathRevoke, form, nil).wantError(t, http.StatusUnauthorized, "invalid_client")
			form.Del("client_id")
			if res := e.post(t, pathRevoke, form, basicAuth(configuredBasicClient, configuredBasicSecret)); res.status != http.StatusOK {
				t.Errorf("revocation with the secret: %d %+v", res.status, res.err)
			}
		})
	})

	t.Run("a wrong secret is 401 invalid_client and leaves the code redeemable", func(t *testing.T) {
		code, verifier := e.code(t, configuredBasicClient)
		wrong := strings.Repeat("b7", 31) + "b8"
		e.remember(wrong)
		res := e.post(t, pathToken, exchangeForm(configuredBasicClient, code, verifier, withoutClientID), basicAuth(configuredBasicClient, wrong))
		res.wantError(t, http.StatusUnauthorized, "invalid_client")
		if !strings.HasPrefix(res.header.Get("WWW-Authenticate"), "Basic ") {
			t.Errorf("WWW-Authenticate %q, want a Basic challenge", res.header.Get("WWW-Authenticate"))
		}
		e.post(t, pathToken, exchangeForm(configuredBasicClient, code, verifier, withoutClientID),
			basicAuth(configuredBasicClient, configuredBasicSecret)).wantTokens(t)
	})

	t.Run("no secret is 401 invalid_client", func(t *testing.T) {
		code, verifier := e.code(t, configuredBasicClient)
		e.exchange(t, configuredBasicClient, code, verifier, nil).wantError(t, http.StatusUnauthorized, "invalid_client")
	})

	t.Run("a basic client's secret in the form is 401 invalid_client", func(t *testing.T) {
		code, verifier := e.code(t, configuredBasicClient)
		e.exchange(t, configuredBasicClient, code, verifier, func(f url.Values) { f.Set("client_secret", configuredBasicSecret) }).
			wantError(t, http.StatusUnauthorized, "invalid_client")
	})

	t.Run("client_secret_post", func(t *testing.T) {
		code, verifier := e.code(t, configuredPostClient)
		e.post(t, pathToken, exchangeForm(configuredPostClient, code, verifier, withoutClientID), basicAuth(configuredPostClient, configuredPostSecret)).
			wantError(t, http.StatusUnauthorized, "invalid_client")
		e.exchange(t, configuredPostClient, code, verifier, func(f url.Values) { f.Set("client_secret", configuredBasicSecret) }).
			wantError(t, http.StatusUnauthorized, "invalid_client")
		e.exchange(t, configuredPostClient, code, verifier, func(f url.Values) { f.Set("client_secret", configuredPostSecret) }).wantTokens(t)
	})

	t.Run("a configured public client is unchanged", func(t *testing.T) {
		code, verifier := e.code(t, tokenTestOtherClient)
		e.exchange(t, tokenTestOtherClient, code, verifier, func(f url.Values) { f.Set("client_secret", configuredBasicSecret) }).
			wantError(t, http.StatusUnauthorized, "invalid_client")
		e.exchange(t, tokenTestOtherClient, code, verifier, nil).wantTokens(t)
	})
}

func TestConfiguredClientSecretChecks(t *testing.T) {
	long := strings.Repeat("x", MinClientSecretBytes)
	for _, tc := range []struct {
		name, method, secret, want, wantErr string
	}{
		{"no secret is public", "", "", AuthMethodNone, ""},
		{"none without a secret", AuthMethodNone, "", AuthMethodNone, ""},
		{"a secret defaults to basic", "", long, AuthMethodBasic, ""},
		{"post", AuthMethodPost, long, AuthMethodPost, ""},
		{"a secret one byte short", "", long[1:], "", "secret: want at least 32 bytes, got 31"},
		{"a secret on a public client", AuthMethodNone, long, "", "secret: set on a public client"},
		{"basic without a secret", AuthMethodBasic, "", "", "client_secret_basic needs a secret"},
		{"private_key_jwt", AuthMethodPrivateKeyJWT, long, "", `want client_secret_basic or client_secret_post, got "private_key_jwt"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CheckClientSecret(tc.method, tc.secret)
			switch {
			case tc.wantErr == "" && (err != nil || got != tc.want):
				t.Errorf("got %q, %v; want %q", got, err, tc.want)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("got %v, want an error containing %q", err, tc.wantErr)
			case err != nil && strings.Contains(err.Error(), long[1:]):
				t.Errorf("the error repeats the secret: %v", err)
			}
		})
	}
	if _, err := newClientRegistry([]ClientConfig{{ClientID: "short", Secret: "hunter2"}}, nil, false); err == nil ||
		!strings.Contains(err.Error(), `clients "short": secret: want at least 32 bytes`) || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("a configured client with a short secret: %v", err)
	}
}

// TestJWTBearerConfiguredClient: an agent the admin configured with a secret redeems
// ID-JAGs; the same client without its secret, and a configured public client, may not.
func TestJWTBearerConfiguredClient(t *testing.T) {
	e := newEMAEnv(t, withConfiguredSecretClients)
	e.remember(configuredBasicSecret, configuredPostSecret)
	agent := *e
	agent.client, agent.secret = configuredBasicClient, configuredBasicSecret

	tok := agent.redeem(t, e.ent.mint(e.ent.claims(e.clock.Now(), configuredBasicClient)), nil).wantTokens(t)
	p, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken)
	if err != nil {
		t.Fatal(err)
	}
	if p.Subject != "acme:alice" || p.ClientID != configuredBasicClient {
		t.Errorf("principal %+v", p)
	}

	t.Run("client_secret_post", func(t *testing.T) {
		form := url.Values{"grant_type": {grantJWTBearer}, "client_id": {configuredPostClient}, "client_secret": {configuredPostSecret},
			"assertion": {e.ent.mint(e.ent.claims(e.clock.Now(), configuredPostClient))}}
		e.post(t, pathToken, form, nil).wantTokens(t)
	})
	t.Run("without its secret", func(t *testing.T) {
		form := url.Values{"grant_type": {grantJWTBearer}, "client_id": {configuredBasicClient},
			"assertion": {e.ent.mint(e.ent.claims(e.clock.Now(), configuredBasicClient))}}
		e.post(t, pathToken, form, nil).wantError(t, http.StatusUnauthorized, "invalid_client")
	})
	t.Run("a configured public client", func(t *testing.T) {
		form := url.Values{"grant_type": {grantJWTBearer}, "client_id": {tokenTestOtherClient},
			"assertion": {e.ent.mint(e.ent.claims(e.clock.Now(), tokenTestOtherClient))}}
		e.post(t, pathToken, form, nil).wantError(t, http.StatusBadRequest, "unauthorized_client")
	})
	t.Run("an assertion for another client", func(t *testing.T) {
		agent.redeem(t, e.ent.mint(e.ent.claims(e.clock.Now(), configuredPostClient)), nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})
}

// TestConfiguredClientWithoutEnterpriseIssuers: the JWT bearer grant is not a configured
// client's when no enterprise issuer is trusted.
func TestConfiguredClientWithoutEnterpriseIssuers(t *testing.T) {
	reg, err := newClientRegistry([]ClientConfig{{ClientID: "a", Secret: configuredBasicSecret}}, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if c := reg.lookup("a"); c.AuthMethod != AuthMethodBasic || c.allowsGrantType(grantJWTBearer) || c.secretHash == "" {
		t.Errorf("client %+v", c)
	}
	reg, _ = newClientRegistry([]ClientConfig{{ClientID: "a", Secret: configuredBasicSecret}, {ClientID: "p"}}, nil, true)
	if !reg.lookup("a").allowsGrantType(grantJWTBearer) || reg.lookup("p").allowsGrantType(grantJWTBearer) {
		t.Error("with enterprise issuers, the grant is the confidential configured client's alone")
	}
}

// An agent the admin configures only for the JWT bearer grant needs no redirect URI: it
// redeems ID-JAGs, and the authorization endpoint refuses it, since no URI can match.
func TestJWTBearerConfiguredClientWithoutRedirectURI(t *testing.T) {
	const id = "redirectless-agent"
	secret := strings.Repeat("d9", 32)
	e := newEMAEnv(t, func(c *Config) {
		c.Clients = append(c.Clients, ClientConfig{ClientID: id, Secret: secret})
	})
	e.remember(secret)
	agent := *e
	agent.client, agent.secret = id, secret
	agent.redeem(t, e.ent.mint(e.ent.claims(e.clock.Now(), id)), nil).wantTokens(t)

	for name, redirect := range map[string]string{"without redirect_uri": "", "with one": tokenTestRedirect} {
		t.Run("authorize "+name, func(t *testing.T) {
			q := url.Values{"response_type": {"code"}, "client_id": {id}, "code_challenge": {"E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"},
				"code_challenge_method": {"S256"}, "state": {"s"}}
			if redirect != "" {
				q.Set("redirect_uri", redirect)
			}
			resp := getWithoutRedirect(t, e.front.URL+pathAuthorize+"?"+q.Encode())
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
				t.Errorf("authorize = %d, Location %q; want 400 and no redirect", resp.StatusCode, resp.Header.Get("Location"))
			}
		})
	}
}
