//go:build long

package e2e

import (
	"encoding/json"
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
// the same MCP request through caddy processes started side by side — Caddy's
// reverse_proxy alone, mcp_oauth in hybrid mode (a broker token from a login, the delegated
// token cached) and in progressive mode (the IdP's JWT, the exchanged token cached) — in
// SCALE_ROUNDS rounds (default 7). In each round every configuration, in an order that
// rotates, is warmed up (SCALE_WARMUP requests, default 2000) and then measured
// (SCALE_REQUESTS, default 20000, from SCALE_CONCURRENCY goroutines, default 8): wall time
// and the proxy's CPU time per request (its threads' run times from /proc, to the
// nanosecond), and the heap objects and bytes caddy allocated per request (its admin API's
// /debug/vars). reverse_proxy alone is sent progressive mode's JWT: what a client sends to
// an MCP server that checks the IdP's token itself. The test reports each configuration's
// median and range over the rounds, its throughput ratio to reverse_proxy alone, and the
// CPU it adds per request: the difference of the medians, and the median (and range) of
// the differences to reverse_proxy alone within each round, which slow drifts of the
// machine's load do not reach. A ratio above 1 is noise larger than the difference: the
// test says so.
//
// With SCALE_BASE_CADDY, the path of another caddy binary (say, built from main), its
// hybrid and progressive configurations join the same rounds as "base hybrid" and "base
// progressive", and the test also reports each mode's CPU per request over the base's, as
// the median of the differences within each round: a before and after in one run. With
// SCALE_TOGETHER set, each round sends to every configuration at once (each from its own
// SCALE_CONCURRENCY goroutines) instead of to one after the other: every process then
// meets the same load from the rest of the machine, at the price of sharing the cores with
// the others under test (the wall times are then the round's). With SCALE_OAUTH2_PROXY,
// the path of an oauth2-proxy binary, oauth2-proxy validating the same JWT as progressive
// mode joins the rounds.
//
// With SCALE_PROFILE, a folder, each caddy's CPU profile under the same load
// (SCALE_PROFILE_SECONDS, default 10, from its admin API's /debug/pprof; with
// SCALE_TOGETHER, all at once) is written there after the rounds, for `go tool pprof`, with
// the number of requests it served meanwhile; and for each mcp_oauth configuration the
// module's own share of caddy's CPU, read from its profile, in µs per request (moduleShare):
// a figure from one process over one stretch of time, which the load on the machine
// inflates as it does the whole but does not reach unevenly.
func TestScaleWarmPath(t *testing.T) {
	rounds := soakEnvInt(t, "SCALE_ROUNDS", 7)
	warmup := soakEnvInt(t, "SCALE_WARMUP", 2000)
	requests := soakEnvInt(t, "SCALE_REQUESTS", 20000)
	concurrency := soakEnvInt(t, "SCALE_CONCURRENCY", 8)
	profiles := os.Getenv("SCALE_PROFILE")
	baseBin := os.Getenv("SCALE_BASE_CADDY")
	together := os.Getenv("SCALE_TOGETHER") != ""

	o := testenv.StartOP(t)
	// What the upstream last received, to tell what each configuration forwards.
	var upstreamAuthorization atomic.Int64
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		upstreamAuthorization.Store(int64(len(r.Header.Get("Authorization"))))
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}`)
	}))
	t.Cleanup(upstream.Close)
	up := strings.TrimPrefix(upstream.URL, "http://")
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read","arguments":{}}}`

	caddyConfig := func(name string, p *caddyProc, token string) *config {
		return &config{name: name, base: p.Base, pid: p.cmd.Process.Pid, token: token, admin: p.admin, bin: p.bin}
	}
	// Every caddy has its admin API, for its allocation counts and profiles.
	caddyOptions := func(port int, bin string) []caddyOption {
		return []caddyOption{withPort(port), withLogLevel("INFO"), withAdmin(freePort(t)), withBinary(bin)}
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
		// Its token is progressive mode's JWT, set below: what a client sends to an MCP
		// server that checks the IdP's token itself, and as long as the brokers' requests.
		configs = append(configs, caddyConfig("reverse_proxy alone",
			startCaddy(t, fmt.Sprintf("http://127.0.0.1:%d {\n\treverse_proxy %s\n}", port, up), caddyOptions(port, caddyBin)...), ""))
	}
	brokers := func(prefix, bin string) {
		{
			port := freePort(t)
			resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
			p := startCaddy(t, fmt.Sprintf("http://127.0.0.1:%d {\n\t%s\n\treverse_proxy %s\n}", port, broker("hybrid", resource), up), caddyOptions(port, bin)...)
			c := &cluster{o: o, nodes: []*caddyProc{p}}
			client := &clusterClient{id: dcrRegister(t, p.Base)}
			code := c.login(t, client, p, p)
			status, tok := c.redeem(t, p, client, code)
			if status != http.StatusOK {
				t.Fatalf("%shybrid login: %d %s", prefix, status, tok.Error)
			}
			configs = append(configs, caddyConfig(prefix+"hybrid", p, tok.AccessToken))
		}
		{
			port := freePort(t)
			resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
			p := startCaddy(t, fmt.Sprintf("http://127.0.0.1:%d {\n\t%s\n\treverse_proxy %s\n}", port, broker("progressive", resource), up), caddyOptions(port, bin)...)
			claims := o.AccessTokenClaims(o.User.Subject, resource)
			claims["scope"] = "openid notes:read"
			claims["exp"] = time.Now().Add(time.Hour).Unix()
			jwt := o.MintJWT(claims)
			if configs[0].token == "" {
				configs[0].token = jwt
			}
			configs = append(configs, caddyConfig(prefix+"progressive", p, jwt))
			if bin := os.Getenv("SCALE_OAUTH2_PROXY"); bin != "" && prefix == "mcp_oauth " {
				// oauth2-proxy validating the same JWT (its issuer's JWKS, audience the resource),
				// in front of the same upstream, its logs off.
				configs = append(configs, startOAuth2Proxy(t, bin, o, resource, upstream.URL, jwt))
			}
		}
	}
	brokers("mcp_oauth ", caddyBin)
	if baseBin != "" {
		brokers("base ", baseBin)
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
					c.sent.Add(1)
					if resp.StatusCode != http.StatusOK && failures.Add(1) == 1 {
						t.Logf("%s: %s", c.name, resp.Status)
					}
				}
			})
		}
		wg.Wait()
	}
	for _, c := range configs {
		send(c, 1)
		t.Logf("%-22s request's Authorization %4d bytes, the upstream's %4d bytes", c.name, len("Bearer ")+len(c.token), upstreamAuthorization.Load())
	}
	// measure runs f (which sends n requests to each of cs) and records each one's figures.
	measure := func(cs []*config, n int, f func()) {
		m0, cpu0 := make([]*memStats, len(cs)), make([]processCPU, len(cs))
		for i, c := range cs {
			m0[i], cpu0[i] = c.memStats(t), readProcessCPU(t, c.pid)
		}
		start := time.Now()
		f()
		wall := time.Since(start)
		for i, c := range cs {
			used := readProcessCPU(t, c.pid).since(cpu0[i])
			m1 := c.memStats(t)
			c.wall = append(c.wall, float64(wall.Microseconds())/float64(n))
			c.cpu = append(c.cpu, float64(used.Nanoseconds())/1000/float64(n))
			if m0[i] != nil && m1 != nil {
				c.allocs = append(c.allocs, float64(m1.Mallocs-m0[i].Mallocs)/float64(n))
				c.bytes = append(c.bytes, float64(m1.TotalAlloc-m0[i].TotalAlloc)/float64(n))
				c.gcs = append(c.gcs, float64(m1.NumGC-m0[i].NumGC)*1000/float64(n))
			}
		}
	}
	// sendAll sends n requests to every configuration at once.
	sendAll := func(n int) {
		var wg sync.WaitGroup
		for _, c := range configs {
			wg.Go(func() { send(c, n) })
		}
		wg.Wait()
	}
	// Idle, a process costs CPU the rounds would count as the requests': its timers.
	{
		idle := make([]processCPU, len(configs))
		for i, c := range configs {
			idle[i] = readProcessCPU(t, c.pid)
		}
		time.Sleep(5 * time.Second)
		for i, c := range configs {
			t.Logf("%-22s idle: %.2f ms of CPU per second", c.name, float64(readProcessCPU(t, c.pid).since(idle[i]).Microseconds())/5000)
		}
	}
	for r := range rounds {
		if together {
			sendAll(warmup)
			measure(configs, requests, func() { sendAll(requests) })
		} else {
			for i := range configs {
				c := configs[(i+r)%len(configs)]
				send(c, warmup)
				measure([]*config{c}, requests, func() { send(c, requests) })
			}
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
	for _, c := range configs {
		line := fmt.Sprintf("%-22s", c.name)
		if c != base {
			d := differences(c.cpu, base.cpu)
			line += fmt.Sprintf(" added CPU within each round %+6.1f µs/request (range %+.1f…%+.1f)", median(d), slices.Min(d), slices.Max(d))
		}
		if len(c.allocs) > 0 {
			line += fmt.Sprintf(", %.1f allocations and %.0f bytes per request, %.2f GCs per 1000 requests", median(c.allocs), median(c.bytes), median(c.gcs))
		}
		t.Log(line)
	}
	for _, c := range configs {
		if m := c.memStats(t); m != nil {
			t.Logf("%-22s heap %.1f MiB, next GC at %.1f MiB, GC's share of CPU since start %.1f%%, pauses %.0f ms", c.name,
				float64(m.HeapAlloc)/(1<<20), float64(m.NextGC)/(1<<20), m.GCCPUFraction*100, float64(m.PauseTotalNs)/1e6)
		}
	}
	if baseBin != "" {
		for _, mode := range []string{"hybrid", "progressive"} {
			head, was := configByName(configs, "mcp_oauth "+mode), configByName(configs, "base "+mode)
			d := differences(head.cpu, was.cpu)
			t.Logf("%-11s this caddy over the base's: CPU %+.1f µs/request within each round (median; range %+.1f…%+.1f), allocations %+.1f per request",
				mode, median(d), slices.Min(d), slices.Max(d), median(head.allocs)-median(was.allocs))
		}
		t.Logf("base caddy: %s", baseBin)
	}
	t.Logf("SCALE rounds=%d warmup=%d requests=%d concurrency=%d together=%t", rounds, warmup, requests, concurrency, together)
	if profiles == "" {
		return
	}
	if err := os.MkdirAll(profiles, 0o755); err != nil {
		t.Fatal(err)
	}
	seconds := soakEnvInt(t, "SCALE_PROFILE_SECONDS", 10)
	// Each configuration's profile under its own load, or, with SCALE_TOGETHER, all at once
	// under the load of all.
	groups := [][]*config{configs}
	if !together {
		groups = nil
		for _, c := range configs {
			groups = append(groups, []*config{c})
		}
	}
	for _, g := range groups {
		done := make(chan error, len(g))
		cpu, served := make([]processCPU, len(g)), make([]int64, len(g))
		for i, c := range g {
			if c.admin == "" {
				done <- nil
				continue
			}
			cpu[i], served[i] = readProcessCPU(t, c.pid), c.sent.Load()
			c.profile = filepath.Join(profiles, fmt.Sprintf("warm-%d-%s.pprof", slices.Index(configs, c), strings.ReplaceAll(c.name, " ", "_")))
			go func() { done <- fetchCPUProfile(c.admin, seconds, c.profile) }()
		}
		for running := len(g); running > 0; {
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
				running--
			default:
				if together {
					sendAll(warmup)
				} else {
					send(g[0], warmup)
				}
			}
		}
		for i, c := range g {
			if c.admin == "" {
				continue
			}
			n := c.sent.Load() - served[i]
			perRequest := float64(readProcessCPU(t, c.pid).since(cpu[i]).Nanoseconds()) / 1000 / float64(n)
			t.Logf("%s: CPU profile in %s: %d requests meanwhile, %.1f µs of CPU each", c.name, c.profile, n, perRequest)
			if c != configs[0] {
				t.Logf("%s: %s", c.name, moduleShare(t, c, perRequest))
			}
		}
	}
}

// moduleShare reads c's CPU profile (go tool pprof) for the module's own part of caddy's
// CPU: mcp_oauth's ServeHTTP but for the reverse_proxy it calls, as a share of the
// profile's samples and in µs per request at perRequest µs of CPU per request; and of it,
// reading the body, which reverse_proxy alone does too, while it sends it. Left out: the
// collection of the module's garbage, and the reading of a longer or shorter token.
func moduleShare(t *testing.T, c *config, perRequest float64) string {
	out, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=1000000", c.bin, c.profile).Output()
	if err != nil {
		t.Fatalf("go tool pprof: %v", err)
	}
	var total time.Duration
	cum := map[string]time.Duration{}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if _, after, ok := strings.Cut(line, "Total samples = "); ok {
			total, _ = time.ParseDuration(strings.Fields(after)[0])
		}
		if len(f) >= 6 {
			if d, err := time.ParseDuration(f[3]); err == nil {
				cum[f[5]] = d
			}
		}
	}
	if total == 0 {
		t.Fatalf("%s: no samples in the profile", c.name)
	}
	share := func(fn string) float64 { return float64(cum[fn]) / float64(total) }
	own := share("github.com/caddy-mcp/oauth-broker/caddyoauthbroker.(*Handler).ServeHTTP") -
		share("github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy.(*Handler).ServeHTTP")
	body := share("github.com/caddy-mcp/oauth-broker/mcprequest.readBody")
	return fmt.Sprintf("the module's own CPU (its handler, less the reverse_proxy it calls) %.1f%% of caddy's samples, %.1f µs/request; of which reading the body %.1f µs (%.0f samples in all)",
		own*100, own*perRequest, body*perRequest, total.Seconds()*100)
}

// withBinary runs the caddy binary at path instead of the one under test.
func withBinary(path string) caddyOption {
	return func(p *caddyProc) { p.bin = path }
}

// differences are xs[i] - ys[i]: of one round's figures, for the median of the differences.
func differences(xs, ys []float64) []float64 {
	d := make([]float64, len(xs))
	for i := range xs {
		d[i] = xs[i] - ys[i]
	}
	return d
}

func configByName(configs []*config, name string) *config {
	for _, c := range configs {
		if c.name == name {
			return c
		}
	}
	panic("no configuration " + name)
}

// processCPU is a process's CPU time so far: the sum of its threads' run times in
// nanoseconds (/proc/PID/task/TID/schedstat), and, in clock ticks of 10 ms, its user +
// system time (/proc/PID/stat), which counts the threads that have exited too.
type processCPU struct {
	threads map[string]time.Duration
	ticks   time.Duration
}

func readProcessCPU(t *testing.T, pid int) processCPU {
	c := processCPU{threads: map[string]time.Duration{}, ticks: processCPUTicks(t, pid)}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatalf("reading a process's threads: %v", err)
	}
	for _, task := range tasks {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, task.Name()))
		if err != nil {
			continue // exited meanwhile: since falls back to ticks
		}
		ns, _, _ := strings.Cut(string(stat), " ")
		n, err := strconv.ParseInt(ns, 10, 64)
		if err != nil {
			t.Fatalf("schedstat %q: %v", stat, err)
		}
		c.threads[task.Name()] = time.Duration(n)
	}
	return c
}

// since is the CPU time used between then and c: to the nanosecond when every thread of
// then is still there, else (a thread's time since then was lost with it) in ticks.
func (c processCPU) since(then processCPU) time.Duration {
	var d time.Duration
	for id, ran := range c.threads {
		d += ran - then.threads[id]
	}
	for id := range then.threads {
		if _, ok := c.threads[id]; !ok {
			return c.ticks - then.ticks
		}
	}
	return d
}

// memStats are the allocation counters of a caddy's Go runtime (its admin API's
// /debug/vars), or nil for a proxy without one.
type memStats struct {
	Mallocs, TotalAlloc, NumGC, NextGC, HeapAlloc, PauseTotalNs uint64
	GCCPUFraction                                               float64
}

func (c *config) memStats(t *testing.T) *memStats {
	if c.admin == "" {
		return nil
	}
	var vars struct {
		MemStats memStats `json:"memstats"`
	}
	if err := json.Unmarshal(adminGet(t, "http://"+c.admin+"/debug/vars"), &vars); err != nil {
		t.Fatalf("%s: /debug/vars: %v", c.name, err)
	}
	return &vars.MemStats
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
	base  string // http://127.0.0.1:PORT
	pid   int    // the proxy's process
	token string
	admin string    // the admin API's address of a caddy, else ""
	wall  []float64 // µs per request, one per round
	cpu   []float64
	// Heap objects and bytes allocated per request, GCs per 1000 requests, one per round;
	// none for a proxy other than caddy.
	allocs, bytes, gcs []float64
	sent               atomic.Int64 // requests answered
	bin, profile       string       // a caddy's binary, and its CPU profile's file
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
	return &config{name: "oauth2-proxy v7.15.6", base: base, pid: cmd.Process.Pid, token: token}
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
