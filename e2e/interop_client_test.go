package e2e

import (
	"context"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestTSClientProgressiveZitadel: the TypeScript SDK's client (issue 6, part 2) against
// the caddy binary in progressive mode, with zitadel's OP as the authorization server and
// the client pre-registered there (zitadel has no DCR): 401 → protected-resource
// metadata → the OP's metadata → authorize → login → token → tools/list → tools/call, and
// a step-up on insufficient_scope that re-authorizes with the scope the 403 named.
func TestTSClientProgressiveZitadel(t *testing.T) {
	requireInterop(t)
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	upURL, _ := url.Parse(up.URL)
	caddy := startCaddy(t, progressiveSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret,
		"openid notes:read", upURL.Host, nativeClientBlock))

	var codes []string
	login := func(ctx context.Context, authorizeURL string) (*url.URL, error) {
		u, err := o.Login(ctx, authorizeURL)
		if err == nil {
			codes = append(codes, u.Query().Get("code"))
		}
		return u, err
	}
	s := runTSClient(t, caddy.Base+"/mcp", login, tsClientOptions{
		ClientID: testenv.NativeClientID,
		Calls:    []map[string]any{{"name": "whoami", "arguments": map[string]any{}}},
		StepUp:   map[string]any{"name": "notes_write", "arguments": map[string]any{"text": "from the TS SDK"}},
		Refresh:  true,
	})

	// Discovery as the SDK did it: 401, then the broker's RFC 9728 metadata.
	if s.Requests[0].Status != 401 || !strings.Contains(s.Requests[0].WWWAuthenticate, "resource_metadata=") {
		t.Errorf("first request %+v", s.Requests[0])
	}
	if s.requestsTo("GET", "/.well-known/oauth-protected-resource/mcp", 200) == 0 {
		t.Errorf("the SDK never read the protected-resource metadata: %+v", s.Requests)
	}
	first := s.Authorizations[0]
	if !strings.HasPrefix(first.Endpoint, o.Issuer) || first.ClientID != testenv.NativeClientID ||
		first.Resource != caddy.Base+"/mcp" || first.CodeChallengeMethod != "S256" {
		t.Errorf("first authorization %+v", first)
	}
	if s.ServerInfo.Name != "testenv-upstream" || !slices.Contains(s.Tools, "notes_write") {
		t.Errorf("server %q tools %v", s.ServerInfo.Name, s.Tools)
	}
	if len(s.Calls) == 0 || s.Calls[0].IsError || !strings.Contains(s.Calls[0].Text, o.User.Subject) {
		t.Errorf("whoami %+v", s.Calls)
	}

	// Step-up: 403 insufficient_scope naming notes:write, a new authorization asking for it,
	// and the call then goes through.
	if s.StepUp == nil || !s.StepUp.OK || s.StepUp.Authorizations != 1 || !slices.Contains(strings.Fields(s.StepUp.Scope), "notes:write") {
		t.Errorf("step-up %+v", s.StepUp)
	}
	if s.requestsTo("POST", "/mcp", 403) != 1 {
		t.Errorf("403s on /mcp: %d", s.requestsTo("POST", "/mcp", 403))
	}
	// The SDK asks for what the broker advertises; offline_access is never advertised,
	// so the OP issues no refresh token in progressive mode.
	if s.Refresh == nil || (s.Refresh.Attempted && !s.Refresh.OK) {
		t.Errorf("refresh %+v", s.Refresh)
	}
	t.Logf("grants %v, authorizations %d, refresh %+v", s.grants(), len(s.Authorizations), *s.Refresh)

	for _, r := range up.Seen() {
		if r.Authorization != "" {
			t.Errorf("upstream received an Authorization header")
		}
		if r.SubjectHeader != "" && r.SubjectHeader != o.User.Subject {
			t.Errorf("upstream saw subject %q", r.SubjectHeader)
		}
	}
	caddy.assertLogsFree(append(codes, testenv.BrokerClientSecret, testKey)...)
}

// TestTSClientProgressiveNodeIdP: the TS SDK client in progressive mode with the npm
// oidc-provider as the authorization server. Each row records what happens:
//   - keycloak profile, DCR at the IdP: connect and tools work (aud = the resource); the
//     step-up is refused by the IdP (invalid_scope), because SDK 1.32.2 registers the client
//     with the scope of the first challenge and oidc-provider, like Keycloak, holds a
//     client to its registered scope;
//   - keycloak profile, client pre-registered at the IdP without a scope limit: step-up works;
//   - nextcloud profile: its opaque tokens carry no audience, so the broker refuses them
//     (no fallback that skips the audience check): progressive mode needs an IdP that puts
//     the resource in aud; the Nextcloud-like IdP is for hybrid mode.
func TestTSClientProgressiveNodeIdP(t *testing.T) {
	rows := []struct {
		name, profile, clientID string
		check                   func(t *testing.T, s *tsSummary, err error, caddy *caddyProc)
	}{
		{"keycloak DCR at the IdP: tools work, step-up refused by the IdP", profileKeycloak, "", func(t *testing.T, s *tsSummary, err error, caddy *caddyProc) {
			if err != nil {
				t.Fatal(err)
			}
			if s.RegisteredClientID == "" || s.requestsTo("POST", "/reg", 201) != 1 {
				t.Errorf("no DCR at the IdP: %+v", s.Requests)
			}
			checkProgressiveBasics(t, s, caddy)
			if s.StepUp == nil || s.StepUp.OK || !strings.Contains(s.StepUp.Error, "invalid_scope") {
				t.Errorf("step-up %+v: expected the IdP to refuse a scope outside the registered one", s.StepUp)
			}
		}},
		{"keycloak pre-registered client: step-up works", profileKeycloak, nodeNativeClientID, func(t *testing.T, s *tsSummary, err error, caddy *caddyProc) {
			if err != nil {
				t.Fatal(err)
			}
			checkProgressiveBasics(t, s, caddy)
			if s.StepUp == nil || !s.StepUp.OK || s.StepUp.Scope != "notes:read notes:write" {
				t.Errorf("step-up %+v", s.StepUp)
			}
			if len(s.Calls) != 2 || s.Calls[1].IsError {
				t.Errorf("calls %+v", s.Calls)
			}
		}},
		{"nextcloud opaque token without audience is refused", profileNextcloud, "", func(t *testing.T, s *tsSummary, err error, caddy *caddyProc) {
			if err == nil {
				t.Fatalf("the broker accepted an audience-less token: %+v", s)
			}
			if !strings.Contains(caddy.logs.String(), "names none of the accepted audiences") {
				t.Errorf("refused for another reason: %v\n%s", err, tail(caddy.logs.String()))
			}
		}},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			requireInterop(t)
			idp := startNodeIdP(t, row.profile, nodeBrokerClient(), nodeNativeClient())
			up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
			upURL, _ := url.Parse(up.URL)
			caddy := startCaddy(t, progressiveSite(idp.Issuer, nodeBrokerClientID, nodeBrokerClientSecret,
				"openid notes:read", upURL.Host, ""))
			s, err := runTSClientErr(t, caddy.Base+"/mcp", func(ctx context.Context, u string) (*url.URL, error) { return idp.Login(ctx, u) }, tsClientOptions{
				ClientID: row.clientID,
				Calls:    []map[string]any{{"name": "whoami", "arguments": map[string]any{}}},
				StepUp:   map[string]any{"name": "notes_write", "arguments": map[string]any{"text": "from the TS SDK"}},
			})
			row.check(t, s, err, caddy)
			for _, r := range up.Seen() {
				if r.Authorization != "" {
					t.Errorf("upstream received an Authorization header")
				}
			}
		})
	}
}

// checkProgressiveBasics: the SDK discovered the IdP through the broker's metadata, sent
// the resource, and its calls reached the upstream as the logged-in user.
func checkProgressiveBasics(t *testing.T, s *tsSummary, caddy *caddyProc) {
	t.Helper()
	if len(s.Requests) == 0 || s.Requests[0].Status != 401 || s.requestsTo("GET", "/.well-known/oauth-protected-resource/mcp", 200) == 0 {
		t.Errorf("discovery: %+v", s.Requests)
	}
	if len(s.Authorizations) == 0 || s.Authorizations[0].Resource != caddy.Base+"/mcp" || s.Authorizations[0].CodeChallengeMethod != "S256" {
		t.Errorf("authorizations %+v", s.Authorizations)
	}
	if len(s.Calls) == 0 || s.Calls[0].IsError || !strings.Contains(s.Calls[0].Text, `"subject":"`+nodeUser+`"`) {
		t.Errorf("whoami %+v", s.Calls)
	}
}
