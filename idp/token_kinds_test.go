package idp

import (
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// loginTokens signs test-user in on o's login form as client and returns the whole token
// response: the access token and the ID token.
func loginTokens(t *testing.T, o *testenv.OP, clientID, secret string, scopes []string, resources ...string) (access, id string) {
	t.Helper()
	tok := o.LoginGrant(t, o.User, clientID, secret, scopes, resources...)
	id, _ = tok.Extra("id_token").(string)
	if id == "" {
		t.Fatal("no id_token")
	}
	return tok.AccessToken, id
}

// signTyped signs claims with the OP's own key under the JWS header typ given.
func signTyped(t *testing.T, o *testenv.OP, typ string, claims map[string]any) string {
	t.Helper()
	k := o.SigningKey()
	return testenv.SignJWS(t, k.Key, jose.SignatureAlgorithm(k.Algorithm), k.KeyID, typ, claims)
}

// TestTokenVerifierRefusesOtherKindsOfToken (SECURITY.md, tokens of the wrong kind): an
// operator whose IdP sets `aud` to the client id lists client ids as audiences; that
// client's ID tokens, and tokens issued to the broker's own client (its ID tokens,
// background and delegated tokens), must still never pass as an MCP client's access
// token. Real tokens of the in-process OP, and tokens shaped as other IdPs issue them.
func TestTokenVerifierRefusesOtherKindsOfToken(t *testing.T) {
	o := testenv.SharedOP(t)
	// The operator lists the MCP client's id, as an IdP with aud = client id makes one do.
	listed := func(c *VerifierConfig) { c.Audiences = append(c.Audiences, testenv.NativeClientID) }
	nativeAccess, nativeID := loginTokens(t, o, testenv.NativeClientID, "", []string{"openid", "notes:read"}, verifierResource)
	brokerAccess, brokerID := loginTokens(t, o, testenv.BrokerClientID, testenv.BrokerClientSecret, []string{"openid", "notes:read"}, verifierResource)
	claims := func(extra map[string]any) map[string]any {
		c := o.AccessTokenClaims(o.User.Subject, verifierResource, testenv.NativeClientID)
		for k, v := range extra {
			if v == nil {
				delete(c, k)
			} else {
				c[k] = v
			}
		}
		return c
	}

	for _, tc := range []struct {
		name   string
		token  string
		strict bool // require_jwt_access_token_type
		accept bool
	}{
		{"a real access token of the client is accepted", nativeAccess, false, true},
		{"a real ID token of the client is refused", nativeID, false, false},
		{"a real access token issued to the broker's own client is refused", brokerAccess, false, false},
		{"a real ID token of the broker's own client is refused", brokerID, false, false},
		{"a Keycloak ID token (typ ID in the payload) is refused", o.MintJWT(claims(map[string]any{"typ": "ID", "azp": testenv.NativeClientID, "scope": "openid"})), false, false},
		{"a Keycloak access token (typ Bearer, nonce) is accepted", o.MintJWT(claims(map[string]any{"typ": "Bearer", "azp": testenv.NativeClientID, "scope": "openid", "nonce": "n"})), false, true},
		{"an oidc-app ID token (aud and azp the client, no client_id) is refused", o.MintJWT(claims(map[string]any{"client_id": nil, "azp": testenv.NativeClientID, "auth_time": time.Now().Unix()})), false, false},
		{"an ID token with only c_hash is refused", o.MintJWT(claims(map[string]any{"client_id": testenv.NativeClientID, "c_hash": "x"})), false, false},
		{"an RFC 9068 access token is accepted", signTyped(t, o, "at+jwt", claims(map[string]any{"client_id": testenv.NativeClientID})), false, true},
		{"application/at+jwt is at+jwt", signTyped(t, o, "application/at+jwt", claims(map[string]any{"client_id": testenv.NativeClientID})), true, true},
		{"a logout token type is refused", signTyped(t, o, "logout+jwt", claims(map[string]any{"client_id": testenv.NativeClientID})), false, false},
		{"strict mode refuses typ JWT", nativeAccess, true, false},
		{"a token with azp the broker's client is refused", signTyped(t, o, "at+jwt", claims(map[string]any{"client_id": nil, "azp": testenv.BrokerClientID, "scope": "notes:read"})), false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newVerifierFor(o, func(c *VerifierConfig) {
				listed(c)
				c.RequireAccessTokenType = tc.strict
			})
			_, err := v.Verify(t.Context(), tc.token)
			if tc.accept && err != nil {
				t.Errorf("refused: %v", err)
			}
			if !tc.accept && err == nil {
				t.Error("accepted")
			}
		})
	}
}

// TestIntrospectionCacheTTL: an active introspection answer is cached at most
// IntrospectionCacheTTL, so an opaque token revoked at the IdP stops working within it,
// not at its exp.
func TestIntrospectionCacheTTL(t *testing.T) {
	o := testenv.SharedOP(t)
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	tok := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)

	t.Run("default is five minutes", func(t *testing.T) {
		if got := newVerifierFor(o, nil).cfg.IntrospectionCacheTTL; got != 5*time.Minute {
			t.Errorf("IntrospectionCacheTTL = %v", got)
		}
	})

	v := newVerifierFor(o, func(c *VerifierConfig) {
		c.Now = clock
		c.IntrospectionCacheTTL = time.Minute
	})
	if _, err := v.Verify(t.Context(), tok); err != nil {
		t.Fatalf("fresh opaque token: %v", err)
	}
	revoke(t, o, tok)
	now.Add(int64(50 * time.Second))
	if _, err := v.Verify(t.Context(), tok); err != nil {
		t.Errorf("within the cache TTL the cached verdict stands: %v", err)
	}
	now.Add(int64(11 * time.Second))
	if _, err := v.Verify(t.Context(), tok); err == nil {
		t.Error("a revoked opaque token is still accepted past the introspection cache TTL")
	}
}

func revoke(t *testing.T, o *testenv.OP, tok string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, o.RevocationEndpoint, strings.NewReader(url.Values{"token": {tok}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(testenv.OpaqueClientID, testenv.OpaqueClientSecret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revoking: %s", resp.Status)
	}
}
