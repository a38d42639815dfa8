package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"golang.org/x/oauth2"
)

const tokenExchangeGrant = "urn:ietf:params:oauth:grant-type:token-exchange"

// nodeIdPClient is the broker's view of a Node IdP: discovery and the broker client's
// oauth2 config.
type nodeIdPClient struct {
	idp  *NodeIdP
	disc map[string]any
	cfg  oauth2.Config
}

func newNodeIdPClient(t *testing.T, idp *NodeIdP) *nodeIdPClient {
	t.Helper()
	disc, err := idp.Discovery(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return &nodeIdPClient{idp: idp, disc: disc, cfg: oauth2.Config{
		ClientID:     nodeBrokerClientID,
		ClientSecret: nodeBrokerClientSecret,
		RedirectURL:  "http://127.0.0.1:49152/oauth/callback",
		Endpoint: oauth2.Endpoint{
			AuthURL:   disc["authorization_endpoint"].(string),
			TokenURL:  disc["token_endpoint"].(string),
			AuthStyle: oauth2.AuthStyleInHeader,
		},
	}}
}

// login runs an authorization code flow with PKCE as the broker does (prompt=consent,
// as offline_access needs) and returns the tokens.
func (c *nodeIdPClient) login(t *testing.T, scopes []string, extra ...oauth2.AuthCodeOption) *oauth2.Token {
	t.Helper()
	cfg := c.cfg
	cfg.Scopes = scopes
	verifier := oauth2.GenerateVerifier()
	opts := append([]oauth2.AuthCodeOption{oauth2.S256ChallengeOption(verifier), oauth2.SetAuthURLParam("prompt", "consent")}, extra...)
	cb, err := c.idp.Login(t.Context(), cfg.AuthCodeURL("st4te", opts...))
	if err != nil {
		t.Fatalf("login: %v\n%s", err, tail(c.idp.Logs()))
	}
	q := cb.Query()
	if q.Get("code") == "" || q.Get("state") != "st4te" || q.Get("iss") != c.idp.Issuer {
		t.Fatalf("callback %s", cb.Redacted())
	}
	tok, err := cfg.Exchange(t.Context(), q.Get("code"), oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatalf("exchanging the code: %v", err)
	}
	return tok
}

// as is c acting as another client of the IdP.
func (c *nodeIdPClient) as(clientID, secret string) *nodeIdPClient {
	other := *c
	other.cfg.ClientID, other.cfg.ClientSecret = clientID, secret
	return &other
}

// postForm POSTs form to the IdP endpoint named in discovery, as c's client, and decodes
// the JSON answer.
func (c *nodeIdPClient) postForm(t *testing.T, endpoint string, form url.Values) (int, map[string]any) {
	t.Helper()
	return c.postFormHost(t, endpoint, "", form)
}

// postFormHost is postForm with the Host header set to host (when not empty), as a
// request through a proxy or by another name would carry.
func (c *nodeIdPClient) postFormHost(t *testing.T, endpoint, host string, form url.Values) (int, map[string]any) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, c.disc[endpoint].(string), strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(c.cfg.ClientID, c.cfg.ClientSecret)
	if host != "" {
		req.Host = host
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatalf("%s: %s: %s", endpoint, resp.Status, body)
	}
	return resp.StatusCode, out
}

// jwtClaims verifies a JWT with the IdP's keys and returns its claims; iss must be the
// IdP's issuer.
func (c *nodeIdPClient) jwtClaims(t *testing.T, token string) map[string]any {
	t.Helper()
	claims := c.jwtClaimsAnyIssuer(t, token)
	if claims["iss"] != c.idp.Issuer {
		t.Errorf("iss %v", claims["iss"])
	}
	return claims
}

// jwtClaimsAnyIssuer verifies a JWT with the IdP's keys and returns its claims.
func (c *nodeIdPClient) jwtClaimsAnyIssuer(t *testing.T, token string) map[string]any {
	t.Helper()
	keys := oidc.NewRemoteKeySet(t.Context(), c.disc["jwks_uri"].(string))
	payload, err := keys.VerifySignature(t.Context(), token)
	if err != nil {
		t.Fatalf("verifying a JWT of the IdP: %v", err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	return claims
}

// jwtHeader is the decoded protected header of a compact JWS.
func jwtHeader(t *testing.T, token string) map[string]any {
	t.Helper()
	raw, err := base64.RawURLEncoding.DecodeString(strings.SplitN(token, ".", 2)[0])
	var h map[string]any
	if err != nil || json.Unmarshal(raw, &h) != nil {
		t.Fatalf("JWT header: %v", err)
	}
	return h
}

// advanceClock moves the Node IdP's clock forward (POST /test/clock).
func (n *NodeIdP) advanceClock(t *testing.T, d time.Duration) {
	t.Helper()
	resp, err := http.Post(fmt.Sprintf("%s/test/clock?advance=%d", n.Issuer, int(d.Seconds())), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("moving the IdP's clock: %s", resp.Status)
	}
}

func audiences(claims map[string]any) []string {
	switch a := claims["aud"].(type) {
	case string:
		return []string{a}
	case []any:
		var out []string
		for _, v := range a {
			out = append(out, fmt.Sprint(v))
		}
		return out
	}
	return nil
}

func grantTypes(disc map[string]any) []string {
	var out []string
	for _, g := range disc["grant_types_supported"].([]any) {
		out = append(out, g.(string))
	}
	return out
}

var brokerScopes = []string{"openid", "offline_access", "notes:read", "notes:write"}

// Clients of the Nextcloud-like IdP whose `oidc` app token type is JWT: one with no
// resource identifier, one with.
const (
	nodeJWTClientID           = "nc-jwt"
	nodeJWTResourceClientID   = "nc-jwt-resource"
	nodeJWTClientSecret       = "node-idp-jwt-secret-0123456789"
	nodeJWTResourceIdentifier = "https://mcp.example.test"
)

// nodeJWTClient is a confidential client of the Nextcloud-like IdP, meant to be given the
// token type jwt ("tokenTypes" in idp.mjs's config).
func nodeJWTClient(clientID string) nodeClient {
	c := nodeBrokerClient()
	c["client_id"], c["client_secret"] = clientID, nodeJWTClientSecret
	return c
}

// TestNodeIdPNextcloudProfile: the oidc-provider IdP configured like Nextcloud's oidc app
// 2.0.9 (interop/idp.mjs) behaves as the app does and as the broker's refresh fallback
// expects: no RFC 8693 in discovery, and token exchange answered invalid_grant; opaque
// access tokens (the default token type) that introspect active for 900 s; for a client
// of token type JWT, RS256 access tokens carrying the whole grant (openid included) whose
// aud is fixed at authorization (the resource, else the client's resource identifier,
// else its client id) and whose iss is the scheme and Host of the token request; refresh
// tokens only with offline_access, ignoring scope and resource, rotated on every use
// without grace (the old one is refused, the new one unharmed), and dead expireTime +
// refreshExpireTime (1800 s) after issue; token answers without scope, with
// refresh_expires_in; a scope the client is not allowed dropped without an error.
func TestNodeIdPNextcloudProfile(t *testing.T) {
	idp := startNodeIdPConfig(t, profileNextcloud, map[string]any{
		"clients":       []nodeClient{nodeBrokerClient(), nodeRSClient(), nodeJWTClient(nodeJWTClientID), nodeJWTClient(nodeJWTResourceClientID)},
		"allowedScopes": map[string]string{nodeRSClientID: "openid notes:read"},
		"tokenTypes":    map[string]string{nodeJWTClientID: "jwt", nodeJWTResourceClientID: "jwt"},
		"resourceUrls":  map[string]string{nodeJWTResourceClientID: nodeJWTResourceIdentifier},
	})
	c := newNodeIdPClient(t, idp)
	jc := c.as(nodeJWTClientID, nodeJWTClientSecret)
	introspect := func(t *testing.T, token string) map[string]any {
		t.Helper()
		status, in := c.postForm(t, "introspection_endpoint", url.Values{"token": {token}})
		if status != http.StatusOK || in["active"] != true {
			t.Fatalf("introspection %d %v", status, in)
		}
		return in
	}
	refresh := func(t *testing.T, c *nodeIdPClient, rt string, extra url.Values) (int, map[string]any) {
		t.Helper()
		form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}}
		for k, v := range extra {
			form[k] = v
		}
		return c.postForm(t, "token_endpoint", form)
	}

	t.Run("discovery has introspection and no token exchange", func(t *testing.T) {
		if slices.Contains(grantTypes(c.disc), tokenExchangeGrant) {
			t.Errorf("grant_types_supported %v", grantTypes(c.disc))
		}
		if c.disc["introspection_endpoint"] == nil || c.disc["revocation_endpoint"] == nil {
			t.Errorf("introspection %v revocation %v", c.disc["introspection_endpoint"], c.disc["revocation_endpoint"])
		}
	})

	tok := c.login(t, brokerScopes)
	t.Run("access token is opaque and introspects active for 900 s", func(t *testing.T) {
		if jwtShape.MatchString(tok.AccessToken) {
			t.Fatalf("access token is a JWT")
		}
		status, in := c.postForm(t, "introspection_endpoint", url.Values{"token": {tok.AccessToken}})
		if status != http.StatusOK || in["active"] != true || in["sub"] != nodeUser || in["client_id"] != nodeBrokerClientID {
			t.Fatalf("introspection %d %v", status, in)
		}
		if life := in["exp"].(float64) - in["iat"].(float64); life != 900 {
			t.Errorf("access token lives %vs", life)
		}
		for _, s := range []string{"notes:read", "notes:write"} {
			if !slices.Contains(strings.Fields(fmt.Sprint(in["scope"])), s) {
				t.Errorf("scope %v lacks %s", in["scope"], s)
			}
		}
	})

	t.Run("refresh ignores scope, rotates, and the old refresh token is refused without harm to the new", func(t *testing.T) {
		if tok.RefreshToken == "" {
			t.Fatal("no refresh token with offline_access")
		}
		before := introspect(t, tok.AccessToken)["scope"]
		status, fresh := refresh(t, c, tok.RefreshToken, url.Values{"scope": {"openid notes:read"}})
		if status != http.StatusOK || fresh["refresh_token"] == nil || fresh["refresh_token"] == tok.RefreshToken {
			t.Fatalf("refresh: %d %v", status, fresh)
		}
		if _, said := fresh["scope"]; said {
			t.Errorf("refresh answer has scope %v", fresh["scope"])
		}
		if fresh["refresh_expires_in"] != float64(900) {
			t.Errorf("refresh_expires_in %v", fresh["refresh_expires_in"])
		}
		if in := introspect(t, fresh["access_token"].(string)); in["scope"] != before {
			t.Errorf("refresh asking for less gave scope %v, want the grant's %v", in["scope"], before)
		}
		status, again := refresh(t, c, tok.RefreshToken, nil)
		if status != http.StatusBadRequest || again["error"] != "invalid_grant" {
			t.Errorf("reusing the rotated refresh token: %d %v", status, again)
		}
		if status, next := refresh(t, c, fresh["refresh_token"].(string), nil); status != http.StatusOK {
			t.Errorf("the new refresh token after the old one was replayed: %d %v", status, next)
		}
	})

	t.Run("token answers carry no scope", func(t *testing.T) {
		if s := tok.Extra("scope"); s != nil {
			t.Errorf("code answer has scope %v", s)
		}
	})

	t.Run("a scope the client is not allowed is dropped without an error", func(t *testing.T) {
		rs := c.as(nodeRSClientID, nodeRSClientSecret)
		rs.cfg.RedirectURL = "http://127.0.0.1/unused"
		tok := rs.login(t, []string{"openid", "notes:read", "notes:write"})
		if in := introspect(t, tok.AccessToken); in["scope"] != "openid notes:read" {
			t.Errorf("scope %v, want notes:write dropped", in["scope"])
		}
	})

	t.Run("token exchange is refused as an invalid grant", func(t *testing.T) {
		status, out := c.postForm(t, "token_endpoint", url.Values{"grant_type": {tokenExchangeGrant}, "subject_token": {tok.AccessToken},
			"subject_token_type": {"urn:ietf:params:oauth:token-type:access_token"}, "audience": {"nextcloud"}})
		if status != http.StatusBadRequest || out["error"] != "invalid_grant" {
			t.Errorf("token exchange: %d %v", status, out)
		}
	})

	t.Run("no refresh token without offline_access", func(t *testing.T) {
		if tok := c.login(t, []string{"openid", "notes:read"}); tok.RefreshToken != "" {
			t.Errorf("refresh token issued without offline_access")
		}
	})

	jwtScopes := []string{"openid", "offline_access", "notes:read"}
	jtok := jc.login(t, jwtScopes)
	t.Run("a JWT client's access token is RS256 and carries the whole grant for aud = its client id", func(t *testing.T) {
		if h := jwtHeader(t, jtok.AccessToken); h["alg"] != "RS256" || !strings.EqualFold(fmt.Sprint(h["typ"]), "at+jwt") || h["kid"] == nil {
			t.Errorf("header %v", h)
		}
		claims := jc.jwtClaims(t, jtok.AccessToken)
		if !slices.Equal(audiences(claims), []string{nodeJWTClientID}) || claims["sub"] != nodeUser ||
			claims["client_id"] != nodeJWTClientID || claims["azp"] != nodeJWTClientID || claims["preferred_username"] != nodeUser {
			t.Errorf("claims %v", claims)
		}
		if got := strings.Fields(fmt.Sprint(claims["scope"])); !sameSet(got, jwtScopes) {
			t.Errorf("scope %v, want %v", claims["scope"], jwtScopes)
		}
		if life := claims["exp"].(float64) - claims["iat"].(float64); life != 900 {
			t.Errorf("access token lives %vs", life)
		}
		if s := jtok.Extra("scope"); s != nil {
			t.Errorf("code answer has scope %v", s)
		}
	})

	t.Run("aud is the resource, else the client's resource identifier", func(t *testing.T) {
		const resource = "http://127.0.0.1:49153/mcp"
		if aud := audiences(jc.jwtClaims(t, jc.login(t, jwtScopes, oauth2.SetAuthURLParam("resource", resource)).AccessToken)); !slices.Equal(aud, []string{resource}) {
			t.Errorf("aud %v, want the resource", aud)
		}
		withID := c.as(nodeJWTResourceClientID, nodeJWTClientSecret)
		if aud := audiences(withID.jwtClaims(t, withID.login(t, jwtScopes).AccessToken)); !slices.Equal(aud, []string{nodeJWTResourceIdentifier}) {
			t.Errorf("aud %v, want the resource identifier", aud)
		}
	})

	t.Run("aud is fixed at authorization: resource at the token endpoint and at refresh is ignored", func(t *testing.T) {
		const resource = "http://127.0.0.1:49153/mcp"
		cfg := jc.cfg
		cfg.Scopes = jwtScopes
		verifier := oauth2.GenerateVerifier()
		cb, err := idp.Login(t.Context(), cfg.AuthCodeURL("st4te", oauth2.S256ChallengeOption(verifier), oauth2.SetAuthURLParam("prompt", "consent"),
			oauth2.SetAuthURLParam("resource", resource)))
		if err != nil {
			t.Fatal(err)
		}
		tok, err := cfg.Exchange(t.Context(), cb.Query().Get("code"), oauth2.VerifierOption(verifier), oauth2.SetAuthURLParam("resource", "https://elsewhere.example.test"))
		if err != nil {
			t.Fatalf("code with another resource: %v", err)
		}
		if aud := audiences(jc.jwtClaims(t, tok.AccessToken)); !slices.Equal(aud, []string{resource}) {
			t.Errorf("aud %v after the token endpoint named another resource", aud)
		}
		status, fresh := refresh(t, jc, tok.RefreshToken, url.Values{"resource": {"https://elsewhere.example.test"}, "scope": {"openid"}})
		if status != http.StatusOK {
			t.Fatalf("refresh: %d %v", status, fresh)
		}
		claims := jc.jwtClaims(t, fresh["access_token"].(string))
		if aud := audiences(claims); !slices.Equal(aud, []string{resource}) || !sameSet(strings.Fields(fmt.Sprint(claims["scope"])), jwtScopes) {
			t.Errorf("refreshed aud %v scope %v, want the authorization's", aud, claims["scope"])
		}
	})

	t.Run("iss is the scheme and Host of the token request", func(t *testing.T) {
		host := "localhost" + strings.TrimPrefix(idp.Issuer, "http://127.0.0.1")
		tok := jc.login(t, jwtScopes)
		status, fresh := jc.postFormHost(t, "token_endpoint", host, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {tok.RefreshToken}})
		if status != http.StatusOK {
			t.Fatalf("refresh: %d %v", status, fresh)
		}
		if iss := jc.jwtClaimsAnyIssuer(t, fresh["access_token"].(string))["iss"]; iss != "http://"+host {
			t.Errorf("iss %v, want http://%s", iss, host)
		}
	})

	// Last: it moves the IdP's clock.
	t.Run("a refresh token dies expireTime + refreshExpireTime after issue", func(t *testing.T) {
		tok := jc.login(t, jwtScopes)
		idp.advanceClock(t, 1790*time.Second)
		status, fresh := refresh(t, jc, tok.RefreshToken, nil)
		if status != http.StatusOK {
			t.Fatalf("refresh 1790 s after issue: %d %v", status, fresh)
		}
		idp.advanceClock(t, 1801*time.Second)
		if status, out := refresh(t, jc, fresh["refresh_token"].(string), nil); status != http.StatusBadRequest || out["error"] != "invalid_grant" {
			t.Errorf("refresh 1801 s after issue: %d %v", status, out)
		}
	})
}

// sameSet reports whether a and b hold the same strings, in any order.
func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}

// TestNodeIdPKeycloakProfile: the oidc-provider IdP configured like Keycloak issues JWT
// access tokens whose aud is the RFC 8707 resource (or its default audience), and
// exchanges them (RFC 8693) for a token of another audience with narrowed scopes.
func TestNodeIdPKeycloakProfile(t *testing.T) {
	idp := startNodeIdP(t, profileKeycloak, nodeBrokerClient())
	c := newNodeIdPClient(t, idp)

	t.Run("discovery advertises token exchange", func(t *testing.T) {
		if !slices.Contains(grantTypes(c.disc), tokenExchangeGrant) {
			t.Errorf("grant_types_supported %v", grantTypes(c.disc))
		}
	})

	tok := c.login(t, brokerScopes)
	claims := c.jwtClaims(t, tok.AccessToken)
	t.Run("access token is a JWT for the default audience", func(t *testing.T) {
		if !slices.Equal(audiences(claims), []string{idp.DefaultAudience}) || claims["sub"] != nodeUser || claims["client_id"] != nodeBrokerClientID {
			t.Errorf("claims %v", claims)
		}
		if claims["scope"] != "notes:read notes:write" {
			t.Errorf("scope %v", claims["scope"])
		}
	})

	t.Run("resource becomes aud", func(t *testing.T) {
		const resource = "http://127.0.0.1:49153/mcp"
		tok := c.login(t, brokerScopes, oauth2.SetAuthURLParam("resource", resource))
		if aud := audiences(c.jwtClaims(t, tok.AccessToken)); !slices.Equal(aud, []string{resource}) {
			t.Errorf("aud %v, want the resource", aud)
		}
	})

	exchange := func(t *testing.T, subject string, extra url.Values) (int, map[string]any) {
		form := url.Values{"grant_type": {tokenExchangeGrant}, "subject_token": {subject},
			"subject_token_type": {"urn:ietf:params:oauth:token-type:access_token"}}
		for k, v := range extra {
			form[k] = v
		}
		return c.postForm(t, "token_endpoint", form)
	}
	t.Run("token exchange yields a JWT for the audience with narrowed scope", func(t *testing.T) {
		status, out := exchange(t, tok.AccessToken, url.Values{"audience": {"nextcloud"}, "scope": {"notes:read"}})
		if status != http.StatusOK || out["issued_token_type"] != "urn:ietf:params:oauth:token-type:access_token" {
			t.Fatalf("exchange: %d %v", status, out)
		}
		got := c.jwtClaims(t, out["access_token"].(string))
		if !slices.Equal(audiences(got), []string{"nextcloud"}) || got["scope"] != "notes:read" || got["sub"] != nodeUser {
			t.Errorf("exchanged claims %v", got)
		}
		if exp := time.Unix(int64(got["exp"].(float64)), 0); time.Until(exp) > 5*time.Minute+5*time.Second {
			t.Errorf("exchanged token expires at %v", exp)
		}
	})
	t.Run("token exchange refuses scopes the subject lacks", func(t *testing.T) {
		narrow, out := exchange(t, tok.AccessToken, url.Values{"audience": {"nextcloud"}, "scope": {"notes:read"}})
		if narrow != http.StatusOK {
			t.Fatalf("exchange: %v", out)
		}
		status, out := exchange(t, out["access_token"].(string), url.Values{"audience": {"nextcloud"}, "scope": {"notes:write"}})
		if status != http.StatusBadRequest || out["error"] != "invalid_scope" {
			t.Errorf("widening exchange: %d %v", status, out)
		}
	})
	t.Run("token exchange refuses a forged subject token", func(t *testing.T) {
		parts := strings.Split(tok.AccessToken, ".")
		forged := parts[0] + "." + parts[1] + "." + strings.Repeat("A", len(parts[2]))
		if status, out := exchange(t, forged, url.Values{"audience": {"nextcloud"}}); status != http.StatusBadRequest || out["error"] != "invalid_grant" {
			t.Errorf("forged subject: %d %v", status, out)
		}
	})

	t.Run("refresh keeps the audience", func(t *testing.T) {
		fresh, err := c.cfg.TokenSource(context.Background(), &oauth2.Token{RefreshToken: tok.RefreshToken}).Token()
		if err != nil {
			t.Fatal(err)
		}
		if aud := audiences(c.jwtClaims(t, fresh.AccessToken)); !slices.Equal(aud, []string{idp.DefaultAudience}) {
			t.Errorf("refreshed aud %v", aud)
		}
	})
}
