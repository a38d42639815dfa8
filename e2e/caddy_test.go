// Package e2e runs the real caddy binary built from cmd/caddy, configured by Caddyfile, in
// front of the real test parts of internal/testenv.
package e2e

import (
	"bytes"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// caddyBin is the caddy binary under test: $MCP_OAUTH_CADDY if set (CI builds it once),
// else built here from cmd/caddy.
var caddyBin string

func TestMain(m *testing.M) {
	slog.SetLogLoggerLevel(slog.LevelWarn)
	code, err := run(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(code)
}

func run(m *testing.M) (int, error) {
	flag.Parse()
	if testing.Short() {
		// The binary takes minutes to build cold; -short skips these tests (reported as skipped).
		return m.Run(), nil
	}
	caddyBin = os.Getenv("MCP_OAUTH_CADDY")
	if caddyBin == "" {
		dir, err := os.MkdirTemp("", "mcp_oauth-caddy-bin-")
		if err != nil {
			return 0, err
		}
		defer os.RemoveAll(dir)
		caddyBin = filepath.Join(dir, "caddy")
		build := exec.Command("go", "build", "-o", caddyBin, "../cmd/caddy")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return 0, fmt.Errorf("building caddy: %w", err)
		}
	}
	return m.Run(), nil
}

// syncBuffer collects a process's output for inspection while it runs.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// caddyProc is one running caddy process with its Caddyfile, storage and logs.
type caddyProc struct {
	t         testing.TB
	Port      int
	Base      string // http://127.0.0.1:PORT
	dir       string
	caddyfile string
	cmd       *exec.Cmd
	logs      *syncBuffer // every line caddy wrote, across restarts
	env       []string    // added to caddy's environment
	storage   string      // caddy's storage folder
	admin     string      // admin API address, "off" by default
	logLevel  string
	global    string // more global options (withGlobal)
	bin       string // the caddy binary, caddyBin unless withBinary
}

// caddyOption changes how caddy runs.
type caddyOption func(*caddyProc)

// withStorage puts caddy's storage in dir, so that several caddy processes share it.
func withStorage(dir string) caddyOption {
	return func(p *caddyProc) { p.storage = dir }
}

// withPort makes caddy listen on port instead of a free one found for it.
func withPort(port int) caddyOption {
	return func(p *caddyProc) { p.Port = port }
}

// withAdmin turns caddy's admin API on at a loopback port.
func withAdmin(port int) caddyOption {
	return func(p *caddyProc) { p.admin = fmt.Sprintf("127.0.0.1:%d", port) }
}

// withLogLevel sets caddy's log level (DEBUG by default, so the tests see every line).
func withLogLevel(level string) caddyOption {
	return func(p *caddyProc) { p.logLevel = level }
}

// withGlobal adds lines to the Caddyfile's global options block, such as a servers block.
func withGlobal(lines string) caddyOption {
	return func(p *caddyProc) { p.global += lines + "\n" }
}

// withEnv adds environment variables (NAME=value) to caddy's environment.
func withEnv(kv ...string) caddyOption {
	return func(p *caddyProc) { p.env = append(p.env, kv...) }
}

// startCaddy writes a Caddyfile for a site on a free loopback port whose body is site
// (with {port} and {storage} replaced) and runs caddy with it until the test ends.
func startCaddy(t testing.TB, site string, opts ...caddyOption) *caddyProc {
	t.Helper()
	if testing.Short() {
		t.Skip("runs the caddy binary; not with -short")
	}
	dir, err := os.MkdirTemp("", "mcp_oauth-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := &caddyProc{t: t, Port: freePort(t), dir: dir, logs: new(syncBuffer), storage: filepath.Join(dir, "storage"), admin: "off", logLevel: "DEBUG", bin: caddyBin}
	for _, o := range opts {
		o(p)
	}
	p.Base = fmt.Sprintf("http://127.0.0.1:%d", p.Port) // after the options: withPort
	p.caddyfile = filepath.Join(dir, "Caddyfile")
	body := strings.NewReplacer("{port}", fmt.Sprint(p.Port), "{storage}", p.storage).Replace(site)
	cfg := fmt.Sprintf(`{
	admin %s
	auto_https off
	default_bind 127.0.0.1
	storage file_system %s
	log {
		level %s
	}
%s}

%s
`, p.admin, p.storage, p.logLevel, p.global, body)
	if err := os.WriteFile(p.caddyfile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p.start()
	t.Cleanup(p.stop)
	return p
}

func (p *caddyProc) start() {
	p.t.Helper()
	cmd := exec.Command(p.bin, "run", "--config", p.caddyfile, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+filepath.Join(p.dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(p.dir, "config"))
	cmd.Env = append(cmd.Env, p.env...)
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("starting caddy: %v", err)
	}
	p.cmd = cmd
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p.Port), 200*time.Millisecond); err == nil {
			c.Close()
			return
		}
		if cmd.ProcessState != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.stop()
	p.t.Fatalf("caddy did not start listening:\n%s", p.logs.String())
}

func (p *caddyProc) stop() {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
	p.cmd = nil
}

// restart stops caddy and starts it again on the same storage and Caddyfile.
func (p *caddyProc) restart() {
	p.t.Helper()
	p.stop()
	p.start()
}

// cpuTime is the CPU time caddy has used so far (user + system), from /proc.
func (p *caddyProc) cpuTime() time.Duration {
	p.t.Helper()
	return processCPUTicks(p.t, p.cmd.Process.Pid)
}

// processCPUTicks is the CPU time process pid has used so far (user + system), from
// /proc, in clock ticks of 10 ms.
func processCPUTicks(t testing.TB, pid int) time.Duration {
	t.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatalf("reading a process's CPU time: %v", err)
	}
	// Fields after the command name (which ends with ')'): utime and stime are the 12th
	// and 13th, in clock ticks (100 per second on Linux).
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	var ticks int64
	for _, f := range fields[11:13] {
		var n int64
		fmt.Sscan(f, &n)
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond
}

// assertLogsFree fails when any of secrets appears in caddy's logs (W13).
func (p *caddyProc) assertLogsFree(secrets ...string) {
	p.t.Helper()
	logs := p.logs.String()
	for _, s := range secrets {
		if s != "" && strings.Contains(logs, s) {
			p.t.Errorf("caddy's logs contain a secret (%d chars, starts %.4s…)", len(s), s)
		}
	}
}

// waitForLog waits up to five seconds for caddy's logs to hold every one of parts and
// returns them: a line reaches the test through a pipe, after the answer it logs may have.
func (p *caddyProc) waitForLog(parts ...string) (string, bool) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		logs := p.logs.String()
		found := true
		for _, part := range parts {
			found = found && strings.Contains(logs, part)
		}
		if found || time.Now().After(deadline) {
			return logs, found
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
