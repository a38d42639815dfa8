package testenv

import (
	"encoding/json"
	"net/http"
	"slices"
	"testing"

	jose "github.com/go-jose/go-jose/v4"
)

// WithSigningAlgorithm: the JWKS holds one key of the algorithm, discovery names it, and
// the tokens of a real login and MintJWT are signed with it.
func TestWithSigningAlgorithm(t *testing.T) {
	for _, alg := range []jose.SignatureAlgorithm{jose.ES256, jose.ES512, jose.PS256, jose.EdDSA} {
		t.Run(string(alg), func(t *testing.T) {
			o := StartOP(t, WithSigningAlgorithm(alg))

			var jwks jose.JSONWebKeySet
			getJSON(t, o.JWKSURI, &jwks)
			if len(jwks.Keys) != 1 || jwks.Keys[0].Algorithm != string(alg) || !jwks.Keys[0].IsPublic() ||
				jwks.Keys[0].KeyID != o.SigningKey().KeyID {
				t.Fatalf("JWKS %+v, want one public %s key", jwks.Keys, alg)
			}
			var disc struct {
				Algs []string `json:"id_token_signing_alg_values_supported"`
			}
			getJSON(t, o.Issuer+"/.well-known/openid-configuration", &disc)
			if !slices.Equal(disc.Algs, []string{string(alg)}) {
				t.Errorf("discovery names %v, want [%s]", disc.Algs, alg)
			}

			tok := loginTokens(t, o, loginParams{clientID: BrokerClientID, clientSecret: BrokerClientSecret, scopes: []string{"openid"}})
			idToken, _ := tok.Extra("id_token").(string)
			for name, raw := range map[string]string{
				"ID token": idToken, "access token": tok.AccessToken, "MintJWT": o.MintJWT(o.AccessTokenClaims(o.User.Subject, "x")),
			} {
				jws, err := jose.ParseSignedCompact(raw, []jose.SignatureAlgorithm{alg})
				if err != nil {
					t.Errorf("%s: %v", name, err)
					continue
				}
				if jwtClaims(t, o, raw)["sub"] != o.User.Subject || jws.Signatures[0].Header.KeyID != jwks.Keys[0].KeyID {
					t.Errorf("%s: wrong subject or key", name)
				}
			}
		})
	}
	t.Run("an algorithm without a key type is refused", func(t *testing.T) {
		if o, err := NewOP(WithSigningAlgorithm(jose.HS256)); err == nil {
			o.Close()
			t.Fatal("NewOP accepted HS256")
		}
	})
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("decoding %s: %v", url, err)
	}
}
