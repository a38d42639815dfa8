package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// revocationReach is the README's bound on how long a revocation made on one node takes to
// reach the others ("on other nodes within 30 s": a verified broker token is trusted from
// memory that long). The tests poll up to it, plus the poll's period and a request's time.
const revocationReach = 30*time.Second + 2*time.Second

// sharedStorage is one storage that the nodes of a cluster share.
type sharedStorage struct {
	global caddyOption // Caddy's global storage
	site   string      // lines inside mcp_oauth (its own storage), or none
}

// onEachSharedStorage runs fn, as parallel subtests, on the two storages a cluster shares: a
// file_system folder (one machine) and Redis through mcp_oauth_redis (across machines), the
// latter as Caddy's global storage or, with inSite, as mcp_oauth's own.
func onEachSharedStorage(t *testing.T, inSite bool, fn func(t *testing.T, s sharedStorage)) {
	t.Run("shared folder", func(t *testing.T) {
		t.Parallel()
		dir, err := os.MkdirTemp("", "mcp_oauth-shared-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		fn(t, sharedStorage{global: withStorage(dir)})
	})
	t.Run("redis", func(t *testing.T) {
		t.Parallel()
		if testing.Short() {
			t.Skip("runs the caddy binary; not with -short")
		}
		srv := testenv.Redis(t)
		block := "storage mcp_oauth_redis {\n\t\taddresses " + srv.Addr + "\n\t}"
		if inSite {
			fn(t, sharedStorage{global: func(*caddyProc) {}, site: "\t\t" + strings.ReplaceAll(block, "\n", "\n\t\t")})
			return
		}
		fn(t, sharedStorage{global: withGlobal("\t" + block)})
	})
}

// cluster is three caddy processes A, B and C with one hybrid mcp_oauth site on one
// storage, in front of one go-sdk upstream, logging in at one OP that has no token
// exchange (so delegation refreshes the session's IdP grant). Their resource, and so their
// issuer, is A's URL: a load balancer's, which the test plays by choosing the node.
type cluster struct {
	o     *testenv.OP
	up    *testenv.Upstream
	nodes []*caddyProc // A, B, C

	mu      sync.Mutex
	secrets []string // codes and tokens that no node may log (W13)
}

// secret adds values to those no node may log.
func (c *cluster) secret(values ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.secrets = append(c.secrets, values...)
}

func startCluster(t *testing.T, s sharedStorage) *cluster {
	t.Helper()
	o := testenv.StartOP(t, testenv.WithoutTokenExchangeAdvertised())
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI))
	portA := freePort(t)
	site := clusterSite(o, up.URL, portA, testKey, `offline_access {
			scopes notes:read
		}
		background_client worker worker-secret`, s.site)
	c := &cluster{o: o, up: up}
	c.nodes = append(c.nodes, startCaddy(t, site, s.global, withPort(portA)), startCaddy(t, site, s.global), startCaddy(t, site, s.global))
	t.Cleanup(func() {
		for _, n := range c.nodes {
			n.assertLogsFree(append(c.secrets, "worker-secret", testenv.BrokerClientSecret, testKey)...)
		}
	})
	return c
}

// clusterSite is the Caddyfile site of each node of a cluster: one hybrid mcp_oauth site
// in front of the upstream at upstreamURL, logging in at o, whose resource, and so issuer, is the load balancer's
// URL (the node listening on resourcePort plays it). keys is the encryption_key line's
// value; lines go inside mcp_oauth, after the rest.
func clusterSite(o *testenv.OP, upstreamURL string, resourcePort int, keys string, lines ...string) string {
	upURL, err := url.Parse(upstreamURL)
	if err != nil {
		panic(err)
	}
	var more strings.Builder
	for _, l := range lines {
		if l != "" {
			more.WriteString("\t\t" + strings.TrimLeft(l, "\t") + "\n")
		}
	}
	return fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		mode hybrid
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:%d/mcp
		scopes openid notes:read notes:write
		encryption_key %s
		tool_scope notes_write notes:write
%s	}
	reverse_proxy %s
}`, o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, resourcePort, keys, more.String(), upURL.Host)
}

// on returns u with its host replaced by node's: the load balancer sending it there.
func on(node *caddyProc, u string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		panic(err)
	}
	parsed.Host = strings.TrimPrefix(node.Base, "http://")
	return parsed.String()
}

// clusterClient is a public client registered by RFC 7591 on one node.
type clusterClient struct {
	id       string
	verifier string
}

// login walks a user's hybrid login across the cluster: the authorization request and
// consent on authorizeOn, the IdP's callback on callbackOn, and returns the code at the
// client's redirect URI. The browser keeps its cookies across nodes, as one does across
// the instances behind one host name.
func (c *cluster) login(t *testing.T, client *clusterClient, authorizeOn, callbackOn *caddyProc) string {
	t.Helper()
	code, err := c.authorize(t.Context(), newBrowser(c.o), client, authorizeOn, callbackOn)
	if err != nil {
		t.Fatalf("login: %v", err)
	}
	c.secret(code)
	return code
}

// authorize is login for callers off the test's goroutine: it returns what went wrong,
// and logs in with br, whose client may carry what a load balancer adds.
func (c *cluster) authorize(ctx context.Context, br *browser, client *clusterClient, authorizeOn, callbackOn *caddyProc) (string, error) {
	client.verifier = oauth2.GenerateVerifier()
	cfg := oauth2.Config{ClientID: client.id, RedirectURL: "http://127.0.0.1/cb", Scopes: []string{"openid", "notes:read", "notes:write"},
		Endpoint: oauth2.Endpoint{AuthURL: authorizeOn.Base + "/oauth/authorize"}}
	next, _ := url.Parse(cfg.AuthCodeURL("st", oauth2.S256ChallengeOption(client.verifier)))
	var err error
	for hops := 0; hops < 20 && err == nil; hops++ {
		switch {
		case c.isNode(next) && next.Path == "/oauth/consent":
			next, err = br.consent(ctx, next)
		case c.isNode(next) && next.Path == "/oauth/callback":
			next, _ = url.Parse(on(callbackOn, next.String()))
			next, err = br.get(ctx, next)
		case c.isNode(next):
			next, err = br.get(ctx, next)
		case c.o.Issuer == next.Scheme+"://"+next.Host:
			next, err = c.o.Login(ctx, next.String())
		default:
			if next.Query().Get("code") == "" {
				return "", fmt.Errorf("login ended at the client without a code: %s", next.Query().Get("error"))
			}
			return next.Query().Get("code"), nil
		}
	}
	if err == nil {
		err = errors.New("too many hops")
	}
	return "", err
}

func (c *cluster) isNode(u *url.URL) bool {
	for _, n := range c.nodes {
		if n.Base == u.Scheme+"://"+u.Host {
			return true
		}
	}
	return false
}

// tokenRequest posts form to node's token endpoint for client and returns the status and
// the decoded answer.
func tokenRequest(t *testing.T, node *caddyProc, form url.Values) (int, tokenAnswer) {
	t.Helper()
	resp, err := http.PostForm(node.Base+"/oauth/token", form)
	if err != nil {
		t.Error(err)
		return 0, tokenAnswer{}
	}
	defer resp.Body.Close()
	var a tokenAnswer
	if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
		t.Errorf("token answer: %s: %v", resp.Status, err)
	}
	return resp.StatusCode, a
}

// tokenAnswer is a token endpoint's answer, success or error.
type tokenAnswer struct {
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	Error        string `json:"error"`
}

func (c *cluster) redeem(t *testing.T, node *caddyProc, client *clusterClient, code string) (int, tokenAnswer) {
	t.Helper()
	status, ans := tokenRequest(t, node, url.Values{"grant_type": {"authorization_code"}, "code": {code}, "client_id": {client.id},
		"redirect_uri": {"http://127.0.0.1/cb"}, "code_verifier": {client.verifier}})
	c.secret(ans.AccessToken, ans.RefreshToken)
	return status, ans
}

func (c *cluster) refreshAt(t *testing.T, node *caddyProc, client *clusterClient, refreshToken string) (int, tokenAnswer) {
	t.Helper()
	status, ans := tokenRequest(t, node, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refreshToken}, "client_id": {client.id}})
	c.secret(ans.AccessToken, ans.RefreshToken)
	return status, ans
}

// mcpStatus is the status of a tools/list with token at node's MCP endpoint.
func mcpStatus(t *testing.T, node *caddyProc, token string) int {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, node.Base+"/mcp",
		strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Error(err) // also called off the test's goroutine
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// roundRobin sends each request of one MCP client session to the next node in turn, with
// the current bearer token, as a load balancer without affinity does.
type roundRobin struct {
	nodes  []*caddyProc
	next   atomic.Uint32
	token  atomic.Pointer[string]
	served []atomic.Int32 // requests per node
	// transport sends the requests; nil is http.DefaultTransport.
	transport http.RoundTripper
}

func newRoundRobin(nodes []*caddyProc, token string) *roundRobin {
	rr := &roundRobin{nodes: nodes, served: make([]atomic.Int32, len(nodes))}
	rr.token.Store(&token)
	return rr
}

func (rr *roundRobin) RoundTrip(req *http.Request) (*http.Response, error) {
	i := int(rr.next.Add(1)-1) % len(rr.nodes)
	rr.served[i].Add(1)
	r := req.Clone(req.Context())
	r.URL.Host, r.Host = strings.TrimPrefix(rr.nodes[i].Base, "http://"), ""
	r.Header.Set("Authorization", "Bearer "+*rr.token.Load())
	if rr.transport != nil {
		return rr.transport.RoundTrip(r)
	}
	return http.DefaultTransport.RoundTrip(r)
}

// connectVia connects an MCP client session through rt to the cluster's MCP endpoint.
func (c *cluster) connectVia(t *testing.T, rt http.RoundTripper) *mcp.ClientSession {
	t.Helper()
	s, err := mcp.NewClient(&mcp.Implementation{Name: "cluster", Version: "1"}, nil).Connect(t.Context(),
		&mcp.StreamableClientTransport{Endpoint: c.nodes[0].Base + "/mcp", HTTPClient: &http.Client{Transport: rt}, DisableStandaloneSSE: true}, nil)
	if err != nil {
		t.Fatalf("connecting: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// grantOfflineAccess provisions offline access for the token's user: the one-time link
// minted on startOn, opened in a browser on openOn, the IdP's callback on finishOn.
func (c *cluster) grantOfflineAccess(t *testing.T, token string, startOn, openOn, finishOn *caddyProc) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, startOn.Base+"/oauth/offline-access", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var link struct {
		AuthorizationURL string `json:"authorization_url"`
	}
	err = json.NewDecoder(resp.Body).Decode(&link)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || link.AuthorizationURL == "" {
		t.Fatalf("offline access link from %s: %s %v", startOn.Base, resp.Status, err)
	}
	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar}
	cb, err := c.o.Login(t.Context(), on(openOn, link.AuthorizationURL), testenv.LoginWithClient(browser))
	if err != nil {
		t.Fatalf("offline access link opened on %s: %v", openOn.Base, err)
	}
	if !c.isNode(cb) {
		t.Fatalf("the IdP sent the browser to %s, not to the cluster", cb.Redacted())
	}
	resp, err = browser.Get(on(finishOn, cb.String()))
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(page), "<code>worker</code>") {
		t.Fatalf("offline access callback on %s: %s", finishOn.Base, resp.Status)
	}
}

// offlineAccessGranted reads the token's user's offline access status at node.
func offlineAccessGranted(t *testing.T, node *caddyProc, token string) bool {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, node.Base+"/oauth/offline-access/status", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var status struct {
		Granted bool `json:"provisioned"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&status); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("offline access status on %s: %s %v", node.Base, resp.Status, err)
	}
	return status.Granted
}

// TestThreeInstancesOneUser: one user's whole life across three caddy processes on one
// storage (a shared folder; Redis), each step on another node than the one before, as a
// load balancer without affinity sends them: registration and authorization on A, the
// IdP's callback on B, the code redeemed on C, MCP calls round-robin over A, B and C,
// the broker refresh on B, offline access started on C, opened on B and finished on A,
// and a revocation on A that B and C honour within the README's bound.
func TestThreeInstancesOneUser(t *testing.T) {
	onEachSharedStorage(t, false, threeInstancesOneUser)
}

func threeInstancesOneUser(t *testing.T, s sharedStorage) {
	c := startCluster(t, s)
	a, b, cc := c.nodes[0], c.nodes[1], c.nodes[2]

	client := &clusterClient{id: dcrRegister(t, a.Base)}
	code := c.login(t, client, a, b)
	status, tok := c.redeem(t, cc, client, code)
	if status != http.StatusOK || tok.AccessToken == "" || tok.RefreshToken == "" {
		t.Fatalf("code from B redeemed on C: %d %s", status, tok.Error)
	}
	if status, again := c.redeem(t, a, client, code); status != http.StatusBadRequest || again.Error != "invalid_grant" {
		t.Errorf("the code redeemed again on A: %d %q, want 400 invalid_grant", status, again.Error)
	}
	// That replay revoked what the code issued (RFC 6749 §10.5): log in again.
	code = c.login(t, client, a, b)
	if status, tok = c.redeem(t, cc, client, code); status != http.StatusOK {
		t.Fatalf("second login's code redeemed on C: %d %s", status, tok.Error)
	}

	// One MCP session whose requests go to A, B, C, A, …: the upstream's session is the
	// same behind every node, each node verifies the broker token itself, and the IdP grant
	// is narrowed for delegation once for the whole cluster.
	refreshes := c.o.Count("refresh_token")
	rr := newRoundRobin(c.nodes, tok.AccessToken)
	session := c.connectVia(t, rr)
	for i := range 6 {
		call := &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "x"}}
		if i%2 == 1 {
			call = &mcp.CallToolParams{Name: "notes_read"}
		}
		if res, err := session.CallTool(t.Context(), call); err != nil || res.IsError {
			t.Fatalf("%s, call %d: %v %+v", call.Name, i, err, res)
		}
	}
	for i, n := range c.nodes {
		if rr.served[i].Load() < 2 {
			t.Errorf("node %s served %d MCP requests, want at least 2", n.Base, rr.served[i].Load())
		}
	}
	if n := c.o.Count("refresh_token") - refreshes; n != 1 {
		t.Errorf("the session's IdP grant was refreshed %d times for delegation by three nodes, want once", n)
	}
	for _, r := range c.up.Seen() {
		if r.AuthError != "" {
			t.Errorf("the upstream refused a delegated token: %s", r.AuthError)
		}
		if strings.Contains(r.Authorization, tok.AccessToken) {
			t.Error("the upstream received the client's token")
		}
	}

	// The broker's refresh on B: a new pair that every node accepts; the old refresh token
	// sent again on C inside the grace window gets the same pair.
	status, fresh := c.refreshAt(t, b, client, tok.RefreshToken)
	if status != http.StatusOK || fresh.AccessToken == tok.AccessToken || fresh.RefreshToken == tok.RefreshToken {
		t.Fatalf("refresh on B: %d %q, rotated %v", status, fresh.Error, fresh.RefreshToken != tok.RefreshToken)
	}
	if status, repeat := c.refreshAt(t, cc, client, tok.RefreshToken); status != http.StatusOK || repeat != fresh {
		t.Errorf("the old refresh token again on C inside the grace window: %d %q, same pair %v", status, repeat.Error, repeat == fresh)
	}
	rr.token.Store(&fresh.AccessToken)
	for i := range 3 {
		if res, err := session.CallTool(t.Context(), &mcp.CallToolParams{Name: "notes_read"}); err != nil || res.IsError {
			t.Fatalf("notes_read with the refreshed token, call %d: %v %+v", i, err, res)
		}
	}

	// Offline access started on C, its link opened on B, the IdP's callback on A; every
	// node then sees the grant, and a background client gets a token for it on B.
	c.grantOfflineAccess(t, fresh.AccessToken, cc, b, a)
	for _, n := range c.nodes {
		if !offlineAccessGranted(t, n, fresh.AccessToken) {
			t.Errorf("node %s does not see the offline access granted on A", n.Base)
		}
	}
	resp, body := backgroundToken(t, b.Base, "worker", "worker-secret", c.o.User.Subject)
	if background, _ := body["access_token"].(string); resp.StatusCode != http.StatusOK || background == "" {
		t.Errorf("background token on B: %s %v", resp.Status, body["error"])
	} else {
		c.secret(background)
	}

	// Revocation on A: at once there, and for the refresh token everywhere (a refresh
	// reads storage); B and C, which trust the access token from memory, refuse it within
	// the README's bound.
	resp, err := http.PostForm(a.Base+"/oauth/revoke", url.Values{"token": {fresh.RefreshToken}, "client_id": {client.id}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	revoked := time.Now()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revoke on A: %s", resp.Status)
	}
	if status := mcpStatus(t, a, fresh.AccessToken); status != http.StatusUnauthorized {
		t.Errorf("A after its own revocation: %d, want 401", status)
	}
	if status, ans := c.refreshAt(t, cc, client, fresh.RefreshToken); status != http.StatusBadRequest || ans.Error != "invalid_grant" {
		t.Errorf("the revoked refresh token on C: %d %q, want 400 invalid_grant", status, ans.Error)
	}
	var wg sync.WaitGroup
	for _, n := range []*caddyProc{b, cc} {
		wg.Go(func() {
			for {
				status := mcpStatus(t, n, fresh.AccessToken)
				if status == http.StatusUnauthorized {
					t.Logf("%s refused the revoked token after %s", n.Base, time.Since(revoked).Round(100*time.Millisecond))
					return
				}
				if status != http.StatusOK {
					t.Errorf("%s answered %d to the revoked token while it was still trusted, want 200 or 401", n.Base, status)
				}
				if time.Since(revoked) > revocationReach {
					t.Errorf("%s still accepts the access token revoked on A after %s (README: within 30 s)", n.Base, time.Since(revoked).Round(time.Second))
					return
				}
				time.Sleep(250 * time.Millisecond)
			}
		})
	}
	wg.Wait()
}

// spread runs n requests at once, the i-th on node i mod 3, and returns their results in
// order.
func spread[R any](c *cluster, n int, do func(i int, node *caddyProc) R) []R {
	out := make([]R, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			out[i] = do(i, c.nodes[i%len(c.nodes)])
		})
	}
	close(start)
	wg.Wait()
	return out
}

// TestRacesAcrossThreeInstances: what must happen once happens once when the requests
// for it arrive at once, spread over three caddy processes on one storage (a shared
// folder; Redis as mcp_oauth's own storage).
func TestRacesAcrossThreeInstances(t *testing.T) {
	onEachSharedStorage(t, true, racesAcrossThreeInstances)
}

type answer struct {
	status int
	tokenAnswer
}

func racesAcrossThreeInstances(t *testing.T, s sharedStorage) {
	c := startCluster(t, s)
	a, b := c.nodes[0], c.nodes[1]
	client := &clusterClient{id: dcrRegister(t, a.Base)}

	t.Run("50 redemptions of one code", func(t *testing.T) {
		code := c.login(t, client, a, b)
		answers := spread(c, 50, func(_ int, node *caddyProc) answer {
			status, ans := c.redeem(t, node, client, code)
			return answer{status, ans}
		})
		var won []tokenAnswer
		for i, ans := range answers {
			switch {
			case ans.status == http.StatusOK:
				won = append(won, ans.tokenAnswer)
			case ans.status != http.StatusBadRequest || ans.Error != "invalid_grant":
				t.Errorf("redemption %d: %d %q, want 400 invalid_grant", i, ans.status, ans.Error)
			}
		}
		// The code's replay marker is written with the code, so every loser is a replay,
		// and a replay revokes what the code issued whichever won (RFC 6749 §10.5): the
		// winner's 200, if its family was started before a loser's revocation, carries
		// tokens that are already dead; if after, the winner is refused too.
		if len(won) > 1 {
			t.Fatalf("%d redemptions of one code succeeded, want at most one", len(won))
		}
		t.Logf("redemptions that succeeded: %d of 50", len(won))
		for _, w := range won {
			for _, n := range c.nodes {
				if status := mcpStatus(t, n, w.AccessToken); status != http.StatusUnauthorized {
					t.Errorf("%s accepts the token of a code redeemed 50 times: %d, want 401 (the family revoked)", n.Base, status)
				}
			}
			if status, ans := c.refreshAt(t, c.nodes[2], client, w.RefreshToken); status != http.StatusBadRequest || ans.Error != "invalid_grant" {
				t.Errorf("refresh token of a code redeemed 50 times: %d %q, want 400 invalid_grant", status, ans.Error)
			}
		}
	})

	t.Run("20 refreshes of one refresh token", func(t *testing.T) {
		status, tok := c.redeem(t, c.nodes[2], client, c.login(t, client, a, b))
		if status != http.StatusOK {
			t.Fatalf("redeeming: %d %s", status, tok.Error)
		}
		refreshes := c.o.Count("refresh_token")
		answers := spread(c, 20, func(_ int, node *caddyProc) answer {
			status, ans := c.refreshAt(t, node, client, tok.RefreshToken)
			return answer{status, ans}
		})
		first := answers[0]
		for i, ans := range answers {
			if ans.status != http.StatusOK || ans.tokenAnswer != first.tokenAnswer {
				t.Errorf("refresh %d: %d %q, same pair as the first %v", i, ans.status, ans.Error, ans.tokenAnswer == first.tokenAnswer)
			}
		}
		if first.RefreshToken == tok.RefreshToken || first.AccessToken == tok.AccessToken {
			t.Fatal("the refresh did not rotate")
		}
		// The IdP grant was confirmed at login, well inside idp_confirm_interval: no refresh
		// of the 20 asks the IdP.
		if n := c.o.Count("refresh_token") - refreshes; n != 0 {
			t.Errorf("20 broker refreshes refreshed the IdP grant %d times, want none", n)
		}
		for _, n := range c.nodes {
			if status := mcpStatus(t, n, first.AccessToken); status != http.StatusOK {
				t.Errorf("%s: the rotated access token: %d", n.Base, status)
			}
		}
		// One rotation: the new refresh token is the live one, and it rotates once more.
		if status, next := c.refreshAt(t, a, client, first.RefreshToken); status != http.StatusOK || next.RefreshToken == first.RefreshToken {
			t.Errorf("the rotated refresh token: %d %q", status, next.Error)
		}
	})

	t.Run("delegation of one session from every node at once", func(t *testing.T) {
		status, tok := c.redeem(t, c.nodes[2], client, c.login(t, client, a, b))
		if status != http.StatusOK {
			t.Fatalf("redeeming: %d %s", status, tok.Error)
		}
		refreshes := c.o.Count("refresh_token")
		errs := spread(c, 9, func(_ int, node *caddyProc) error {
			s, err := mcp.NewClient(&mcp.Implementation{Name: "cluster", Version: "1"}, nil).Connect(t.Context(),
				&mcp.StreamableClientTransport{Endpoint: node.Base + "/mcp", HTTPClient: testenv.BearerClient(tok.AccessToken), DisableStandaloneSSE: true}, nil)
			if err != nil {
				return fmt.Errorf("%s: %w", node.Base, err)
			}
			defer s.Close()
			if res, err := s.CallTool(context.WithoutCancel(t.Context()), &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "x"}}); err != nil || res.IsError {
				return fmt.Errorf("%s: notes_write: %v", node.Base, err)
			}
			return nil
		})
		for _, err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
		if n := c.o.Count("refresh_token") - refreshes; n != 1 {
			t.Errorf("nine MCP sessions on three nodes with cold caches refreshed the session's IdP grant %d times, want once", n)
		}
	})

	t.Run("background tokens for one offline grant from every node at once", func(t *testing.T) {
		status, tok := c.redeem(t, c.nodes[2], client, c.login(t, client, a, b))
		if status != http.StatusOK {
			t.Fatalf("redeeming: %d %s", status, tok.Error)
		}
		c.grantOfflineAccess(t, tok.AccessToken, c.nodes[2], b, a)
		refreshes := c.o.Count("refresh_token")
		const n = 6
		type result struct {
			status int
			token  string
		}
		results := spread(c, n, func(_ int, node *caddyProc) result {
			resp, body := backgroundToken(t, node.Base, "worker", "worker-secret", c.o.User.Subject)
			token, _ := body["access_token"].(string)
			c.secret(token)
			return result{resp.StatusCode, token}
		})
		seen := map[string]bool{}
		for i, r := range results {
			if r.status != http.StatusOK || r.token == "" {
				t.Errorf("background token %d: %d", i, r.status)
			}
			seen[r.token] = true
		}
		// The first request under the grant's lock (cluster-wide) refreshes at the IdP; the
		// others get the token it stored while it lives (README, offline access): one IdP
		// refresh and one token, none refused (a lost rotation would make a later refresh
		// invalid_grant and delete the grant).
		if got := c.o.Count("refresh_token") - refreshes; got != 1 {
			t.Errorf("%d background tokens cost %d IdP refreshes, want 1", n, got)
		}
		if len(seen) != 1 {
			t.Errorf("%d background tokens, %d distinct, want one token handed to all", n, len(seen))
		}
		if !offlineAccessGranted(t, a, tok.AccessToken) {
			t.Error("the offline access grant is gone after concurrent background tokens")
		}
		if resp, body := backgroundToken(t, b.Base, "worker", "worker-secret", c.o.User.Subject); resp.StatusCode != http.StatusOK {
			t.Errorf("one more background token after the race: %s %v", resp.Status, body["error"])
		}
	})
}
