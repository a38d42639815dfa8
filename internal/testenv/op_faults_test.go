package testenv

import (
	"slices"
	"strings"
	"testing"
)

func TestOPScopesRefusedAndAnswerFaults(t *testing.T) {
	o := StartOP(t, WithScopesRefused("notes:write"))
	p := loginParams{clientID: BrokerClientID, clientSecret: BrokerClientSecret,
		scopes: []string{"openid", "offline_access", "notes:read", "notes:write"}}

	t.Run("a refused scope is dropped silently", func(t *testing.T) {
		tok := loginTokens(t, o, p)
		if s, _ := tok.Extra("scope").(string); slices.Contains(strings.Fields(s), "notes:write") || !slices.Contains(strings.Fields(s), "notes:read") {
			t.Errorf("answer scope %q", s)
		}
		if c := jwtClaims(t, o, tok.AccessToken); c["scope"] != "openid offline_access notes:read" {
			t.Errorf("scope claim %v", c["scope"])
		}
	})
	t.Run("OmitAnswerScope drops scope from the answer", func(t *testing.T) {
		o.SetTokenAnswerFault(OmitAnswerScope())
		defer o.SetTokenAnswerFault(nil)
		if tok := loginTokens(t, o, p); tok.Extra("scope") != nil {
			t.Errorf("answer scope %v", tok.Extra("scope"))
		}
	})
	t.Run("ReissueAccessToken signs the changed claims with the OP's key", func(t *testing.T) {
		o.SetTokenAnswerFault(o.ReissueAccessToken("authorization_code", func(c map[string]any) { c["sub"] = "someone-else" }))
		defer o.SetTokenAnswerFault(nil)
		tok := loginTokens(t, o, p)
		if c := jwtClaims(t, o, tok.AccessToken); c["sub"] != "someone-else" || c["iss"] != o.Issuer {
			t.Errorf("claims %v", c)
		}
	})
}
