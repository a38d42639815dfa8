package e2e

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestTwoCaddyProcessesShareOneStorage: two caddy processes over one storage (a folder;
// Redis through the mcp_oauth_redis module) serve one user's session interchangeably. The
// IdP has no token exchange, so the broker picks the refresh fallback by itself; both
// processes delegating the same session at once rotate the IdP grant exactly once, and both
// keep working after.
func TestTwoCaddyProcessesShareOneStorage(t *testing.T) {
	t.Run("shared folder", func(t *testing.T) {
		shared, err := os.MkdirTemp("", "mcp_oauth-shared-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(shared) })
		twoProcessesShareOneStorage(t, withStorage(shared))
	})
	t.Run("redis", func(t *testing.T) {
		if testing.Short() {
			t.Skip("runs the caddy binary; not with -short")
		}
		srv := testenv.Redis(t)
		twoProcessesShareOneStorage(t, withGlobal("\tstorage mcp_oauth_redis {\n\t\taddresses "+srv.Addr+"\n\t}"))
	})
}

func twoProcessesShareOneStorage(t *testing.T, storage caddyOption) {
	o := testenv.StartOP(t, testenv.WithoutTokenExchangeAdvertised())
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI))
	resourcePort := freePort(t)
	site := clusterSite(o, up.URL, resourcePort, testKey)
	a := startCaddy(t, site, storage, withPort(resourcePort))
	b := startCaddy(t, site, storage)

	// Log in without touching /mcp, so that the first delegation of the session happens
	// on both processes at once.
	clientID := dcrRegister(t, a.Base)
	cfg := oauth2.Config{ClientID: clientID, RedirectURL: "http://127.0.0.1/cb", Scopes: []string{"openid", "notes:read", "notes:write"},
		Endpoint: oauth2.Endpoint{AuthURL: a.Base + "/oauth/authorize", TokenURL: a.Base + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams}}
	verifier := oauth2.GenerateVerifier()
	final, err := newBrowser(o).login(t.Context(), cfg.AuthCodeURL("st", oauth2.S256ChallengeOption(verifier)))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := cfg.Exchange(t.Context(), final.Query().Get("code"), oauth2.VerifierOption(verifier))
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
	t.Logf("grants: code %d refresh %d exchange %d", o.Count("authorization_code"), o.Count("refresh_token"), o.Count(testenv.TokenExchangeGrantType))
	// Refresh delegation narrows the session's IdP grant once; the second process waits on
	// the storage lock and finds it done.
	if n := o.Count("refresh_token") - before; n != 1 {
		t.Errorf("the IdP grant was refreshed %d times by two processes, want exactly one", n)
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
