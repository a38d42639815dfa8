package flows

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// Helpers for the broker's own tokens: a hybrid broker with a settable clock and an
// observed logger, sessions holding a real IdP grant (made without the authorize flow),
// codes issued by issueCode as the callback does, and calls to /oauth/token and
// /oauth/revoke.

const (
	tokenTestRedirect = "http://127.0.0.1/callback"
	// tokenTestOtherClient is a second configured client, for cross-client rows.
	tokenTestOtherClient = "other-client"
)

var tokenTestScopes = []string{"openid", "notes:read", "notes:write"}

// tokenEnv is a hybrid broker for o in front of an MCP upstream that trusts the subject
// header.
type tokenEnv struct {
	o     *testenv.OP
	b     *Broker
	clock *testenv.Clock
	up    *testenv.Upstream
	front *httptest.Server
	logs  *observer.ObservedLogs
	// secrets are the tokens, codes and verifiers seen, to look for in logs.
	secrets sync.Map
}

// newTokenEnv starts a tokenEnv on o, after change to the configuration.
func newTokenEnv(t *testing.T, o *testenv.OP, change func(*Config)) *tokenEnv {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	b := newTestBroker(t, o, func(c *Config) {
		c.Mode = ModeHybrid
		c.Logger = zap.New(core)
		c.Clients = append(c.Clients, ClientConfig{ClientID: tokenTestOtherClient, RedirectURIs: []string{tokenTestRedirect}})
		if change != nil {
			change(c)
		}
	})
	clock := &testenv.Clock{Base: time.Now()}
	b.now = clock.Now // before anything serves: no race
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	e := &tokenEnv{o: o, b: b, clock: clock, up: up, front: startFront(t, b, up.URL), logs: logs}
	t.Cleanup(func() { e.assertNoSecretsLogged(t) })
	return e
}

// remember notes tokens, codes and verifiers the test handled, to look for in logs.
func (e *tokenEnv) remember(secrets ...string) {
	for _, v := range secrets {
		if v != "" {
			e.secrets.Store(v, true)
		}
	}
}

// assertNoSecretsLogged fails when any log entry, message or field, contains a token,
// code or verifier the test handled.
func (e *tokenEnv) assertNoSecretsLogged(t *testing.T) {
	var secrets []string
	e.secrets.Range(func(k, _ any) bool { secrets = append(secrets, k.(string)); return true })
	for _, entry := range e.logs.All() {
		line := entry.Message + " " + fmt.Sprint(entry.ContextMap())
		for _, s := range secrets {
			if strings.Contains(line, s) {
				t.Errorf("log entry %q contains a secret", entry.Message)
			}
		}
	}
}

// idpGrant logs test-user in at the OP as the broker's own client, as the callback does,
// and returns the IdP's grant with its refresh token.
func (e *tokenEnv) idpGrant(t *testing.T) IdPGrant {
	t.Helper()
	scopes := []string{"openid", "offline_access", "notes:read", "notes:write"}
	tok := e.o.LoginGrant(t, e.o.User, testenv.BrokerClientID, testenv.BrokerClientSecret, scopes)
	if tok.RefreshToken == "" {
		t.Fatal("the OP issued no refresh token")
	}
	idToken, _ := tok.Extra("id_token").(string)
	e.remember(tok.AccessToken, tok.RefreshToken, idToken)
	return IdPGrant{
		Token:   oauth2.Token{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, Expiry: tok.Expiry},
		IDToken: idToken,
		Scopes:  scopes,
	}
}

// session stores a session for the OP's user logged in through clientID.
func (e *tokenEnv) session(t *testing.T, clientID string) *Session {
	t.Helper()
	s, err := e.b.sessions.create(t.Context(), e.o.User.Subject, clientID, tokenTestScopes, e.idpGrant(t))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// code issues a code for a new session of clientID, with a fresh PKCE verifier.
func (e *tokenEnv) code(t *testing.T, clientID string) (code, verifier string) {
	t.Helper()
	return e.codeFor(t, e.session(t, clientID), clientID, testResource)
}

func (e *tokenEnv) codeFor(t *testing.T, s *Session, clientID, resource string) (code, verifier string) {
	t.Helper()
	verifier = oauth2.GenerateVerifier()
	code, err := e.b.issueCode(t.Context(), s, AuthorizationRequest{
		ClientID:            clientID,
		RedirectURI:         tokenTestRedirect,
		State:               "st",
		CodeChallenge:       oauth2.S256ChallengeFromVerifier(verifier),
		CodeChallengeMethod: "S256",
		Scopes:              tokenTestScopes,
		Resource:            resource,
	})
	if err != nil {
		t.Fatalf("issueCode: %v", err)
	}
	e.remember(code, verifier)
	return code, verifier
}

// endpointReply is an answer of the token or revocation endpoint.
type endpointReply struct {
	status int
	header http.Header
	tokens TokenResponse
	err    oauthError
}

// post sends form to path on the front, with header.
func (e *tokenEnv) post(t *testing.T, path string, form url.Values, header http.Header) endpointReply {
	t.Helper()
	res, err := e.postE(t.Context(), path, form, header)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// postE is post for other goroutines than the test's.
func (e *tokenEnv) postE(ctx context.Context, path string, form url.Values, header http.Header) (endpointReply, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.front.URL+path, strings.NewReader(form.Encode()))
	if err != nil {
		return endpointReply{}, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return endpointReply{}, err
	}
	defer resp.Body.Close()
	res := endpointReply{status: resp.StatusCode, header: resp.Header}
	var raw json.RawMessage
	if err := json.NewDecoder(resp.Body).Decode(&raw); err == nil {
		if resp.StatusCode == http.StatusOK {
			_ = json.Unmarshal(raw, &res.tokens)
			e.remember(res.tokens.AccessToken, res.tokens.RefreshToken)
		} else {
			_ = json.Unmarshal(raw, &res.err)
		}
	}
	return res, nil
}

// exchange redeems code as clientID.
func (e *tokenEnv) exchange(t *testing.T, clientID, code, verifier string, change func(url.Values)) endpointReply {
	t.Helper()
	return e.post(t, pathToken, exchangeForm(clientID, code, verifier, change), nil)
}

func exchangeForm(clientID, code, verifier string, change func(url.Values)) url.Values {
	form := url.Values{
		"grant_type":    {"authorization_code"},
		"client_id":     {clientID},
		"code":          {code},
		"redirect_uri":  {tokenTestRedirect},
		"code_verifier": {verifier},
	}
	if change != nil {
		change(form)
	}
	return form
}

// login is a whole login of the native client: session, code, exchange.
func (e *tokenEnv) login(t *testing.T) TokenResponse {
	t.Helper()
	code, verifier := e.code(t, testenv.NativeClientID)
	res := e.exchange(t, testenv.NativeClientID, code, verifier, nil)
	if res.status != http.StatusOK {
		t.Fatalf("exchange: %d %+v", res.status, res.err)
	}
	return res.tokens
}

// refresh uses refreshToken as clientID.
func (e *tokenEnv) refresh(t *testing.T, clientID, refreshToken string, change func(url.Values)) endpointReply {
	t.Helper()
	form := url.Values{"grant_type": {"refresh_token"}, "client_id": {clientID}, "refresh_token": {refreshToken}}
	if change != nil {
		change(form)
	}
	return e.post(t, pathToken, form, nil)
}

// mcpStatus is the status of an MCP initialize request through the front with token.
func (e *tokenEnv) mcpStatus(t *testing.T, token string) int {
	t.Helper()
	h := bearer(token)
	h.Set("Content-Type", "application/json")
	h.Set("Accept", "application/json, text/event-stream")
	resp := do(t, http.MethodPost, e.front.URL+"/mcp", h,
		`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`)
	return resp.StatusCode
}

func (r endpointReply) wantError(t *testing.T, status int, code string) {
	t.Helper()
	if r.status != status || r.err.Error != code {
		t.Fatalf("got %d %q (%s), want %d %q", r.status, r.err.Error, r.err.Description, status, code)
	}
	if cc := r.header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control %q on an error", cc)
	}
}

func (r endpointReply) wantTokens(t *testing.T) TokenResponse {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("got %d %q (%s), want tokens", r.status, r.err.Error, r.err.Description)
	}
	return r.tokens
}

// countRecords counts the stored records of kind.
func (e *tokenEnv) countRecords(t *testing.T, kind string) int {
	t.Helper()
	keys, err := e.b.cfg.Records.List(t.Context(), storage.Key(kind))
	if err != nil {
		t.Fatal(err)
	}
	return len(keys)
}

func TestCodeExchange(t *testing.T) {
	o := testenv.SharedOP(t)
	e := newTokenEnv(t, o, nil)

	t.Run("a code yields broker tokens that work on the protected endpoint without reaching the upstream", func(t *testing.T) {
		code, verifier := e.code(t, testenv.NativeClientID)
		res := e.exchange(t, testenv.NativeClientID, code, verifier, nil)
		tok := res.wantTokens(t)
		if cc := res.header.Get("Cache-Control"); cc != "no-store" {
			t.Errorf("Cache-Control %q", cc)
		}
		if !strings.HasPrefix(tok.AccessToken, accessTokenPrefix) || !strings.HasPrefix(tok.RefreshToken, refreshTokenPrefix) {
			t.Errorf("tokens are not the broker's own: %q…, %q…", tok.AccessToken[:6], tok.RefreshToken[:6])
		}
		if tok.TokenType != "Bearer" || tok.ExpiresIn != int64(e.b.cfg.AccessTokenTTL/time.Second) || tok.Scope != "openid notes:read notes:write" {
			t.Errorf("token response %+v", TokenResponse{TokenType: tok.TokenType, ExpiresIn: tok.ExpiresIn, Scope: tok.Scope})
		}

		e.up.Reset()
		s := connect(t, e.front.URL, tok.AccessToken)
		out, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "whoami"})
		if err != nil || out.IsError {
			t.Fatalf("whoami: %v %+v", err, out)
		}
		var who testenv.Identity
		if err := json.Unmarshal([]byte(out.Content[0].(*mcp.TextContent).Text), &who); err != nil {
			t.Fatal(err)
		}
		if who.Subject != o.User.Subject {
			t.Errorf("upstream saw subject %q, want %q", who.Subject, o.User.Subject)
		}
		for _, r := range e.up.Seen() {
			if r.Authorization != "" {
				t.Errorf("upstream received an Authorization header")
			}
		}
	})

	t.Run("the principal is the session's user, client, scopes and resource", func(t *testing.T) {
		tok := e.login(t)
		p, err := e.b.verifyBrokerToken(t.Context(), tok.AccessToken)
		if err != nil {
			t.Fatal(err)
		}
		if p.Subject != o.User.Subject || p.ClientID != testenv.NativeClientID || p.ScopeString() != "openid notes:read notes:write" ||
			len(p.Audience) != 1 || p.Audience[0] != testResource || p.SessionID == "" ||
			!p.Expiry.Equal(e.clock.Now().Add(e.b.cfg.AccessTokenTTL)) {
			t.Errorf("principal %+v", p)
		}
	})

	t.Run("a replayed code is refused and the tokens it issued stop working", func(t *testing.T) {
		code, verifier := e.code(t, testenv.NativeClientID)
		tok := e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
			t.Fatalf("fresh token: %d", st)
		}
		revokes := o.Count(testenv.CountRevoke)
		e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("access token after the replay: %d, want 401", st)
		}
		e.refresh(t, testenv.NativeClientID, tok.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		if o.Count(testenv.CountRevoke) <= revokes {
			t.Error("the IdP grant behind the replayed code was not revoked")
		}
	})

	t.Run("a concurrent replay revokes the family whichever redemption wins", func(t *testing.T) {
		code, verifier := e.code(t, testenv.NativeClientID)
		results := make([]endpointReply, 2)
		var wg sync.WaitGroup
		for i := range results {
			wg.Go(func() {
				var err error
				if results[i], err = e.postE(t.Context(), pathToken, exchangeForm(testenv.NativeClientID, code, verifier, nil), nil); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		won := 0
		for _, r := range results {
			if r.status == http.StatusOK {
				won++
				if st := e.mcpStatus(t, r.tokens.AccessToken); st != http.StatusUnauthorized {
					t.Errorf("winner's access token: %d, want 401", st)
				}
			}
		}
		if won > 1 {
			t.Errorf("%d redemptions won", won)
		}
	})

	t.Run("a code of client A redeemed by client B is refused and consumed", func(t *testing.T) {
		code, verifier := e.code(t, testenv.NativeClientID)
		e.exchange(t, tokenTestOtherClient, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
		// RFC 6749 §4.1.2: a code is single use, whoever presented it.
		e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})

	t.Run("an expired code is refused", func(t *testing.T) {
		code, verifier := e.code(t, testenv.NativeClientID)
		e.clock.Advance(e.b.cfg.CodeTTL + time.Second)
		e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	})

	for _, tc := range []struct {
		name          string
		change        func(url.Values)
		status        int
		code          string
		stillUsable   bool // the code was not consumed
		wrongVerifier bool
	}{
		{name: "a wrong verifier is refused", wrongVerifier: true, status: http.StatusBadRequest, code: "invalid_grant"},
		{name: "a redirect_uri other than the bound one is refused",
			change: func(f url.Values) { f.Set("redirect_uri", "http://127.0.0.1:8080/callback") }, status: http.StatusBadRequest, code: "invalid_grant"},
		{name: "a resource other than the bound one is invalid_target",
			change: func(f url.Values) { f.Set("resource", "https://other.example/mcp") }, status: http.StatusBadRequest, code: "invalid_target"},
		{name: "two resources are invalid_target",
			change: func(f url.Values) { f["resource"] = []string{testResource, testResource} }, status: http.StatusBadRequest, code: "invalid_target", stillUsable: true},
		{name: "a verifier too short is invalid_request",
			change: func(f url.Values) { f.Set("code_verifier", "short") }, status: http.StatusBadRequest, code: "invalid_request", stillUsable: true},
		{name: "a verifier with a character outside RFC 7636 is invalid_request",
			change: func(f url.Values) { f.Set("code_verifier", strings.Repeat("a", 42)+"+") }, status: http.StatusBadRequest, code: "invalid_request", stillUsable: true},
		{name: "a missing code is invalid_request",
			change: func(f url.Values) { f.Del("code") }, status: http.StatusBadRequest, code: "invalid_request", stillUsable: true},
		{name: "a missing redirect_uri is invalid_request",
			change: func(f url.Values) { f.Del("redirect_uri") }, status: http.StatusBadRequest, code: "invalid_request", stillUsable: true},
		{name: "a missing verifier is invalid_request",
			change: func(f url.Values) { f.Del("code_verifier") }, status: http.StatusBadRequest, code: "invalid_request", stillUsable: true},
		{name: "an unknown code is invalid_grant",
			change: func(f url.Values) { f.Set("code", "not-a-code") }, status: http.StatusBadRequest, code: "invalid_grant", stillUsable: true},
		{name: "an unsupported grant type is unsupported_grant_type",
			change: func(f url.Values) { f.Set("grant_type", "password") }, status: http.StatusBadRequest, code: "unsupported_grant_type", stillUsable: true},
		{name: "a missing grant type is invalid_request",
			change: func(f url.Values) { f.Del("grant_type") }, status: http.StatusBadRequest, code: "invalid_request", stillUsable: true},
		{name: "a repeated parameter is invalid_request",
			change: func(f url.Values) { f["code_verifier"] = []string{f.Get("code_verifier"), f.Get("code_verifier")} }, status: http.StatusBadRequest, code: "invalid_request", stillUsable: true},
		{name: "an unknown client is invalid_client",
			change: func(f url.Values) { f.Set("client_id", "nobody") }, status: http.StatusUnauthorized, code: "invalid_client", stillUsable: true},
		{name: "a public client sending a secret is invalid_client",
			change: func(f url.Values) { f.Set("client_secret", "guess") }, status: http.StatusUnauthorized, code: "invalid_client", stillUsable: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, verifier := e.code(t, testenv.NativeClientID)
			v := verifier
			if tc.wrongVerifier {
				v = oauth2.GenerateVerifier()
			}
			e.exchange(t, testenv.NativeClientID, code, v, tc.change).wantError(t, tc.status, tc.code)
			again := e.exchange(t, testenv.NativeClientID, code, verifier, nil)
			if tc.stillUsable && again.status != http.StatusOK {
				t.Errorf("the refused request consumed the code: %d %q", again.status, again.err.Error)
			}
			if !tc.stillUsable && again.status == http.StatusOK {
				t.Error("the code was redeemed after a refused attempt")
			}
		})
	}

	t.Run("the resource bound in the code is accepted when sent again", func(t *testing.T) {
		code, verifier := e.code(t, testenv.NativeClientID)
		e.exchange(t, testenv.NativeClientID, code, verifier, func(f url.Values) { f.Set("resource", testResource) }).wantTokens(t)
	})

	t.Run("a code without a resource is bound to the broker's resource", func(t *testing.T) {
		code, verifier := e.codeFor(t, e.session(t, testenv.NativeClientID), testenv.NativeClientID, "")
		tok := e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusOK {
			t.Errorf("token: %d", st)
		}
	})

	t.Run("a token bound to another resource is refused on this one", func(t *testing.T) {
		code, verifier := e.codeFor(t, e.session(t, testenv.NativeClientID), testenv.NativeClientID, "https://other.example/mcp")
		tok := e.exchange(t, testenv.NativeClientID, code, verifier, nil).wantTokens(t)
		if st := e.mcpStatus(t, tok.AccessToken); st != http.StatusUnauthorized {
			t.Errorf("token for another resource: %d, want 401", st)
		}
	})

	t.Run("Basic credentials of an unknown client get a Basic challenge", func(t *testing.T) {
		code, verifier := e.code(t, testenv.NativeClientID)
		res := e.post(t, pathToken, url.Values{
			"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {tokenTestRedirect}, "code_verifier": {verifier},
		}, http.Header{"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte("nobody:secret"))}})
		res.wantError(t, http.StatusUnauthorized, "invalid_client")
		if !strings.HasPrefix(res.header.Get("WWW-Authenticate"), "Basic ") {
			t.Errorf("WWW-Authenticate %q", res.header.Get("WWW-Authenticate"))
		}
	})
}

func TestTokenEndpointRequests(t *testing.T) {
	e := newTokenEnv(t, testenv.SharedOP(t), nil)
	origin := http.Header{"Origin": {"https://inspector.example"}}

	t.Run("preflight is answered for browser clients, without credentials", func(t *testing.T) {
		for _, path := range []string{pathToken, pathRevoke} {
			resp := do(t, http.MethodOptions, e.front.URL+path,
				http.Header{"Origin": {"https://inspector.example"}, "Access-Control-Request-Method": {"POST"}}, "")
			if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Access-Control-Allow-Origin") != "*" ||
				!strings.Contains(resp.Header.Get("Access-Control-Allow-Methods"), "POST") {
				t.Errorf("%s preflight: %s %v", path, resp.Status, resp.Header)
			}
			if resp.Header.Get("Access-Control-Allow-Credentials") != "" {
				t.Errorf("%s allows credentials", path)
			}
		}
	})
	t.Run("answers carry CORS", func(t *testing.T) {
		res := e.post(t, pathToken, url.Values{"grant_type": {"password"}, "client_id": {testenv.NativeClientID}}, origin)
		if res.header.Get("Access-Control-Allow-Origin") != "*" {
			t.Error("no CORS on the token answer")
		}
	})
	t.Run("GET is refused", func(t *testing.T) {
		resp := get(t, e.front.URL+pathToken+"?grant_type=authorization_code", nil)
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("GET: %s", resp.Status)
		}
	})
	t.Run("a JSON body is refused", func(t *testing.T) {
		resp := do(t, http.MethodPost, e.front.URL+pathToken, http.Header{"Content-Type": {"application/json"}}, `{"grant_type":"refresh_token"}`)
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("JSON body: %s", resp.Status)
		}
	})
	t.Run("a body over the bound is refused", func(t *testing.T) {
		resp := do(t, http.MethodPost, e.front.URL+pathToken, http.Header{"Content-Type": {"application/x-www-form-urlencoded"}},
			"grant_type=refresh_token&x="+strings.Repeat("a", maxTokenRequestBytes))
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Errorf("large body: %s", resp.Status)
		}
	})
	t.Run("parameters in the query string are not read", func(t *testing.T) {
		code, verifier := e.code(t, testenv.NativeClientID)
		q := url.Values{"code": {code}, "code_verifier": {verifier}, "redirect_uri": {tokenTestRedirect}}
		resp := do(t, http.MethodPost, e.front.URL+pathToken+"?"+q.Encode(),
			http.Header{"Content-Type": {"application/x-www-form-urlencoded"}},
			url.Values{"grant_type": {"authorization_code"}, "client_id": {testenv.NativeClientID}}.Encode())
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("query parameters: %s", resp.Status)
		}
	})
}

func TestPKCE(t *testing.T) {
	verifier := "dBjftJeZ4CVP-mJ92K9wgQqGbUw9e0m2zsFbpHSy-Zs_ZNZ"
	sum := sha256.Sum256([]byte(verifier))
	challenge := base64.RawURLEncoding.EncodeToString(sum[:])
	for _, tc := range []struct {
		name                        string
		method, challenge, verifier string
		want                        bool
	}{
		{"the S256 of the verifier matches", "S256", challenge, verifier, true},
		{"another verifier does not match", "S256", challenge, verifier + "x", false},
		{"plain is never accepted", "plain", verifier, verifier, false},
		{"an empty challenge never matches", "S256", "", verifier, false},
		{"a challenge of another length does not match", "S256", challenge + "A", verifier, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := pkceMatches(subtle.ConstantTimeCompare, tc.method, tc.challenge, tc.verifier); got != tc.want {
				t.Errorf("pkceMatches = %v", got)
			}
		})
	}
	for _, tc := range []struct {
		name string
		v    string
		want bool
	}{
		{"43 unreserved characters are valid", strings.Repeat("a", 43), true},
		{"128 characters are valid", strings.Repeat("A-._~9", 21) + "ab", true},
		{"42 characters are too short", strings.Repeat("a", 42), false},
		{"129 characters are too long", strings.Repeat("a", 129), false},
		{"a space is refused", strings.Repeat("a", 42) + " ", false},
		{"a slash is refused", strings.Repeat("a", 42) + "/", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := validCodeVerifier(tc.v); got != tc.want {
				t.Errorf("validCodeVerifier = %v", got)
			}
		})
	}
}

// storedRefreshToken reads the record of a refresh token.
func (e *tokenEnv) storedRefreshToken(t *testing.T, rt string) RefreshToken {
	t.Helper()
	rec, err := e.b.families.refreshToken(context.Background(), rt)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// RFC 6749 §4.1.3: redirect_uri is required at the token endpoint only "if the
// redirect_uri parameter was included in the authorization request". The broker lets a
// client with one registered URI leave it out at /oauth/authorize (§3.1.2.3), so such a
// client must be able to redeem its code without it too; one it does send must still be
// the registered URI.
func TestCodeRedeemedWithoutRedirectURIWhenOmittedAtAuthorize(t *testing.T) {
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", hybridClients)

	redeem := func(t *testing.T, redirectURI string) *http.Response {
		t.Helper()
		verifier := oauth2.GenerateVerifier()
		code := hybridLogin(t, front, o, singleURIClient, "", verifier, []string{"openid", "notes:read"})
		conf := oauth2.Config{
			ClientID:    singleURIClient,
			Endpoint:    oauth2.Endpoint{TokenURL: front.URL + pathToken, AuthStyle: oauth2.AuthStyleInParams},
			RedirectURL: redirectURI, // "" leaves the parameter out
		}
		_, err := conf.Exchange(t.Context(), code, oauth2.VerifierOption(verifier))
		if err == nil {
			return &http.Response{StatusCode: http.StatusOK}
		}
		if re, ok := err.(*oauth2.RetrieveError); ok {
			t.Logf("token endpoint: %s %s", re.ErrorCode, re.ErrorDescription)
			return re.Response
		}
		t.Fatal(err)
		return nil
	}

	t.Run("left out at both endpoints", func(t *testing.T) {
		if resp := redeem(t, ""); resp.StatusCode != http.StatusOK {
			t.Errorf("status %d, want 200", resp.StatusCode)
		}
	})
	t.Run("left out at authorize, the registered URI at the token endpoint", func(t *testing.T) {
		if resp := redeem(t, singleURI); resp.StatusCode != http.StatusOK {
			t.Errorf("status %d, want 200", resp.StatusCode)
		}
	})
	t.Run("left out at authorize, another URI at the token endpoint", func(t *testing.T) {
		if resp := redeem(t, "https://evil.example/cb"); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("status %d, want 400", resp.StatusCode)
		}
	})
}
