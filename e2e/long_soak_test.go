//go:build long

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestSoak is the bounded soak of RELIABILITY.md, run by scripts/soak.sh (build tag long):
// three caddy processes on one Redis (caddy.storage.mcp_oauth_redis as Caddy's storage)
// in front of one go-sdk upstream, behind a load balancer the test plays (round robin; each
// user's address in X-Forwarded-For, which the nodes trust from loopback). It sends
// SOAK_REQUESTS proxied MCP calls (default 200000) on warm sessions (broker token verified
// from memory, delegated token cached) while SOAK_LOGINS full hybrid logins (default 5000)
// run beside them: authorize and consent on one node, the IdP's callback on the next, the
// code redeemed on the third, an MCP session with the new token (a cold delegation), and
// every other login revoked. It fails on any error, and unless, at the end,
//   - each node's heap after a forced GC is at most 1.1 times its heap after the warm-up,
//   - each node's goroutines are back to their number after the warm-up,
//   - the records in Redis are back to their floor (the count before any login) once their
//     TTLs have passed.
//
// Sessions, tokens and codes live SOAK_TTL (default 60s; code_ttl and refresh_grace 10s) so
// that what the logins stored expires within the run; the warm sessions refresh their
// broker tokens every third of it. SOAK_REDIS is the address of the redis-server to use
// (the script starts one); without it the test starts its own. With SOAK_PROFILES, a
// folder, each node's heap profile is saved there at the baseline and at the end. SOAK_WORKERS (default 8)
// warm MCP sessions and SOAK_LOGIN_WORKERS (default 2) login loops run at once.
func TestSoak(t *testing.T) {
	requests := soakEnvInt(t, "SOAK_REQUESTS", 200000)
	logins := soakEnvInt(t, "SOAK_LOGINS", 5000)
	workers := soakEnvInt(t, "SOAK_WORKERS", 8)
	loginWorkers := soakEnvInt(t, "SOAK_LOGIN_WORKERS", 2)
	ttl := 60 * time.Second
	if v := os.Getenv("SOAK_TTL"); v != "" {
		var err error
		if ttl, err = time.ParseDuration(v); err != nil {
			t.Fatalf("SOAK_TTL: %v", err)
		}
	}
	redisAddr := os.Getenv("SOAK_REDIS")
	if redisAddr == "" {
		redisAddr = testenv.Redis(t).Addr
	}
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr})
	t.Cleanup(func() { rdb.Close() })

	s := &soak{t: t, ttl: ttl}
	s.start(redisAddr)
	started := time.Now()

	// The floor: what the nodes store with no user logged in (clients registered before).
	clients := make([]string, workers+loginWorkers)
	for i := range clients {
		clients[i] = s.register(s.c.node(i), soakAddress(250, i))
	}
	// The floor. No janitor's marker joins it: on Redis the janitor does not sweep.
	floor := countRecords(t, rdb)
	t.Logf("records at the floor (clients registered, nobody logged in): %d %v", floor.total, floor)

	// Warm-up: the warm sessions log in and send a share of calls while logins run, so that
	// every path, pool and cache has been used once before the baseline is taken.
	warm := make([]*soakSession, workers)
	for w := range warm {
		warm[w] = s.warmSession(clients[w], w)
	}
	warmupRequests := max(requests/50, 50*workers)
	warmupLogins := 3 * soakAddresses // each address on each node once
	s.load(warm, clients[workers:], warmupRequests, warmupLogins, 0)
	if s.failed() {
		t.Fatalf("warm-up: %d errors: %v", s.errors.Load(), s.firstErrors())
	}
	closeIdle()
	time.Sleep(2 * time.Second)
	baseline := s.stats()
	for i, st := range baseline {
		t.Logf("node %c after warm-up: heap %s (/debug/vars after the profile: %s), %d goroutines", 'A'+i, mib(st.heap), mib(st.heapVars), st.goroutines)
	}

	// The run.
	runStart := time.Now()
	cpu := s.cpu()
	s.load(warm, clients[workers:], requests, logins, warmupLogins)
	took := time.Since(runStart)
	cpuUsed := s.cpu() - cpu
	peak := countRecords(t, rdb)
	upOK, upRefused := s.c.up.Served()
	t.Logf("run: %d MCP calls and %d logins in %s (%.0f calls/s beside %.1f logins/s); caddy CPU (3 nodes) %s",
		requests, logins, took.Round(time.Second), float64(requests)/took.Seconds(), float64(logins)/took.Seconds(), cpuUsed.Round(time.Second))
	t.Logf("upstream: %d requests authenticated, %d refused; records after the run: %d %v", upOK, upRefused, peak.total, peak)

	// The warm sessions end: their users log out (revocation of the refresh token).
	for _, ws := range warm {
		ws.end(s)
	}
	if s.failed() {
		t.Errorf("%d errors: %v", s.errors.Load(), s.firstErrors())
	}
	if upRefused != 0 {
		t.Errorf("the upstream refused %d delegated tokens", upRefused)
	}

	// The floor again, once every record's TTL has passed (the longest: a used code's
	// marker, 10 x code_ttl): Redis expires records itself, and nothing sweeps them.
	ended := time.Now()
	deadline := ended.Add(ttl + 100*time.Second + 90*time.Second)
	var end recordCount
	for {
		end = countRecords(t, rdb)
		if end.total <= floor.total || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Second)
	}
	t.Logf("records %s after the run: %d (floor %d) %v", time.Since(ended).Round(time.Second), end.total, floor.total, end)
	if rdb.Exists(t.Context(), janitorMarker).Val() != 0 {
		t.Error("the janitor swept Redis, whose records expire by their TTLs")
	}
	if end.total > floor.total {
		t.Errorf("records did not fall back to their floor: %d, floor %d; %v", end.total, floor.total, end)
	}

	// The heap and the goroutines: memory caches hold a delegated token up to 5 minutes
	// and drop expired entries every minute; idle connections close on their own time.
	var final []nodeStats
	for deadline := ended.Add(7 * time.Minute); ; {
		closeIdle()
		final = s.stats()
		back := true
		for i := range final {
			back = back && final[i].goroutines <= baseline[i].goroutines && float64(final[i].heap) <= 1.1*float64(baseline[i].heap)
		}
		if back || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Second)
	}
	t.Logf("heap and goroutines read %s after the run", time.Since(ended).Round(time.Second))
	for i := range final {
		ratio := float64(final[i].heap) / float64(baseline[i].heap)
		t.Logf("node %c at the end: heap %s (%.2fx the warm-up's; /debug/vars after the profile: %s, %.2fx), %d goroutines (warm-up %d)",
			'A'+i, mib(final[i].heap), ratio, mib(final[i].heapVars), float64(final[i].heapVars)/float64(baseline[i].heapVars), final[i].goroutines, baseline[i].goroutines)
		if ratio > 1.1 {
			t.Errorf("node %c: heap after GC %s, more than 1.1x its %s after the warm-up", 'A'+i, mib(final[i].heap), mib(baseline[i].heap))
		}
		if final[i].goroutines > baseline[i].goroutines {
			t.Errorf("node %c: %d goroutines, %d after the warm-up", 'A'+i, final[i].goroutines, baseline[i].goroutines)
		}
	}
	for _, ws := range warm {
		ws.session.Close()
	}
	t.Logf("SOAK requests=%d logins=%d errors=%d duration=%s", requests, logins, s.errors.Load(), time.Since(started).Round(time.Second))
}

// soak is the run's cluster, its counters and its errors.
type soak struct {
	t   *testing.T
	ttl time.Duration
	c   *cluster
	// loginOnly ends each login at the token answer (no MCP session, no revocation).
	loginOnly bool

	errors atomic.Int64
	mu     sync.Mutex
	first  []string // the first errors, for the report
}

// node is the cluster's i-th node, counting round.
func (c *cluster) node(i int) *caddyProc { return c.nodes[i%len(c.nodes)] }

// start starts the soak's three nodes on Redis.
func (s *soak) start(redisAddr string) {
	s.startNodes(3, fmt.Sprintf("\tstorage mcp_oauth_redis {\n\t\taddresses %s\n\t}", redisAddr))
}

// startNodes starts the OP, the upstream and n nodes with the storage lines given for
// Caddy's global options.
func (s *soak) startNodes(n int, storage string) {
	t := s.t
	o := testenv.StartOP(t, testenv.WithoutTokenExchangeAdvertised())
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI), testenv.Unrecorded())
	portA := freePort(t)
	site := clusterSite(o, up.URL, portA, testKey, "session_ttl "+s.ttl.String(), "access_token_ttl "+s.ttl.String(),
		"refresh_token_ttl "+s.ttl.String(), "code_ttl 10s", "refresh_grace 10s")
	global := withGlobal(storage + "\n\tservers {\n\t\ttrusted_proxies static 127.0.0.1/32\n\t}")
	s.c = &cluster{o: o, up: up}
	for i := range n {
		opts := []caddyOption{global, withLogLevel("INFO"), withAdmin(freePort(t))}
		if os.Getenv("SOAK_PROFILES") != "" {
			opts = append(opts, withEnv("GODEBUG=memprofilerate=4096")) // a finer heap profile
		}
		if i == 0 {
			opts = append(opts, withPort(portA))
		}
		s.c.nodes = append(s.c.nodes, startCaddy(t, site, opts...))
	}
	t.Cleanup(func() {
		for _, n := range s.c.nodes {
			n.assertLogsFree(append(s.c.secrets, testenv.BrokerClientSecret, testKey)...)
		}
	})
}

// fail counts an error and keeps the first few.
func (s *soak) fail(format string, args ...any) {
	if s.errors.Add(1) <= 10 {
		s.mu.Lock()
		s.first = append(s.first, fmt.Sprintf(format, args...))
		s.mu.Unlock()
	}
}

func (s *soak) failed() bool { return s.errors.Load() != 0 }

func (s *soak) firstErrors() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.first)
}

// janitorMarker is the key of the janitor's marker record in Redis (storage's
// janitorMarkerKey under the storage's default key prefix).
const janitorMarker = "caddy/mcp_oauth/janitor/last_run"

// soakAddresses is how many client addresses the logins come from. Few, so that state
// kept per address (rate limits: bounded, never freed) is all there after the warm-up and
// the heap's check finds leaks, not the filling of bounded tables; enough that no address
// reaches a rate limit.
const soakAddresses = 64

// soakAddress is the client address of user i in group g, as the load balancer reports it.
func soakAddress(g, i int) string {
	return fmt.Sprintf("10.%d.%d.%d", g, (i>>8)&255, i&255)
}

// forwardedFor adds the client's address as the load balancer in front of the nodes does.
type forwardedFor struct {
	addr string
	next http.RoundTripper
}

func (f forwardedFor) RoundTrip(req *http.Request) (*http.Response, error) {
	r := req.Clone(req.Context())
	r.Header.Set("X-Forwarded-For", f.addr)
	return f.next.RoundTrip(r)
}

// soakTransport is shared by the soak's clients: loopback, many connections kept.
var soakTransport = &http.Transport{MaxIdleConnsPerHost: 64, IdleConnTimeout: 30 * time.Second}

func (s *soak) register(node *caddyProc, addr string) string {
	body := `{"client_name":"soak client","redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none","grant_types":["authorization_code","refresh_token"]}`
	req, _ := http.NewRequest(http.MethodPost, node.Base+"/oauth/register", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Transport: forwardedFor{addr, soakTransport}}).Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		ClientID string `json:"client_id"`
	}
	json.NewDecoder(resp.Body).Decode(&out)
	if resp.StatusCode != http.StatusCreated || out.ClientID == "" {
		s.t.Fatalf("registering: %s", resp.Status)
	}
	return out.ClientID
}

// login is one user's whole hybrid login from addr, spread over the nodes from first on,
// ending with the code redeemed: the token answer.
func (s *soak) login(ctx context.Context, clientID, addr string, first int) (*clusterClient, tokenAnswer, error) {
	a, b, c := s.c.node(first), s.c.node(first+1), s.c.node(first+2)
	br := newBrowser(s.c.o)
	br.client.Transport = forwardedFor{addr, soakTransport}
	client := &clusterClient{id: clientID}
	code, err := s.c.authorize(ctx, br, client, a, b)
	if err != nil {
		return nil, tokenAnswer{}, fmt.Errorf("login on %s, callback on %s: %w", a.Base, b.Base, err)
	}
	status, tok, err := s.token(ctx, c, addr, url.Values{"grant_type": {"authorization_code"}, "code": {code}, "client_id": {clientID},
		"redirect_uri": {"http://127.0.0.1/cb"}, "code_verifier": {client.verifier}})
	if err == nil && (status != http.StatusOK || tok.AccessToken == "") {
		err = fmt.Errorf("redeeming on %s: %d %s", c.Base, status, tok.Error)
	}
	if first%100 == 0 { // a sample for the log check: all would make it quadratic
		s.c.secret(code, tok.AccessToken, tok.RefreshToken)
	}
	return client, tok, err
}

// token posts form to node's token endpoint (or, for a revocation, its revocation endpoint)
// from addr.
func (s *soak) token(ctx context.Context, node *caddyProc, addr string, form url.Values) (int, tokenAnswer, error) {
	path := "/oauth/token"
	if form.Get("grant_type") == "" {
		path = "/oauth/revoke"
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, node.Base+path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := (&http.Client{Transport: forwardedFor{addr, soakTransport}}).Do(req)
	if err != nil {
		return 0, tokenAnswer{}, err
	}
	defer resp.Body.Close()
	var a tokenAnswer
	if path == "/oauth/token" {
		if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
			return resp.StatusCode, a, fmt.Errorf("token answer: %s: %w", resp.Status, err)
		}
	}
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, a, nil
}

// soakSession is a warm MCP client session, its requests round robin over the nodes.
type soakSession struct {
	client    string
	addr      string
	rr        *roundRobin
	session   *mcp.ClientSession
	refresh   string
	refreshed time.Time
	next      int // the node of the next refresh
}

func (s *soak) warmSession(clientID string, w int) *soakSession {
	addr := soakAddress(251, w)
	_, tok, err := s.login(s.t.Context(), clientID, addr, w)
	if err != nil {
		s.t.Fatalf("warm session %d: %v", w, err)
	}
	rr := newRoundRobin(s.c.nodes, tok.AccessToken)
	rr.transport = forwardedFor{addr, soakTransport}
	session, err := mcp.NewClient(&mcp.Implementation{Name: "soak", Version: "1"}, nil).Connect(s.t.Context(),
		&mcp.StreamableClientTransport{Endpoint: s.c.nodes[0].Base + "/mcp", HTTPClient: &http.Client{Transport: rr}, DisableStandaloneSSE: true}, nil)
	if err != nil {
		s.t.Fatalf("warm session %d: connecting: %v", w, err)
	}
	return &soakSession{client: clientID, addr: addr, rr: rr, session: session, refresh: tok.RefreshToken, refreshed: time.Now(), next: w}
}

// call sends one tools/call, refreshing the broker token first when a third of its TTL
// has passed.
func (ws *soakSession) call(s *soak, i int) {
	ctx := s.t.Context()
	if time.Since(ws.refreshed) > s.ttl/3 {
		ws.next++
		node := s.c.node(ws.next)
		status, tok, err := s.token(ctx, node, ws.addr, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {ws.refresh}, "client_id": {ws.client}})
		switch {
		case err != nil:
			s.fail("refresh on %s: %v", node.Base, err)
		case status != http.StatusOK || tok.AccessToken == "":
			s.fail("refresh on %s: %d %s", node.Base, status, tok.Error)
		default:
			ws.rr.token.Store(&tok.AccessToken)
			ws.refresh, ws.refreshed = tok.RefreshToken, time.Now()
		}
	}
	call := &mcp.CallToolParams{Name: "notes_read"}
	if i%100 == 0 {
		call = &mcp.CallToolParams{Name: "notes_write", Arguments: map[string]any{"text": "x"}}
	}
	res, err := ws.session.CallTool(ctx, call)
	switch {
	case err != nil:
		s.fail("%s: %v", call.Name, err)
	case res.IsError:
		s.fail("%s: tool error %+v", call.Name, res.Content)
	}
	if i%100 == 0 && err == nil {
		// Keep the upstream's notes bounded: notes_write appends one per call.
		ws.session.CallTool(ctx, &mcp.CallToolParams{Name: "notes_read"})
	}
}

// end logs the warm session's user out.
func (ws *soakSession) end(s *soak) {
	status, _, err := s.token(s.t.Context(), s.c.nodes[0], ws.addr, url.Values{"token": {ws.refresh}, "client_id": {ws.client}})
	if err != nil || status != http.StatusOK {
		s.fail("revoking a warm session: %d %v", status, err)
	}
}

// load sends requests MCP calls over the warm sessions while logins logins (numbered from
// firstLogin, for their addresses) run over the login clients, and waits for both.
func (s *soak) load(warm []*soakSession, loginClients []string, requests, logins, firstLogin int) {
	var wg sync.WaitGroup
	var sent atomic.Int64
	for _, ws := range warm {
		wg.Go(func() {
			for {
				i := sent.Add(1)
				if i > int64(requests) {
					return
				}
				ws.call(s, int(i))
			}
		})
	}
	var started atomic.Int64
	for _, clientID := range loginClients {
		wg.Go(func() {
			for {
				i := int(started.Add(1)) - 1
				if i >= logins {
					return
				}
				s.loginAndUse(clientID, firstLogin+i)
			}
		})
	}
	wg.Wait()
}

// loginAndUse logs user n in, opens an MCP session with the token on another node (the
// delegated token made cold), calls a tool, and revokes every other user's grant.
func (s *soak) loginAndUse(clientID string, n int) {
	ctx := s.t.Context()
	addr := soakAddress(1, n%soakAddresses)
	client, tok, err := s.login(ctx, clientID, addr, n)
	if err != nil {
		s.fail("login %d: %v", n, err)
		return
	}
	if s.loginOnly {
		return
	}
	node := s.c.node(n + 1)
	session, err := mcp.NewClient(&mcp.Implementation{Name: "soak-login", Version: "1"}, nil).Connect(ctx,
		&mcp.StreamableClientTransport{Endpoint: node.Base + "/mcp", DisableStandaloneSSE: true,
			HTTPClient: &http.Client{Transport: forwardedFor{addr, bearer{tok.AccessToken, soakTransport}}}}, nil)
	if err != nil {
		s.fail("login %d: connecting on %s: %v", n, node.Base, err)
		return
	}
	if res, err := session.CallTool(ctx, &mcp.CallToolParams{Name: "notes_read"}); err != nil || res.IsError {
		s.fail("login %d: notes_read on %s: %v", n, node.Base, err)
	}
	session.Close()
	if n%2 == 0 {
		status, _, err := s.token(ctx, s.c.node(n), addr, url.Values{"token": {tok.RefreshToken}, "client_id": {client.id}})
		if err != nil || status != http.StatusOK {
			s.fail("login %d: revoking: %d %v", n, status, err)
		}
	}
}

// bearer adds a bearer token to every request.
type bearer struct {
	token string
	next  http.RoundTripper
}

func (b bearer) RoundTrip(req *http.Request) (*http.Response, error) {
	r := req.Clone(req.Context())
	r.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(r)
}

// closeIdle closes the clients' idle connections, so that the nodes' goroutines serving
// them end.
func closeIdle() {
	soakTransport.CloseIdleConnections()
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
}

// nodeStats is what a node's admin API tells of its process.
type nodeStats struct {
	heap       uint64 // bytes of live heap after a forced GC
	goroutines int
	// heapVars is HeapAlloc as /debug/vars reads it after the heap profile has been
	// written: the live heap plus the profile's own garbage. Logged, not checked.
	heapVars uint64
}

// stats reads each node's heap after a forced garbage collection and its goroutines
// (see readNodeStats).
func (s *soak) stats() []nodeStats {
	out := make([]nodeStats, len(s.c.nodes))
	for i, n := range s.c.nodes {
		out[i] = readNodeStats(s.t, n)
		if dir := os.Getenv("SOAK_PROFILES"); dir != "" {
			// The heap profile, for `go tool pprof -base` between the warm-up and the end.
			name := fmt.Sprintf("%s/heap-%c-%d.pb.gz", dir, 'A'+i, time.Now().Unix())
			if err := os.WriteFile(name, adminGet(s.t, "http://"+n.admin+"/debug/pprof/heap"), 0o600); err != nil {
				s.t.Fatal(err)
			}
		}
	}
	return out
}

// readNodeStats reads n's heap after a forced GC and its goroutines.
//
// The heap is HeapAlloc as the admin API's /debug/pprof/heap?gc=1&debug=1 reads it:
// net/http/pprof runs runtime.GC (which returns with the heap swept), then runtime/pprof
// reads runtime.MemStats before it allocates anything for the profile, and prints it at
// the profile's end ("# HeapAlloc = ..."). So it is the live heap the GC marked, plus what
// the idle node allocated in the microseconds between. HeapAlloc from /debug/vars after
// that request (what this read before) also counts the profile just written, garbage
// that grows with the profile's buckets over the process's life. runtime/metrics'
// /gc/heap/live:bytes would do as well, but Caddy exposes it nowhere: its /metrics
// registers client_golang's Go collector with the default runtime metrics only.
func readNodeStats(t *testing.T, n *caddyProc) nodeStats {
	admin := "http://" + n.admin
	var profile []byte
	for range 2 { // a second GC frees what finalizers of the first let go, and the first's profile
		profile = adminGet(t, admin+"/debug/pprof/heap?gc=1&debug=1")
	}
	heap, err := memStat(profile, "HeapAlloc")
	if err != nil {
		t.Fatalf("%s: heap profile: %v", n.Base, err)
	}
	var vars struct {
		MemStats struct {
			HeapAlloc uint64
		} `json:"memstats"`
	}
	if err := json.Unmarshal(adminGet(t, admin+"/debug/vars"), &vars); err != nil {
		t.Fatalf("%s: /debug/vars: %v", n.Base, err)
	}
	line, _, _ := bufio.NewReader(strings.NewReader(string(adminGet(t, admin+"/debug/pprof/goroutine?debug=1")))).ReadLine()
	total, err := strconv.Atoi(strings.TrimPrefix(string(line), "goroutine profile: total "))
	if err != nil {
		t.Fatalf("%s: goroutine profile begins %q", n.Base, line)
	}
	return nodeStats{heap: heap, goroutines: total, heapVars: vars.MemStats.HeapAlloc}
}

// memStat is the runtime.MemStats field name from the "# name = value" lines a heap
// profile in text form (debug=1) ends with.
func memStat(profile []byte, name string) (uint64, error) {
	prefix := "# " + name + " = "
	for line := range strings.Lines(string(profile)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), prefix); ok {
			return strconv.ParseUint(v, 10, 64)
		}
	}
	return 0, fmt.Errorf("no %q line", prefix)
}

func adminGet(t *testing.T, u string) []byte {
	resp, err := http.Get(u)
	if err != nil {
		t.Fatalf("admin API: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("admin API %s: %s %v", u, resp.Status, err)
	}
	return body
}

// cpu is the CPU time the three nodes have used so far.
func (s *soak) cpu() time.Duration {
	var d time.Duration
	for _, n := range s.c.nodes {
		d += n.cpuTime()
	}
	return d
}

// recordCount is the keys in Redis, in total and by kind (the key's path up to its last
// element, locks apart).
type recordCount struct {
	total int
	kinds map[string]int
}

func countRecords(t *testing.T, rdb *redis.Client) recordCount {
	t.Helper()
	c := recordCount{kinds: map[string]int{}}
	iter := rdb.Scan(context.Background(), 0, "*", 1000).Iterator()
	for iter.Next(context.Background()) {
		key := iter.Val()
		kind := key
		if i := strings.LastIndexByte(key, '/'); i > 0 {
			kind = key[:i]
		} else if i := strings.Index(key, ":lock:"); i > 0 {
			kind = key[:i+len(":lock:")]
		}
		c.total++
		c.kinds[kind]++
	}
	if err := iter.Err(); err != nil {
		t.Fatalf("counting keys in Redis: %v", err)
	}
	return c
}

func (c recordCount) String() string {
	kinds := make([]string, 0, len(c.kinds))
	for k, n := range c.kinds {
		kinds = append(kinds, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(kinds)
	return strings.Join(kinds, " ")
}

func soakEnvInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		t.Fatalf("%s: want a count, got %q", name, v)
	}
	return n
}

func mib(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
