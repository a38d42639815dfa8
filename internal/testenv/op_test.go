package testenv

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/go-jose/go-jose/v4/jwt"
	"golang.org/x/oauth2"
)

// testOP is the package's OP, for tests that need no options.
var testOP *OP

func TestMain(m *testing.M) {
	// The example OP logs every request at info level.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	o, err := NewOP()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	testOP = o
	code := m.Run()
	o.Close()
	os.Exit(code)
}

// callbackURL is a redirect URI nobody listens on: Login never requests it.
const callbackURL = "http://127.0.0.1:49152/callback"

type loginParams struct {
	clientID, clientSecret string
	user                   User
	scopes                 []string
	resources              []string
}

// loginTokens signs in through the OP's login form and redeems the code,
// with PKCE.
func loginTokens(t *testing.T, o *OP, p loginParams) *oauth2.Token {
	t.Helper()
	ctx := t.Context()
	cfg := oauth2.Config{
		ClientID:     p.clientID,
		ClientSecret: p.clientSecret,
		Endpoint:     o.Endpoint(),
		RedirectURL:  callbackURL,
		Scopes:       p.scopes,
	}
	if cfg.ClientSecret == "" {
		cfg.Endpoint.AuthStyle = oauth2.AuthStyleInParams
	}
	verifier := oauth2.GenerateVerifier()
	authorize := cfg.AuthCodeURL("the-state", oauth2.S256ChallengeOption(verifier))
	for _, r := range p.resources {
		authorize += "&resource=" + url.QueryEscape(r)
	}
	user := p.user
	if user == (User{}) {
		user = o.User
	}
	callback, err := o.Login(ctx, authorize, LoginAs(user))
	if err != nil {
		t.Fatalf("Login: %v", err)
	}
	if got := callback.Scheme + "://" + callback.Host + callback.Path; got != callbackURL {
		t.Fatalf("Login stopped at %s, want the redirect URI %s", callback, callbackURL)
	}
	if got := callback.Query().Get("state"); got != "the-state" {
		t.Fatalf("state = %q, want %q", got, "the-state")
	}
	tok, err := cfg.Exchange(ctx, callback.Query().Get("code"), oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatalf("exchanging code: %v", err)
	}
	return tok
}

// jwtClaims verifies a JWT against o's JWKS and returns its claims.
func jwtClaims(t *testing.T, o *OP, token string) map[string]any {
	t.Helper()
	payload, err := oidc.NewRemoteKeySet(t.Context(), o.JWKSURI).VerifySignature(t.Context(), token)
	if err != nil {
		t.Fatalf("verifying JWT against %s: %v", o.JWKSURI, err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	return claims
}

func audienceOf(claims map[string]any) []string {
	switch aud := claims["aud"].(type) {
	case string:
		return []string{aud}
	case []any:
		var out []string
		for _, a := range aud {
			s, _ := a.(string)
			out = append(out, s)
		}
		return out
	}
	return nil
}

// postForm POSTs form to endpoint with client credentials in Basic auth and
// decodes the JSON answer into out, if it is JSON.
func postForm(t *testing.T, endpoint, clientID, secret string, form url.Values, out any) int {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if clientID != "" {
		req.SetBasicAuth(url.QueryEscape(clientID), url.QueryEscape(secret))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if out != nil && strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			t.Fatalf("decoding answer of %s: %v", endpoint, err)
		}
	}
	return resp.StatusCode
}

func TestOPDiscovery(t *testing.T) {
	for _, tc := range []struct {
		name          string
		opts          []OPOption
		tokenExchange bool
	}{
		{"token exchange advertised by default", nil, true},
		{"token exchange hidden on request", []OPOption{WithoutTokenExchangeAdvertised()}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := testOP
			if tc.opts != nil {
				o = StartOP(t, tc.opts...)
			}
			provider, err := oidc.NewProvider(t.Context(), o.Issuer) // checks issuer equality
			if err != nil {
				t.Fatal(err)
			}
			var d struct {
				GrantTypes            []string `json:"grant_types_supported"`
				IntrospectionEndpoint string   `json:"introspection_endpoint"`
			}
			if err := provider.Claims(&d); err != nil {
				t.Fatal(err)
			}
			if got := slices.Contains(d.GrantTypes, TokenExchangeGrantType); got != tc.tokenExchange {
				t.Errorf("grant_types_supported = %v; token exchange listed = %v, want %v", d.GrantTypes, got, tc.tokenExchange)
			}
			if d.IntrospectionEndpoint != o.IntrospectionEndpoint || provider.Endpoint().TokenURL != o.TokenEndpoint {
				t.Errorf("endpoints differ from discovery: %+v vs %+v", o, d)
			}
		})
	}
}

func TestOPWithoutTokenExchangeRefusesTheGrant(t *testing.T) {
	o := StartOP(t, WithoutTokenExchangeAdvertised())
	tok := loginTokens(t, o, loginParams{clientID: BrokerClientID, clientSecret: BrokerClientSecret, scopes: []string{"openid"}})
	var answer struct{ Error string }
	status := postForm(t, o.TokenEndpoint, BrokerClientID, BrokerClientSecret, url.Values{
		"grant_type":         {TokenExchangeGrantType},
		"subject_token":      {tok.AccessToken},
		"subject_token_type": {"urn:ietf:params:oauth:token-type:access_token"},
	}, &answer)
	if status != http.StatusBadRequest || answer.Error != "unsupported_grant_type" {
		t.Errorf("token exchange answered %d %q, want 400 unsupported_grant_type", status, answer.Error)
	}
	if got := o.Count(TokenExchangeGrantType); got != 1 {
		t.Errorf("Count(token exchange) = %d, want 1", got)
	}
}

func TestOPLoginIssuesJWTAccessTokens(t *testing.T) {
	for _, tc := range []struct {
		name   string
		params loginParams
		aud    []string
	}{
		{
			name:   "native client with PKCE gets a JWT for itself",
			params: loginParams{clientID: NativeClientID, scopes: []string{"openid", "notes:read"}},
			aud:    []string{NativeClientID},
		},
		{
			name:   "broker gets a JWT for itself",
			params: loginParams{clientID: BrokerClientID, clientSecret: BrokerClientSecret, scopes: []string{"openid", "notes:read"}},
			aud:    []string{BrokerClientID},
		},
		{
			name: "resource parameters become the audience",
			params: loginParams{
				clientID: NativeClientID, scopes: []string{"openid", "notes:read"},
				resources: []string{"http://127.0.0.1:8443/mcp", "mcp-server"},
			},
			aud: []string{"http://127.0.0.1:8443/mcp", "mcp-server"},
		},
		{
			name:   "other user signs in",
			params: loginParams{clientID: NativeClientID, scopes: []string{"openid", "notes:read"}, user: testOP.OtherUser},
			aud:    []string{NativeClientID},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := loginTokens(t, testOP, tc.params)
			claims := jwtClaims(t, testOP, tok.AccessToken)
			user := tc.params.user
			if user == (User{}) {
				user = testOP.User
			}
			if claims["iss"] != testOP.Issuer || claims["sub"] != user.Subject {
				t.Errorf("iss, sub = %v, %v; want %v, %v", claims["iss"], claims["sub"], testOP.Issuer, user.Subject)
			}
			if got := audienceOf(claims); !slices.Equal(got, tc.aud) {
				t.Errorf("aud = %v, want %v", got, tc.aud)
			}
			if claims["scope"] != "openid notes:read" {
				t.Errorf("scope = %v, want %q", claims["scope"], "openid notes:read")
			}
		})
	}
}

func TestOPRefreshKeepsResourceAudience(t *testing.T) {
	tok := loginTokens(t, testOP, loginParams{
		clientID: NativeClientID, scopes: []string{"openid", "offline_access", "notes:read"},
		resources: []string{"mcp-server"},
	})
	if tok.RefreshToken == "" {
		t.Fatal("no refresh token")
	}
	before := testOP.Count("refresh_token")
	cfg := oauth2.Config{ClientID: NativeClientID, Endpoint: testOP.Endpoint()}
	cfg.Endpoint.AuthStyle = oauth2.AuthStyleInParams
	tok.Expiry = time.Now().Add(-time.Hour) // force a refresh
	refreshed, err := cfg.TokenSource(t.Context(), tok).Token()
	if err != nil {
		t.Fatal(err)
	}
	if got := testOP.Count("refresh_token") - before; got != 1 {
		t.Errorf("refresh_token requests = %d, want 1", got)
	}
	if refreshed.RefreshToken == tok.RefreshToken {
		t.Error("refresh token did not rotate")
	}
	if got := audienceOf(jwtClaims(t, testOP, refreshed.AccessToken)); !slices.Equal(got, []string{"mcp-server"}) {
		t.Errorf("refreshed aud = %v, want [mcp-server]", got)
	}
}

func TestOPLoginErrors(t *testing.T) {
	wrongPassword := testOP.User
	wrongPassword.Password = "wrong"
	for _, tc := range []struct {
		name        string
		redirectURI string
		user        User
		wantError   string
	}{
		{"wrong password is refused", callbackURL, wrongPassword, "username or password wrong"},
		{"redirect URI off loopback is refused", "http://mcp.example.com/callback", testOP.User, "400 Bad Request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := oauth2.Config{ClientID: NativeClientID, Endpoint: testOP.Endpoint(), RedirectURL: tc.redirectURI, Scopes: []string{"openid"}}
			authorize := cfg.AuthCodeURL("s", oauth2.S256ChallengeOption(oauth2.GenerateVerifier()))
			_, err := testOP.Login(t.Context(), authorize, LoginAs(tc.user))
			if err == nil || !strings.Contains(err.Error(), tc.wantError) {
				t.Errorf("Login: err = %v, want it to mention %q", err, tc.wantError)
			}
		})
	}
}

type exchangeAnswer struct {
	AccessToken     string `json:"access_token"`
	IssuedTokenType string `json:"issued_token_type"`
	Scope           string `json:"scope"`
	Error           string `json:"error"`
}

func TestOPTokenExchange(t *testing.T) {
	o := StartOP(t) // its own, for exact counts
	scopes := []string{"openid", "notes:read", "notes:write"}
	admin := loginTokens(t, o, loginParams{clientID: BrokerClientID, clientSecret: BrokerClientSecret, scopes: scopes})
	restricted := loginTokens(t, o, loginParams{clientID: BrokerClientID, clientSecret: BrokerClientSecret, scopes: scopes, user: o.RestrictedUser})

	for _, tc := range []struct {
		name      string
		subject   string
		extra     url.Values
		wantError string
		wantAud   []string
		wantScope string
	}{
		{
			name:      "audience and scope narrow the token",
			subject:   admin.AccessToken,
			extra:     url.Values{"audience": {"mcp-server"}, "scope": {"notes:read"}},
			wantAud:   []string{"mcp-server"},
			wantScope: "notes:read",
		},
		{
			name:      "no scope keeps the subject token's scopes",
			subject:   admin.AccessToken,
			extra:     url.Values{"audience": {"mcp-server"}},
			wantAud:   []string{"mcp-server"},
			wantScope: "openid notes:read notes:write",
		},
		{
			name:      "no audience means the broker",
			subject:   admin.AccessToken,
			extra:     url.Values{"scope": {"notes:read"}},
			wantAud:   []string{BrokerClientID},
			wantScope: "notes:read",
		},
		{
			name:      "scope beyond the subject token's is refused",
			subject:   admin.AccessToken,
			extra:     url.Values{"scope": {"notes:admin"}},
			wantError: "invalid_scope",
		},
		{
			name:      "non-admin subject without actor token is refused",
			subject:   restricted.AccessToken,
			extra:     url.Values{"audience": {"mcp-server"}},
			wantError: "invalid_grant",
		},
		{
			name:      "garbage subject token is refused",
			subject:   "not-a-token",
			wantError: "invalid_request",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o.ResetCounts()
			form := url.Values{
				"grant_type":         {TokenExchangeGrantType},
				"subject_token":      {tc.subject},
				"subject_token_type": {"urn:ietf:params:oauth:token-type:access_token"},
			}
			for k, v := range tc.extra {
				form[k] = v
			}
			var answer exchangeAnswer
			status := postForm(t, o.TokenEndpoint, BrokerClientID, BrokerClientSecret, form, &answer)
			if got := o.Count(TokenExchangeGrantType); got != 1 {
				t.Errorf("Count(token exchange) = %d, want 1", got)
			}
			if tc.wantError != "" {
				if status != http.StatusBadRequest || answer.Error != tc.wantError {
					t.Errorf("answer = %d %q, want 400 %q", status, answer.Error, tc.wantError)
				}
				return
			}
			if status != http.StatusOK {
				t.Fatalf("answer = %d %q", status, answer.Error)
			}
			if answer.IssuedTokenType != "urn:ietf:params:oauth:token-type:access_token" {
				t.Errorf("issued_token_type = %q", answer.IssuedTokenType)
			}
			claims := jwtClaims(t, o, answer.AccessToken)
			if got := audienceOf(claims); !slices.Equal(got, tc.wantAud) {
				t.Errorf("aud = %v, want %v", got, tc.wantAud)
			}
			if claims["scope"] != tc.wantScope || answer.Scope != tc.wantScope {
				t.Errorf("scope claim %v, scope %q; want %q", claims["scope"], answer.Scope, tc.wantScope)
			}
			if claims["sub"] != o.User.Subject {
				t.Errorf("sub = %v, want %v", claims["sub"], o.User.Subject)
			}
		})
	}
}

type introspection struct {
	Active   bool         `json:"active"`
	Subject  string       `json:"sub"`
	ClientID string       `json:"client_id"`
	Scope    string       `json:"scope"`
	Audience jwt.Audience `json:"aud"`
}

func TestOPIntrospection(t *testing.T) {
	opaque := loginTokens(t, testOP, loginParams{
		clientID: OpaqueClientID, clientSecret: OpaqueClientSecret,
		scopes: []string{"openid", "notes:read"}, resources: []string{"mcp-server"},
	})
	if strings.Count(opaque.AccessToken, ".") == 2 {
		t.Fatalf("opaque client got a JWT: %s", opaque.AccessToken)
	}
	jwtToken := loginTokens(t, testOP, loginParams{clientID: NativeClientID, scopes: []string{"openid"}})

	for _, tc := range []struct {
		name           string
		token          string
		clientID, pass string
		wantStatus     int
		want           introspection
	}{
		{
			name: "opaque token is active for the broker", token: opaque.AccessToken,
			clientID: BrokerClientID, pass: BrokerClientSecret, wantStatus: http.StatusOK,
			want: introspection{Active: true, Subject: testOP.User.Subject, ClientID: OpaqueClientID, Scope: "openid notes:read", Audience: jwt.Audience{"mcp-server"}},
		},
		{
			name: "JWT access token is active too", token: jwtToken.AccessToken,
			clientID: BrokerClientID, pass: BrokerClientSecret, wantStatus: http.StatusOK,
			want: introspection{Active: true, Subject: testOP.User.Subject, ClientID: NativeClientID, Scope: "openid", Audience: jwt.Audience{NativeClientID}},
		},
		{
			name: "minted JWT is unknown to the OP", token: testOP.MintJWT(testOP.AccessTokenClaims(testOP.User.Subject, "mcp-server")),
			clientID: BrokerClientID, pass: BrokerClientSecret, wantStatus: http.StatusOK,
		},
		{
			name: "garbage is inactive", token: "garbage",
			clientID: BrokerClientID, pass: BrokerClientSecret, wantStatus: http.StatusOK,
		},
		{
			name: "wrong client secret is refused", token: opaque.AccessToken,
			clientID: BrokerClientID, pass: "wrong", wantStatus: http.StatusUnauthorized,
		},
		{
			name: "public client cannot introspect", token: opaque.AccessToken,
			wantStatus: http.StatusUnauthorized,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := testOP.Count(CountIntrospect)
			var got introspection
			form := url.Values{"token": {tc.token}}
			if tc.clientID == "" {
				form.Set("client_id", NativeClientID)
			}
			status := postForm(t, testOP.IntrospectionEndpoint, tc.clientID, tc.pass, form, &got)
			if status != tc.wantStatus {
				t.Fatalf("status = %d, want %d", status, tc.wantStatus)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("introspection = %+v, want %+v", got, tc.want)
			}
			if n := testOP.Count(CountIntrospect) - before; n != 1 {
				t.Errorf("Count(introspect) grew by %d, want 1", n)
			}
		})
	}
}

func TestOPRevokedTokenIsInactive(t *testing.T) {
	tok := loginTokens(t, testOP, loginParams{clientID: OpaqueClientID, clientSecret: OpaqueClientSecret, scopes: []string{"openid"}})
	if status := postForm(t, testOP.RevocationEndpoint, OpaqueClientID, OpaqueClientSecret, url.Values{"token": {tok.AccessToken}}, nil); status != http.StatusOK {
		t.Fatalf("revocation status = %d", status)
	}
	var got introspection
	postForm(t, testOP.IntrospectionEndpoint, BrokerClientID, BrokerClientSecret, url.Values{"token": {tok.AccessToken}}, &got)
	if got.Active {
		t.Error("revoked token is still active")
	}
}

func TestOPSetDown(t *testing.T) {
	o := StartOP(t)
	o.SetDown(true)
	status := postForm(t, o.TokenEndpoint, BrokerClientID, BrokerClientSecret, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {"x"}}, nil)
	if status != http.StatusServiceUnavailable {
		t.Errorf("status while down = %d, want 503", status)
	}
	if got := o.Count("refresh_token"); got != 1 {
		t.Errorf("Count(refresh_token) = %d, want 1", got)
	}
	o.SetDown(false)
	resp, err := http.Get(o.Issuer + "/.well-known/openid-configuration")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("status after coming back = %d, want 200", resp.StatusCode)
	}
}

func TestOPLoginFollowsARedirectToTheOP(t *testing.T) {
	// A stand-in for the broker's authorize endpoint: anything that redirects
	// the browser to the OP.
	cfg := oauth2.Config{ClientID: NativeClientID, Endpoint: testOP.Endpoint(), RedirectURL: callbackURL, Scopes: []string{"openid"}}
	authorize := cfg.AuthCodeURL("s", oauth2.S256ChallengeOption(oauth2.GenerateVerifier()))
	front := http.NewServeMux()
	front.HandleFunc("/authorize", func(w http.ResponseWriter, r *http.Request) {
		http.SetCookie(w, &http.Cookie{Name: "binding", Value: "b1", Path: "/"})
		http.Redirect(w, r, authorize, http.StatusFound)
	})
	srv := httptest.NewServer(front)
	t.Cleanup(srv.Close)
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	callback, err := testOP.Login(t.Context(), srv.URL+"/authorize", LoginWithClient(&http.Client{Jar: jar}))
	if err != nil {
		t.Fatal(err)
	}
	if callback.Query().Get("code") == "" {
		t.Errorf("no code in %s", callback)
	}
	frontURL, _ := url.Parse(srv.URL)
	if cookies := jar.Cookies(frontURL); len(cookies) != 1 || cookies[0].Value != "b1" {
		t.Errorf("cookies kept for the front = %v, want binding=b1", cookies)
	}
}

func TestOPDisableUserRefusesItsRefreshTokens(t *testing.T) {
	o := StartOP(t)
	scopes := []string{"openid", "offline_access"}
	tok := loginTokens(t, o, loginParams{clientID: BrokerClientID, clientSecret: BrokerClientSecret, scopes: scopes})
	other := loginTokens(t, o, loginParams{clientID: BrokerClientID, clientSecret: BrokerClientSecret, scopes: scopes, user: o.OtherUser})
	form := func(rt string) url.Values { return url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}} }

	o.DisableUser(o.User, true)
	var refusal struct {
		Error string `json:"error"`
	}
	if st := postForm(t, o.TokenEndpoint, BrokerClientID, BrokerClientSecret, form(tok.RefreshToken), &refusal); st != http.StatusBadRequest || refusal.Error != "invalid_grant" {
		t.Errorf("refresh of a disabled user: %d %q, want 400 invalid_grant", st, refusal.Error)
	}
	if st := postForm(t, o.TokenEndpoint, BrokerClientID, BrokerClientSecret, form(other.RefreshToken), nil); st != http.StatusOK {
		t.Errorf("refresh of another user: %d", st)
	}
	o.DisableUser(o.User, false)
	if st := postForm(t, o.TokenEndpoint, BrokerClientID, BrokerClientSecret, form(tok.RefreshToken), nil); st != http.StatusOK {
		t.Errorf("refresh after enabling the user again: %d", st)
	}
}
