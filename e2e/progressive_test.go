package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/modelcontextprotocol/go-sdk/oauthex"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

const testKey = "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE="

// loginFetcher logs the OP's test user in wherever a client is sent and records the URLs
// and every code and token it saw (for the log check).
type loginFetcher struct {
	o       *testenv.OP
	visited []string
	codes   []string
}

func (f *loginFetcher) fetch(ctx context.Context, args *auth.AuthorizationArgs) (*auth.AuthorizationResult, error) {
	f.visited = append(f.visited, args.URL)
	cb, err := f.o.Login(ctx, args.URL)
	if err != nil {
		return nil, err
	}
	q := cb.Query()
	f.codes = append(f.codes, q.Get("code"))
	return &auth.AuthorizationResult{Code: q.Get("code"), State: q.Get("state"), Iss: q.Get("iss")}, nil
}

// capturingTransport remembers every bearer token a client sent.
func whoami(t *testing.T, s *mcp.ClientSession) testenv.Identity {
	t.Helper()
	res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "whoami"})
	if err != nil || res.IsError {
		t.Fatalf("whoami: %v %+v", err, res)
	}
	var who testenv.Identity
	if err := json.Unmarshal([]byte(res.Content[0].(*mcp.TextContent).Text), &who); err != nil {
		t.Fatal(err)
	}
	return who
}

// progressiveSite is a Caddyfile site for progressive mode with delegation none in front
// of upstream (host:port), where notes_write needs notes:write; extra lines go inside
// mcp_oauth.
func progressiveSite(issuer, clientID, clientSecret, scopes, upstream, extra string) string {
	return fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		mode progressive
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:{port}/mcp
		scopes %s
		encryption_key %s
		delegation none
		tool_scope notes_write notes:write
%s
	}
	reverse_proxy %s
}`, issuer, clientID, clientSecret, scopes, testKey, extra, upstream)
}

// nativeClientBlock registers testenv's native client with a loopback redirect URI.
var nativeClientBlock = fmt.Sprintf(`		client %s {
			redirect_uri http://127.0.0.1/callback
		}`, testenv.NativeClientID)

// TestProgressiveThroughCaddyBinary: the progressive login with the go-sdk client against the real caddy
// binary configured by Caddyfile; the upstream never sees the client's token and Caddy's
// logs (at DEBUG) hold no code or token.
func TestProgressiveThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	upURL, _ := url.Parse(up.URL)
	caddy := startCaddy(t, progressiveSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret,
		"openid notes:read notes:write", upURL.Host, nativeClientBlock))

	f := &loginFetcher{o: o}
	handler, err := auth.NewAuthorizationCodeHandler(&auth.AuthorizationCodeHandlerConfig{
		PreregisteredClient:      &oauthex.ClientCredentials{ClientID: testenv.NativeClientID},
		RedirectURL:              "http://127.0.0.1:49152/callback",
		AuthorizationCodeFetcher: f.fetch,
	})
	if err != nil {
		t.Fatal(err)
	}
	session, err := mcp.NewClient(&mcp.Implementation{Name: "e2e", Version: "1"}, nil).Connect(t.Context(),
		&mcp.StreamableClientTransport{Endpoint: caddy.Base + "/mcp", OAuthHandler: handler, DisableStandaloneSSE: true}, nil)
	if err != nil {
		t.Fatalf("connecting: %v\n%s", err, caddy.logs.String())
	}
	defer session.Close()
	if who := whoami(t, session); who.Subject != o.User.Subject {
		t.Errorf("upstream saw %q", who.Subject)
	}
	if res, err := session.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "x"}}); err != nil || res.IsError {
		t.Fatalf("notes_write: %v", err)
	}
	ts, err := handler.TokenSource(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range up.Seen() {
		if r.Header.Get("Authorization") != "" || strings.Contains(fmt.Sprint(r.Header), tok.AccessToken) {
			t.Errorf("upstream received the client's token")
		}
	}
	caddy.assertLogsFree(append(f.codes, tok.AccessToken, tok.RefreshToken, testenv.BrokerClientSecret, testKey)...)
}
