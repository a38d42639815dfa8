//go:build long

package e2e

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestScaleWarmPath is BENCHMARKS.md's warm path, run by scripts/scale.sh (build tag long):
// the same MCP request through three caddy processes started side by side — Caddy's
// reverse_proxy alone, mcp_oauth in hybrid mode (a broker token from a login, the delegated
// token cached) and in progressive mode (the IdP's JWT, the exchanged token cached) — in
// SCALE_ROUNDS rounds (default 7). In each round every configuration, in an order that
// rotates, is warmed up (SCALE_WARMUP requests, default 2000) and then measured
// (SCALE_REQUESTS, default 20000, from SCALE_CONCURRENCY goroutines, default 8): wall time
// and caddy's CPU time (from /proc) per request. It reports each configuration's median and
// range over the rounds, its throughput ratio to reverse_proxy alone, and the CPU it adds
// per request. A ratio above 1 is noise larger than the difference: the test says so. With
// SCALE_OAUTH2_PROXY, the path of an oauth2-proxy binary, oauth2-proxy validating the same
// JWT as progressive mode joins the rounds. With SCALE_PROFILE, a folder, each caddy's CPU
// profile under the same load (10 s, from its admin API's /debug/pprof) is written there
// after the rounds, for `go tool pprof`.
func TestScaleWarmPath(t *testing.T) {
	rounds := soakEnvInt(t, "SCALE_ROUNDS", 7)
	warmup := soakEnvInt(t, "SCALE_WARMUP", 2000)
	requests := soakEnvInt(t, "SCALE_REQUESTS", 20000)
	concurrency := soakEnvInt(t, "SCALE_CONCURRENCY", 8)
	profiles := os.Getenv("SCALE_PROFILE")

	o := testenv.StartOP(t)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}`)
	}))
	t.Cleanup(upstream.Close)
	up := strings.TrimPrefix(upstream.URL, "http://")
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read","arguments":{}}}`

	caddyConfig := func(name string, p *caddyProc, token string) *config {
		c := &config{name: name, base: p.Base, cpu0: p.cpuTime, token: token}
		if p.admin != "off" {
			c.admin = p.admin
		}
		return c
	}
	caddyOptions := func(port int) []caddyOption {
		opts := []caddyOption{withPort(port), withLogLevel("INFO")}
		if profiles != "" {
			opts = append(opts, withAdmin(freePort(t)))
		}
		return opts
	}
	broker := func(mode, resource string) string {
		return fmt.Sprintf(`mcp_oauth {
		mode %s
		issuer %s
		client_id %s
		client_secret %s
		resource %s
		scopes openid notes:read notes:write
		encryption_key %s
		delegation token_exchange {
			audience nextcloud
		}
		tool_scope notes_read notes:read
	}`, mode, o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, resource, testKey)
	}
	var configs []*config
	{
		port := freePort(t)
		configs = append(configs, caddyConfig("reverse_proxy alone",
			startCaddy(t, fmt.Sprintf("http://127.0.0.1:%d {\n\treverse_proxy %s\n}", port, up), caddyOptions(port)...), "unused"))
	}
	{
		port := freePort(t)
		resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
		p := startCaddy(t, fmt.Sprintf("http://127.0.0.1:%d {\n\t%s\n\treverse_proxy %s\n}", port, broker("hybrid", resource), up), caddyOptions(port)...)
		c := &cluster{o: o, nodes: []*caddyProc{p}}
		client := &clusterClient{id: dcrRegister(t, p.Base)}
		code := c.login(t, client, p, p)
		status, tok := c.redeem(t, p, client, code)
		if status != http.StatusOK {
			t.Fatalf("hybrid login: %d %s", status, tok.Error)
		}
		configs = append(configs, caddyConfig("mcp_oauth hybrid", p, tok.AccessToken))
	}
	{
		port := freePort(t)
		resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
		p := startCaddy(t, fmt.Sprintf("http://127.0.0.1:%d {\n\t%s\n\treverse_proxy %s\n}", port, broker("progressive", resource), up), caddyOptions(port)...)
		claims := o.AccessTokenClaims(o.User.Subject, resource)
		claims["scope"] = "openid notes:read"
		claims["exp"] = time.Now().Add(time.Hour).Unix()
		jwt := o.MintJWT(claims)
		configs = append(configs, caddyConfig("mcp_oauth progressive", p, jwt))
		if bin := os.Getenv("SCALE_OAUTH2_PROXY"); bin != "" {
			// oauth2-proxy validating the same JWT (its issuer's JWKS, audience the resource),
			// in front of the same upstream, its logs off.
			configs = append(configs, startOAuth2Proxy(t, bin, o, resource, upstream.URL, jwt))
		}
	}

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	var failures atomic.Int64
	send := func(c *config, n int) {
		var wg sync.WaitGroup
		var next atomic.Int64
		for range concurrency {
			wg.Go(func() {
				for next.Add(1) <= int64(n) {
					req, _ := http.NewRequest(http.MethodPost, c.base+"/mcp", strings.NewReader(body))
					req.Header.Set("Authorization", "Bearer "+c.token)
					req.Header.Set("Content-Type", "application/json")
					resp, err := client.Do(req)
					if err != nil {
						failures.Add(1)
						continue
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK && failures.Add(1) == 1 {
						t.Logf("%s: %s", c.name, resp.Status)
					}
				}
			})
		}
		wg.Wait()
	}
	for r := range rounds {
		for i := range configs {
			c := configs[(i+r)%len(configs)]
			send(c, warmup)
			cpu, start := c.cpu0(), time.Now()
			send(c, requests)
			wall := time.Since(start)
			c.wall = append(c.wall, float64(wall.Microseconds())/float64(requests))
			c.cpu = append(c.cpu, float64((c.cpu0()-cpu).Microseconds())/float64(requests))
		}
		if failures.Load() != 0 {
			t.Fatalf("round %d: %d requests failed", r+1, failures.Load())
		}
	}
	base := configs[0]
	for _, c := range configs {
		t.Logf("%-22s wall %6.1f µs/request (range %.1f–%.1f), proxy CPU %6.1f µs/request (range %.1f–%.1f), throughput ratio %.3f, added CPU %+.1f µs/request",
			c.name, median(c.wall), slices.Min(c.wall), slices.Max(c.wall), median(c.cpu), slices.Min(c.cpu), slices.Max(c.cpu),
			median(base.wall)/median(c.wall), median(c.cpu)-median(base.cpu))
		if c != base && median(base.wall)/median(c.wall) > 1 {
			t.Logf("%s: a ratio above 1 is noise larger than the broker's cost: compare the CPU figures", c.name)
		}
	}
	t.Logf("SCALE rounds=%d warmup=%d requests=%d concurrency=%d", rounds, warmup, requests, concurrency)
	for i, c := range configs {
		if profiles == "" || c.admin == "" {
			continue
		}
		file := filepath.Join(profiles, fmt.Sprintf("warm-%d-%s.pprof", i, strings.ReplaceAll(c.name, " ", "_")))
		done := make(chan error, 1)
		go func() { done <- fetchCPUProfile(c.admin, 10, file) }()
		for profiling := true; profiling; {
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				profiling = false
			default:
				send(c, warmup)
			}
		}
		t.Logf("%s: CPU profile in %s", c.name, file)
	}
}

// fetchCPUProfile writes a CPU profile of seconds from the caddy whose admin API is at
// admin into file.
func fetchCPUProfile(admin string, seconds int, file string) error {
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", admin, seconds))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("CPU profile: %s", resp.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// TestScaleLogins is BENCHMARKS.md's login path: SCALE_LOGINS full hybrid logins (default
// 300; authorize, consent, the IdP, the callback, the token) from SCALE_LOGIN_WORKERS loops
// (default 4) through one caddy process on a shared folder and on Redis, in turn. The IdP
// runs in the test's process, so the broker's own part is caddy's CPU per login; the
// logins per second it implies on one core are 1 / that. With SCALE_PROFILE, a folder,
// caddy's CPU profile over 10 s of more logins is written there for each storage.
func TestScaleLogins(t *testing.T) {
	logins := soakEnvInt(t, "SCALE_LOGINS", 300)
	workers := soakEnvInt(t, "SCALE_LOGIN_WORKERS", 4)
	redisAddr := os.Getenv("SOAK_REDIS")
	if redisAddr == "" {
		redisAddr = testenv.Redis(t).Addr
	}
	dir, err := os.MkdirTemp("", "mcp_oauth-scale-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, st := range []struct{ name, lines string }{
		{"shared folder", "\tstorage file_system " + dir},
		{"redis", fmt.Sprintf("\tstorage mcp_oauth_redis {\n\t\taddresses %s\n\t}", redisAddr)},
	} {
		s := &soak{t: t, ttl: time.Hour, loginOnly: true}
		s.startNodes(1, st.lines)
		clients := make([]string, workers)
		for i := range clients {
			clients[i] = s.register(s.c.node(0), soakAddress(250, i))
		}
		s.load(nil, clients, 0, 3*soakAddresses, 0) // warm-up
		cpu, start := s.cpu(), time.Now()
		s.load(nil, clients, 0, logins, 3*soakAddresses)
		wall := time.Since(start)
		used := s.cpu() - cpu
		if s.failed() {
			t.Fatalf("%s: %d errors: %v", st.name, s.errors.Load(), s.firstErrors())
		}
		perLogin := float64(used.Microseconds()) / float64(logins)
		t.Logf("%-13s %d logins in %s: %.1f logins/s end to end; caddy CPU %.2f ms per login: %.0f logins/s per core for the broker's part",
			st.name, logins, wall.Round(100*time.Millisecond), float64(logins)/wall.Seconds(), perLogin/1000, 1e6/perLogin)
		if dir := os.Getenv("SCALE_PROFILE"); dir != "" {
			// caddy's CPU profile over 10 s of the same logins, after the measured ones.
			file := filepath.Join(dir, "logins-"+strings.ReplaceAll(st.name, " ", "_")+".pprof")
			done := make(chan error, 1)
			go func() { done <- fetchCPUProfile(s.c.node(0).admin, 10, file) }()
			for n := logins + 3*soakAddresses; ; n += 4 * workers {
				select {
				case err := <-done:
					if err != nil {
						t.Fatalf("%s: %v", st.name, err)
					}
					t.Logf("%s: CPU profile in %s", st.name, file)
				default:
					s.load(nil, clients, 0, 4*workers, n)
					continue
				}
				break
			}
		}
	}
}

// config is one proxy of the warm path's comparison and its figures.
type config struct {
	name  string
	base  string               // http://127.0.0.1:PORT
	cpu0  func() time.Duration // the proxy process's CPU time so far
	token string
	admin string    // the admin API's address of a caddy started with one, else ""
	wall  []float64 // µs per request, one per round
	cpu   []float64
}

// startOAuth2Proxy runs oauth2-proxy (bin) on a free port in front of upstream, accepting
// bearer JWTs of o's issuer for audience, until the test ends.
func startOAuth2Proxy(t *testing.T, bin string, o *testenv.OP, audience, upstream, token string) *config {
	t.Helper()
	port := freePort(t)
	cmd := exec.Command(bin,
		"--http-address", fmt.Sprintf("127.0.0.1:%d", port), "--upstream", upstream,
		"--provider", "oidc", "--oidc-issuer-url", o.Issuer,
		"--client-id", testenv.BrokerClientID, "--client-secret", testenv.BrokerClientSecret,
		"--cookie-secret", "0123456789abcdef0123456789abcdef", "--cookie-secure=false",
		"--email-domain", "*", "--oidc-email-claim", "sub", "--insecure-oidc-allow-unverified-email",
		"--skip-jwt-bearer-tokens", "--extra-jwt-issuers", o.Issuer+"="+audience, "--bearer-token-login-fallback=false",
		"--request-logging=false", "--auth-logging=false", "--standard-logging=false")
	logs := new(syncBuffer)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting oauth2-proxy: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	for deadline := time.Now().Add(20 * time.Second); ; {
		if resp, err := http.Get(base + "/ping"); err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("oauth2-proxy did not start:\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return &config{name: "oauth2-proxy v7.15.6", base: base, cpu0: func() time.Duration { return processCPU(t, cmd.Process.Pid) }, token: token}
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// TestScaleHeap is BENCHMARKS.md's (c): the heap of one caddy process (progressive mode,
// delegation none, so that only the verdict cache grows) after a forced GC with no token
// seen, and after one request each with SCALE_HEAP_TOKENS distinct valid JWTs (default
// 5000, 10000, 20000: the verdict cache holds 10,000), as bytes per cached verdict.
func TestScaleHeap(t *testing.T) {
	steps := []int{5000, 10000, 20000}
	if v := os.Getenv("SCALE_HEAP_TOKENS"); v != "" {
		steps = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				t.Fatalf("SCALE_HEAP_TOKENS: %v", err)
			}
			steps = append(steps, n)
		}
	}
	o := testenv.StartOP(t)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{}}`)
	}))
	t.Cleanup(upstream.Close)
	port := freePort(t)
	resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
	p := startCaddy(t, fmt.Sprintf(`http://127.0.0.1:%d {
	mcp_oauth {
		mode progressive
		issuer %s
		client_id %s
		client_secret %s
		resource %s
		scopes openid notes:read notes:write
		encryption_key %s
		delegation none
	}
	reverse_proxy %s
}`, port, o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, resource, testKey, strings.TrimPrefix(upstream.URL, "http://")),
		withPort(port), withLogLevel("INFO"), withAdmin(freePort(t)))
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	send := func(token string) {
		req, _ := http.NewRequest(http.MethodPost, p.Base+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %s", resp.Status)
		}
	}
	mint := func(i int) string {
		claims := o.AccessTokenClaims(fmt.Sprintf("user-%d", i), resource)
		claims["scope"] = "openid notes:read"
		claims["exp"] = time.Now().Add(time.Hour).Unix()
		return o.MintJWT(claims)
	}
	send(mint(-1)) // the JWKS fetched, the paths used once
	base := readNodeStats(t, p).heap
	t.Logf("heap with one token seen: %s", mib(base))
	seen := 0
	for _, n := range steps {
		var wg sync.WaitGroup
		var next atomic.Int64
		next.Store(int64(seen))
		for range 4 {
			wg.Go(func() {
				for i := next.Add(1); i <= int64(n); i = next.Add(1) {
					send(mint(int(i)))
				}
			})
		}
		wg.Wait()
		seen = n
		heap := readNodeStats(t, p).heap
		grown := float64(int64(heap) - int64(base))
		t.Logf("heap after %d distinct tokens: %s (%+.1f MiB, %.0f bytes per token seen)", n, mib(heap), grown/(1<<20), grown/float64(n))
	}
}

// TestScaleSessions is BENCHMARKS.md's (c) at scale: one caddy process in hybrid mode on
// Redis, SCALE_SESSIONS users (default 100000) logged in through the whole login path
// (authorize, consent, the IdP, the callback, the token; SCALE_LOGIN_WORKERS loops, default
// 4, from 1024 client addresses), and then one MCP request with each user's broker token
// (SCALE_CONCURRENCY goroutines, default 8): the token verified from storage and its
// verdict cached, the delegated token obtained by RFC 8693 exchange at the IdP and cached.
// The heap after a forced GC is read after a warm-up (every address seen once, the MCP path
// used), after the logins (sessions live in storage, not in the node), and at checkpoints
// of the requests, as bytes per active session over the baseline. Verdicts live 30 s and
// delegated tokens until shortly before they expire, each cache at most 10,000 entries, so
// past 10,000 active sessions the heap must stop growing.
func TestScaleSessions(t *testing.T) {
	sessions := soakEnvInt(t, "SCALE_SESSIONS", 100000)
	loginWorkers := soakEnvInt(t, "SCALE_LOGIN_WORKERS", 4)
	concurrency := soakEnvInt(t, "SCALE_CONCURRENCY", 8)
	const addresses = 1024 // 60 authorizations a minute each: enough for ~1000 logins/s
	redisAddr := os.Getenv("SOAK_REDIS")
	if redisAddr == "" {
		redisAddr = testenv.Redis(t).Addr
	}
	o := testenv.StartOP(t)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}`)
	}))
	t.Cleanup(upstream.Close)
	port := freePort(t)
	site := clusterSite(o, upstream.URL, port, testKey, "session_ttl 2h", "access_token_ttl 1h", "refresh_token_ttl 2h")
	p := startCaddy(t, site, withPort(port), withAdmin(freePort(t)), withLogLevel("WARN"),
		withGlobal(fmt.Sprintf("\tstorage mcp_oauth_redis {\n\t\taddresses %s\n\t}\n\tservers {\n\t\ttrusted_proxies static 127.0.0.1/32\n\t}", redisAddr)))
	s := &soak{t: t, ttl: 2 * time.Hour, loginOnly: true, c: &cluster{o: o, nodes: []*caddyProc{p}}}
	clients := make([]string, loginWorkers)
	for i := range clients {
		clients[i] = s.register(p, soakAddress(250, i))
	}
	address := func(n int) string { return soakAddress(2, n%addresses) }

	// The users' logins, numbered from first; their access tokens in tokens.
	tokens := make([]string, sessions)
	logins := func(first, n int, keep bool) {
		var wg sync.WaitGroup
		var next atomic.Int64
		for _, clientID := range clients {
			wg.Go(func() {
				for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
					_, tok, err := s.login(t.Context(), clientID, address(first+i), first+i)
					if err != nil {
						s.fail("login %d: %v", first+i, err)
						continue
					}
					if keep {
						tokens[i] = tok.AccessToken
					}
				}
			})
		}
		wg.Wait()
		if s.failed() {
			t.Fatalf("%d errors: %v", s.errors.Load(), s.firstErrors())
		}
	}
	mcp := func(i int, token string) {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, p.Base+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		resp, err := (&http.Client{Transport: forwardedFor{address(i), soakTransport}}).Do(req)
		if err != nil {
			s.fail("MCP request %d: %v", i, err)
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			s.fail("MCP request %d: %s", i, resp.Status)
		}
	}

	// Warm-up: every address through the login path once (the rate limiters' buckets, kept
	// per address, are then part of the baseline), and the MCP path used by a few.
	logins(sessions, addresses, false)
	for i := range 8 {
		_, tok, err := s.login(t.Context(), clients[0], address(i), sessions+addresses+i)
		if err != nil {
			t.Fatal(err)
		}
		mcp(i, tok.AccessToken)
	}
	closeIdle()
	base := readNodeStats(t, p).heap
	t.Logf("heap after the warm-up (%d logins, 8 MCP requests): %s", addresses+8, mib(base))

	start := time.Now()
	logins(0, sessions, true)
	took := time.Since(start)
	closeIdle()
	heap := readNodeStats(t, p).heap
	t.Logf("%d sessions logged in, in %s (%.0f logins/s): heap %s (%+.1f MiB over the warm-up's): sessions live in storage",
		sessions, took.Round(time.Second), float64(sessions)/took.Seconds(), mib(heap), float64(int64(heap)-int64(base))/(1<<20))

	checkpoints := []int{1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000}
	start = time.Now()
	done := 0
	for _, c := range checkpoints {
		c = min(c, sessions)
		if c <= done {
			continue
		}
		var wg sync.WaitGroup
		var next atomic.Int64
		next.Store(int64(done))
		for range concurrency {
			wg.Go(func() {
				for i := int(next.Add(1)) - 1; i < c; i = int(next.Add(1)) - 1 {
					mcp(i, tokens[i])
				}
			})
		}
		wg.Wait()
		if s.failed() {
			t.Fatalf("%d errors: %v", s.errors.Load(), s.firstErrors())
		}
		done = c
		heap := readNodeStats(t, p).heap
		grown := float64(int64(heap) - int64(base))
		t.Logf("%6d sessions with one MCP request each (%s since the first, %.0f requests/s): heap %s, %+.1f MiB over the warm-up's, %.0f bytes per session",
			c, time.Since(start).Round(time.Second), float64(c)/time.Since(start).Seconds(), mib(heap), grown/(1<<20), grown/float64(c))
	}
	t.Logf("SCALE sessions=%d addresses=%d login_workers=%d concurrency=%d", sessions, addresses, loginWorkers, concurrency)
}
