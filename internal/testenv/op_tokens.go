package testenv

import (
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"

	"golang.org/x/oauth2"
)

// UnusedRedirectURI is a redirect URI nobody listens on: a test's Login stops before it.
const UnusedRedirectURI = "http://127.0.0.1:49152/callback"

var (
	sharedOPOnce sync.Once
	sharedOPVal  *OP
	sharedOPErr  error
)

// SharedOP is the OP shared by a package's tests that neither count its requests nor
// take it down or change it, started on first use and left running until the test
// binary exits.
func SharedOP(tb testing.TB) *OP {
	tb.Helper()
	sharedOPOnce.Do(func() { sharedOPVal, sharedOPErr = NewOP() })
	if sharedOPErr != nil {
		tb.Fatalf("starting OP: %v", sharedOPErr)
	}
	return sharedOPVal
}

// LoginGrant signs user in on o's login form as clientID (with secret, if not empty) and
// redeems the code with PKCE, returning the whole token answer; resources, if any,
// become the access token's audience.
func (o *OP) LoginGrant(tb testing.TB, user User, clientID, secret string, scopes []string, resources ...string) *oauth2.Token {
	tb.Helper()
	cfg := oauth2.Config{
		ClientID:     clientID,
		ClientSecret: secret,
		Endpoint:     o.Endpoint(),
		RedirectURL:  UnusedRedirectURI,
		Scopes:       scopes,
	}
	verifier := oauth2.GenerateVerifier()
	opts := []oauth2.AuthCodeOption{oauth2.S256ChallengeOption(verifier)}
	for _, r := range resources {
		opts = append(opts, oauth2.SetAuthURLParam("resource", r))
	}
	callback, err := o.Login(tb.Context(), cfg.AuthCodeURL("state", opts...), LoginAs(user))
	if err != nil {
		tb.Fatalf("logging in: %v", err)
	}
	tok, err := cfg.Exchange(tb.Context(), callback.Query().Get("code"), oauth2.VerifierOption(verifier))
	if err != nil {
		tb.Fatalf("exchanging code: %v", err)
	}
	return tok
}

// LoginAccessToken is the access token LoginGrant obtains for o.User.
func (o *OP) LoginAccessToken(tb testing.TB, clientID, secret string, scopes []string, resources ...string) string {
	tb.Helper()
	return o.LoginGrant(tb, o.User, clientID, secret, scopes, resources...).AccessToken
}

// RevokedOpaqueToken is an opaque access token of o for resource that its client has
// revoked.
func (o *OP) RevokedOpaqueToken(tb testing.TB, resource string) string {
	tb.Helper()
	tok := o.LoginAccessToken(tb, OpaqueClientID, OpaqueClientSecret, []string{"openid"}, resource)
	req, err := http.NewRequestWithContext(tb.Context(), http.MethodPost, o.RevocationEndpoint,
		strings.NewReader(url.Values{"token": {tok}}.Encode()))
	if err != nil {
		tb.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(OpaqueClientID, OpaqueClientSecret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		tb.Fatalf("revoking: %s", resp.Status)
	}
	return tok
}
