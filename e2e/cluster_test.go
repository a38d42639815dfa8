package e2e

import (
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/modelcontextprotocol/go-sdk/oauthex"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestTwoCaddyProcessesShareOneStorage: two caddy processes over one storage folder serve
// one user's session interchangeably. The IdP has no token exchange, so the broker picks
// the refresh fallback by itself; both processes delegating the same session at once
// rotate the IdP grant at most once, and both keep working after.
func TestTwoCaddyProcessesShareOneStorage(t *testing.T) {
	o := testenv.StartOP(t, testenv.WithoutTokenExchangeAdvertised())
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI))
	shared, err := os.MkdirTemp("", "mcp_oauth-shared-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shared) })
	upURL, _ := url.Parse(up.URL)
	resourcePort := freePort(t)
	site := fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		mode hybrid
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:%d/mcp
		scopes openid notes:read notes:write
		encryption_key %s
		tool_scope notes_write notes:write
	}
	reverse_proxy %s
}`, o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, resourcePort, testKey, upURL.Host)
	a := startCaddy(t, site, withStorage(shared), withPort(resourcePort))
	b := startCaddy(t, site, withStorage(shared))

	br := newBrowser(o)
	_, handler := connectHybrid(t, a.Base, &auth.AuthorizationCodeHandlerConfig{
		DynamicClientRegistrationConfig: &auth.DynamicClientRegistrationConfig{Metadata: &oauthex.ClientRegistrationMetadata{
			RedirectURIs: []string{"http://127.0.0.1:49152/callback"}, TokenEndpointAuthMethod: "none",
			GrantTypes: []string{"authorization_code", "refresh_token"},
		}},
		RedirectURL:              "http://127.0.0.1:49152/callback",
		AuthorizationCodeFetcher: br.fetch,
	})
	ts, _ := handler.TokenSource(t.Context())
	tok, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}

	before := o.Count("refresh_token")
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for _, base := range []string{a.Base, b.Base} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := mcp.NewClient(&mcp.Implementation{Name: "node", Version: "1"}, nil).Connect(t.Context(),
				&mcp.StreamableClientTransport{Endpoint: base + "/mcp", HTTPClient: testenv.BearerClient(tok.AccessToken), DisableStandaloneSSE: true}, nil)
			if err != nil {
				errs <- fmt.Errorf("%s: %w", base, err)
				return
			}
			defer s.Close()
			for i := 0; i < 3; i++ {
				if res, err := s.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "x"}}); err != nil || res.IsError {
					errs <- fmt.Errorf("%s: notes_write: %v", base, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := o.Count("refresh_token") - before; n > 1 {
		t.Errorf("the IdP grant was refreshed %d times by two processes, want at most one", n)
	}
	for _, r := range up.Seen() {
		if r.AuthError != "" {
			t.Errorf("upstream refused a delegated token: %s", r.AuthError)
		}
		if strings.Contains(r.Authorization, tok.AccessToken) {
			t.Error("upstream received the client's token")
		}
	}
}
