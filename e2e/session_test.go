package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// delegationNoneSite is a hybrid site in front of an IdP with the broker's client there,
// with delegation none (the upstream trusts the subject header) and a pre-registered
// client; extra lines go inside mcp_oauth.
func delegationNoneSite(issuer, clientID, clientSecret, upstream, extra string) string {
	up, _ := url.Parse(upstream)
	return fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:{port}/mcp
		scopes openid notes:read notes:write
		encryption_key %s
		client preregistered {
			redirect_uri http://127.0.0.1/callback
		}
		delegation none
%s
	}
	reverse_proxy %s
}`, issuer, clientID, clientSecret, testKey, extra, up.Host)
}

// With delegation none only the broker's refresh asks the IdP about the user: a user
// disabled at the IdP is signed out at the next confirming refresh, with every broker
// token of the grant (SECURITY.md, revocation at the IdP).
func TestHybridIdPRefusalEndsSessionThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	// Every refresh confirms: the binary's clock cannot be moved.
	caddy := startCaddy(t, delegationNoneSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, up.URL, "\t\tidp_confirm_interval 1ms"))
	br := newBrowser(o)
	_, tok := connectPreregistered(t, caddy.Base, br)
	cfg := oauth2.Config{ClientID: "preregistered", Endpoint: oauth2.Endpoint{TokenURL: caddy.Base + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams}}
	before := o.Count("refresh_token")
	fresh, err := cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: tok.RefreshToken}).Token()
	if err != nil {
		t.Fatalf("refreshing: %v", err)
	}
	if o.Count("refresh_token") != before+1 {
		t.Errorf("the refresh did not confirm the grant at the IdP")
	}
	if resp := bearerGet(t, caddy.Base+"/mcp", fresh.AccessToken); resp.StatusCode == http.StatusUnauthorized {
		t.Fatalf("refreshed token refused: %s", resp.Status)
	}

	o.DisableUser(o.User, true)
	_, err = cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: fresh.RefreshToken}).Token()
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) || re.ErrorCode != "invalid_grant" {
		t.Fatalf("refresh after the IdP disabled the user: %v, want invalid_grant", err)
	}
	if resp := bearerGet(t, caddy.Base+"/mcp", fresh.AccessToken); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("access token after the session ended: %s, want 401", resp.Status)
	}
	o.DisableUser(o.User, false) // the broker has forgotten the grant: no way back
	if _, err := cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: fresh.RefreshToken}).Token(); err == nil {
		t.Error("the ended session's refresh token works again")
	}
	caddy.assertLogsFree(append(br.codes, tok.AccessToken, tok.RefreshToken, fresh.AccessToken, fresh.RefreshToken,
		testenv.BrokerClientSecret, testKey)...)
}

// The token and revocation endpoints are limited per client IP as Caddy resolves it
// behind trusted proxies: one address is cut off, another is not.
func TestTokenEndpointRateLimitKeyedOnCaddyClientIP(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	caddy := startCaddy(t, delegationNoneSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, up.URL, ""), withGlobal("\tservers {\n\t\ttrusted_proxies static 127.0.0.1/8\n\t}"))
	revoke := func(forwardedFor string) *http.Response {
		req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, caddy.Base+"/oauth/revoke",
			strings.NewReader(url.Values{"client_id": {"preregistered"}, "token": {"garbage"}}.Encode()))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("X-Forwarded-For", forwardedFor)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	// The bucket refills two requests a second while this runs: the limit shows within
	// a few requests past 120, never before.
	const perIP = 120 // README, "Hybrid mode"
	limitedAt := 0
	for i := 1; i <= perIP+20 && limitedAt == 0; i++ {
		switch resp := revoke("203.0.113.1"); resp.StatusCode {
		case http.StatusOK:
		case http.StatusTooManyRequests:
			if resp.Header.Get("Retry-After") == "" {
				t.Error("429 without Retry-After")
			}
			limitedAt = i
		default:
			t.Fatalf("revocation %d: %s", i, resp.Status)
		}
	}
	if limitedAt <= perIP {
		t.Fatalf("first 429 at request %d, want after %d", limitedAt, perIP)
	}
	if resp := revoke("203.0.113.2"); resp.StatusCode != http.StatusOK {
		t.Errorf("another client address: %s", resp.Status)
	}
}

// The same with the Nextcloud-like IdP (oidc-provider): the grant revoked there ends the
// broker's session at its next confirming refresh, with its broker tokens.
func TestInteropNextcloudRevokedGrantEndsSession(t *testing.T) {
	requireInterop(t)
	idp := startNodeIdP(t, profileNextcloud, nodeBrokerClient())
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	caddy := startCaddy(t, delegationNoneSite(idp.Issuer, nodeBrokerClientID, nodeBrokerClientSecret, up.URL, "\t\tidp_confirm_interval 1ms"))
	cfg := brokerClient(t, caddy, "e2e revocation client")
	authURL, verifier := brokerAuthorizeURL(cfg, caddy)
	br := newNodeHybridBrowser(idp)
	final, err := br.login(t.Context(), authURL)
	if err != nil {
		t.Fatalf("hybrid login: %v\n%s", err, tail(caddy.logs.String()))
	}
	tok, err := cfg.Exchange(t.Context(), final.Query().Get("code"), oauth2.VerifierOption(verifier),
		oauth2.SetAuthURLParam("resource", caddy.Base+"/mcp"))
	if err != nil {
		t.Fatalf("code at the broker: %v", err)
	}
	fresh, err := cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: tok.RefreshToken}).Token()
	if err != nil {
		t.Fatalf("refreshing (the IdP grant confirmed): %v\n%s", err, tail(caddy.logs.String()))
	}
	if resp := bearerGet(t, caddy.Base+"/mcp", fresh.AccessToken); resp.StatusCode == http.StatusUnauthorized {
		t.Fatalf("refreshed token refused: %s", resp.Status)
	}

	resp, err := http.Post(idp.Issuer+"/test/revoke-grants?sub="+url.QueryEscape(nodeUser), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	var revoked struct{ Revoked int }
	json.NewDecoder(resp.Body).Decode(&revoked)
	resp.Body.Close()
	if revoked.Revoked == 0 {
		t.Fatalf("the IdP revoked no grant of %s", nodeUser)
	}
	_, err = cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: fresh.RefreshToken}).Token()
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) || re.ErrorCode != "invalid_grant" {
		t.Fatalf("refresh after the IdP revoked the grant: %v, want invalid_grant", err)
	}
	if resp := bearerGet(t, caddy.Base+"/mcp", fresh.AccessToken); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("access token after the session ended: %s, want 401", resp.Status)
	}
	caddy.assertLogsFree(append(br.codes, tok.AccessToken, tok.RefreshToken, fresh.AccessToken, fresh.RefreshToken,
		nodeBrokerClientSecret, testKey)...)
}

// TestHybridIdPWithdrawnScopeThroughCaddyBinary: a scope the IdP withdraws after the login
// is gone from the broker's tokens at the next refresh that confirms the grant.
func TestHybridIdPWithdrawnScopeThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	caddy := startCaddy(t, delegationNoneSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, up.URL, "\t\tidp_confirm_interval 1ms"))
	br := newBrowser(o)
	_, tok := connectPreregistered(t, caddy.Base, br)
	if s, _ := tok.Extra("scope").(string); !slices.Contains(strings.Fields(s), "notes:write") {
		t.Fatalf("login scope %q", s)
	}
	o.SetTokenAnswerFault(testenv.SetAnswerScope("refresh_token", "openid offline_access notes:read"))
	defer o.SetTokenAnswerFault(nil)
	cfg := oauth2.Config{ClientID: "preregistered", Endpoint: oauth2.Endpoint{TokenURL: caddy.Base + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams}}
	fresh, err := cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: tok.RefreshToken}).Token()
	if err != nil {
		t.Fatalf("refreshing: %v", err)
	}
	if s, _ := fresh.Extra("scope").(string); slices.Contains(strings.Fields(s), "notes:write") || !slices.Contains(strings.Fields(s), "notes:read") {
		t.Errorf("after the IdP withdrew notes:write the refresh grants %q", s)
	}
	caddy.assertLogsFree(append(br.codes, tok.AccessToken, tok.RefreshToken, fresh.AccessToken, fresh.RefreshToken,
		testenv.BrokerClientSecret, testKey)...)
}
