package flows

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// brokerTokensFor runs a whole hybrid login asking for scopes and redeems the code: the
// broker tokens the client gets.
func brokerTokensFor(t *testing.T, front *httptest.Server, o *testenv.OP, scopes []string) *oauth2.Token {
	t.Helper()
	verifier := oauth2.GenerateVerifier()
	code := hybridLogin(t, front, o, testenv.NativeClientID, hybridRedirectURI, verifier, scopes)
	conf := oauth2.Config{
		ClientID:    testenv.NativeClientID,
		Endpoint:    oauth2.Endpoint{TokenURL: front.URL + pathToken, AuthStyle: oauth2.AuthStyleInParams},
		RedirectURL: hybridRedirectURI,
	}
	tok, err := conf.Exchange(t.Context(), code, oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatalf("redeeming the broker's code: %v", err)
	}
	return tok
}

// TestBrokerTokensCarryTheIdPGrant: the broker's tokens carry what the client asked for
// and the IdP granted (SECURITY.md: broker tokens and the IdP grant). The IdP refuses
// notes:write to the broker's client, silently; however it says so (the token answer's
// scope, the JWT access token's scope claim, introspection of an opaque access token),
// the client's tokens lack notes:write and, under delegation none, notes_write gets
// 403 insufficient_scope while notes_read works. Scopes an IdP adds of its own never
// become broker scopes.
func TestBrokerTokensCarryTheIdPGrant(t *testing.T) {
	asked := []string{"openid", "notes:read", "notes:write"}
	for _, tc := range []struct {
		name     string
		opts     []testenv.OPOption
		fault    testenv.TokenAnswerFault
		clientID string
		secret   string
		want     []string
	}{
		{name: "the token answer's scope",
			opts: []testenv.OPOption{testenv.WithScopesRefused("notes:write")},
			want: []string{"openid", "notes:read"}},
		{name: "the JWT access token's scope claim when the answer has none",
			opts:  []testenv.OPOption{testenv.WithScopesRefused("notes:write")},
			fault: testenv.OmitAnswerScope(),
			want:  []string{"openid", "notes:read"}},
		{name: "introspection of an opaque access token when the answer has no scope",
			opts:     []testenv.OPOption{testenv.WithScopesRefused("notes:write")},
			fault:    testenv.OmitAnswerScope(),
			clientID: testenv.OpaqueClientID, secret: testenv.OpaqueClientSecret,
			want: []string{"openid", "notes:read"}},
		{name: "scopes the IdP adds of its own are not broker scopes",
			fault: testenv.SetAnswerScope("authorization_code", "openid offline_access notes:read notes:write roles web-origins"),
			want:  asked},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := testenv.StartOP(t, tc.opts...)
			o.SetTokenAnswerFault(tc.fault)
			up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
			_, front := startHybridFront(t, o, up.URL, func(c *Config) {
				if tc.clientID != "" {
					c.ClientID, c.ClientSecret = tc.clientID, tc.secret
				}
			})
			tok := brokerTokensFor(t, front, o, asked)
			if got := strings.Fields(tok.Extra("scope").(string)); !slices.Equal(got, tc.want) {
				t.Fatalf("broker token scope %q, want %q", got, tc.want)
			}

			resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(tok.AccessToken),
				`{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_write","arguments":{"text":"x"}}}`)
			granted := slices.Contains(tc.want, "notes:write")
			if refused := resp.StatusCode == http.StatusForbidden &&
				strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="insufficient_scope"`); refused == granted {
				t.Errorf("notes_write: %s %q (notes:write granted: %v)", resp.Status, resp.Header.Get("WWW-Authenticate"), granted)
			}
			s := connect(t, front.URL, tok.AccessToken)
			if res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_read"}); err != nil || res.IsError {
				t.Errorf("notes_read: %v", err)
			}
		})
	}
}

// narrowSessionGrant makes the session's IdP grant hold only scopes, as if the IdP had
// granted no more at login.
func narrowSessionGrant(tb testing.TB, b *Broker, id string, scopes []string) {
	tb.Helper()
	s, err := b.sessions.load(tb.Context(), id)
	if err != nil {
		tb.Fatal(err)
	}
	g, err := b.sessions.grant(s)
	if err != nil {
		tb.Fatal(err)
	}
	g.Scopes = scopes
	if err := b.sessions.rotateGrant(tb.Context(), s, g); err != nil {
		tb.Fatal(err)
	}
}

// TestDelegatedTokensAreChecked: a delegated JWT the IdP issues for another user, for
// another audience (token exchange), or with scopes beyond the user's IdP grant is
// refused with 502 and never reaches the upstream (SECURITY.md: delegated tokens). The
// OP issues honest tokens; a named fault rewrites its answer. With refresh delegation
// `aud` is what the IdP fixed at login and an IdP that cannot narrow is no error.
func TestDelegatedTokensAreChecked(t *testing.T) {
	o := testenv.StartOP(t)
	exchange, refresh := testenv.TokenExchangeGrantType, "refresh_token"
	sub := func(v any) func(map[string]any) { return func(c map[string]any) { c["sub"] = v } }
	for _, tc := range []struct {
		name       string
		mode       string // broker mode
		delegation string
		grant      []string // the session's IdP grant, when narrower than the login's
		grantType  string
		change     func(claims map[string]any)
		wantOK     bool
	}{
		{"exchange: the honest token passes", ModeHybrid, DelegationTokenExchange, nil, "", nil, true},
		{"exchange: sub of another user", ModeHybrid, DelegationTokenExchange, nil, exchange, sub("other-user"), false},
		{"exchange: no sub is no error", ModeHybrid, DelegationTokenExchange, nil, exchange,
			func(c map[string]any) { delete(c, "sub") }, true},
		{"exchange: aud not naming the audience", ModeHybrid, DelegationTokenExchange, nil, exchange,
			func(c map[string]any) { c["aud"] = []string{"someone-else"} }, false},
		{"exchange: aud naming the audience among others", ModeHybrid, DelegationTokenExchange, nil, exchange,
			func(c map[string]any) { c["aud"] = []string{"nextcloud", "someone-else"} }, true},
		{"exchange: scope beyond the IdP grant", ModeHybrid, DelegationTokenExchange, []string{"openid", "notes:read", "offline_access"}, exchange,
			func(c map[string]any) { c["scope"] = "notes:read notes:write" }, false},
		{"exchange: scopes the IdP adds of its own are no error", ModeHybrid, DelegationTokenExchange, nil, exchange,
			func(c map[string]any) { c["scope"] = "notes:read roles web-origins" }, true},
		{"refresh: the honest token passes", ModeHybrid, DelegationRefresh, nil, "", nil, true},
		{"refresh: sub of another user", ModeHybrid, DelegationRefresh, nil, refresh, sub("other-user"), false},
		{"refresh: aud is the IdP's choice", ModeHybrid, DelegationRefresh, nil, refresh,
			func(c map[string]any) { c["aud"] = []string{"http://elsewhere.example"} }, true},
		{"refresh: an IdP that cannot narrow is no error", ModeHybrid, DelegationRefresh, nil, refresh,
			func(c map[string]any) { c["scope"] = "openid notes:read notes:write offline_access" }, true},
		{"refresh: scope beyond the IdP grant", ModeHybrid, DelegationRefresh, []string{"openid", "notes:read", "offline_access"}, refresh,
			func(c map[string]any) { c["scope"] = "notes:read notes:write" }, false},
		{"progressive exchange: sub of another user", ModeProgressive, DelegationTokenExchange, nil, exchange, sub("other-user"), false},
		{"progressive exchange: a scope that is no broker scope is no error", ModeProgressive, DelegationTokenExchange, nil, exchange,
			func(c map[string]any) { c["scope"] = "notes:read notes:write notes:admin" }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newTestBroker(t, o, delegating(tc.mode, tc.delegation))
			var who *idp.Principal
			var raw string
			if tc.mode == ModeHybrid {
				who, _ = hybridPrincipal(t, b, o, o.User)
				raw = "broker-token"
				if tc.grant != nil {
					narrowSessionGrant(t, b, who.SessionID, tc.grant)
					who.Scopes = tc.grant
				}
			} else {
				who, raw = progressivePrincipal(t, b, o, o.User)
			}
			if tc.change != nil {
				o.SetTokenAnswerFault(o.ReissueAccessToken(tc.grantType, tc.change))
				defer o.SetTokenAnswerFault(nil)
			}
			w, h, ok := delegate(t.Context(), b, who, raw, []string{"notes:read"})
			switch {
			case tc.wantOK && (!ok || h == ""):
				t.Errorf("refused: %d %s", w.Code, w.Body.String())
			case !tc.wantOK && (ok || h != "" || w.Code != http.StatusBadGateway):
				t.Errorf("passed on (%v, token given %v) or answered %d, want 502", ok, h != "", w.Code)
			}
		})
	}
}
