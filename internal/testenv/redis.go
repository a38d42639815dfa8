package testenv

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RedisServer is a redis-server process of the test's own, on a free loopback port with its
// data in a temporary directory, killed at the test's cleanup. It is Debian's redis-server,
// never a system service.
type RedisServer struct {
	// Addr is host:port, 127.0.0.1 and the server's port.
	Addr string

	t            testing.TB
	dir          string
	args         []string
	sentinelConf string // the configuration of a Sentinel; empty for a server

	mu  sync.Mutex
	cmd *exec.Cmd
}

// Redis starts a redis-server with no persistence (save ” and no AOF) and the extra
// arguments given (e.g. "--maxmemory-policy", "allkeys-lru"). Without redis-server the test
// fails under CI (scripts/test.sh installs it) and is skipped elsewhere, naming the package.
func Redis(t testing.TB, args ...string) *RedisServer {
	t.Helper()
	r := &RedisServer{t: t, args: args}
	r.launch()
	return r
}

// RedisSentinel starts a Sentinel (redis-server --sentinel) that monitors master under the
// name masterName, with a quorum of one.
func RedisSentinel(t testing.TB, master *RedisServer, masterName string) *RedisServer {
	t.Helper()
	host, port, _ := net.SplitHostPort(master.Addr)
	r := &RedisServer{t: t}
	r.sentinelConf = fmt.Sprintf("sentinel monitor %s %s %s 1\n", masterName, host, port)
	r.launch()
	return r
}

// launch starts the server on a free port, registering its Stop for the test's cleanup.
func (r *RedisServer) launch() {
	r.t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") != "" {
			r.t.Fatal("redis-server is missing under CI: scripts/test.sh installs it (apt-get install -y redis-server)")
		}
		r.t.Skip("redis-server is not installed (apt-get install -y redis-server)")
	}
	r.dir = r.t.TempDir()
	if r.sentinelConf != "" {
		// Sentinel rewrites its configuration file, so it lives in the server's directory.
		if err := os.WriteFile(filepath.Join(r.dir, "sentinel.conf"), []byte(r.sentinelConf), 0o600); err != nil {
			r.t.Fatal(err)
		}
	}
	var err error
	for range 5 { // a free port can be taken between choosing and binding it
		var port int
		if port, err = freePort(); err != nil {
			break
		}
		r.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if err = r.start(); err == nil {
			break
		}
	}
	if err != nil {
		r.t.Fatalf("starting redis-server: %v", err)
	}
	r.t.Cleanup(r.Stop)
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Start starts the server again on its address after Stop, with an empty data set.
func (r *RedisServer) Start() {
	r.t.Helper()
	if err := r.start(); err != nil {
		r.t.Fatalf("restarting redis-server: %v", err)
	}
}

func (r *RedisServer) start() error {
	_, port, _ := net.SplitHostPort(r.Addr)
	args := []string{"--bind", "127.0.0.1", "--port", port, "--dir", r.dir,
		"--daemonize", "no", "--protected-mode", "yes", "--logfile", filepath.Join(r.dir, "redis.log")}
	if r.sentinelConf != "" {
		args = append([]string{filepath.Join(r.dir, "sentinel.conf"), "--sentinel"}, args...)
	} else {
		args = append(args, "--save", "", "--appendonly", "no")
	}
	args = append(args, r.args...)
	cmd := exec.Command("redis-server", args...)
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if pingRedis(r.Addr) == nil {
			break
		}
		select {
		case err := <-exited:
			log, _ := os.ReadFile(filepath.Join(r.dir, "redis.log"))
			return fmt.Errorf("redis-server exited (%v): %s", err, lastLines(string(log), 5))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("redis-server did not answer PING on %s within 10s", r.Addr)
		}
	}
	r.mu.Lock()
	r.cmd = cmd
	r.mu.Unlock()
	go func() { <-exited }()
	return nil
}

// Stop kills the server (SIGKILL, as a crash) and waits until its port is closed.
func (r *RedisServer) Stop() {
	r.mu.Lock()
	cmd := r.cmd
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	for range 500 {
		c, err := net.DialTimeout("tcp", r.Addr, 100*time.Millisecond)
		if err != nil {
			return
		}
		c.Close()
		time.Sleep(10 * time.Millisecond)
	}
}

// Pause stops the server's process (SIGSTOP): connections stay open and nothing answers,
// as on a hung server. Resume undoes it.
func (r *RedisServer) Pause() { r.signal(syscall.SIGSTOP) }

// Resume continues a paused server (SIGCONT).
func (r *RedisServer) Resume() { r.signal(syscall.SIGCONT) }

func (r *RedisServer) signal(sig syscall.Signal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd != nil {
		_ = r.cmd.Process.Signal(sig)
	}
}

// Do sends one command (inline, space-separated arguments without quoting) and returns the
// first line of the reply, for setup and checks without a client library.
func (r *RedisServer) Do(command string) (string, error) {
	c, err := net.DialTimeout("tcp", r.Addr, time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintf(c, "%s\r\n", command); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimRight(line, "\r\n"), err
}

func pingRedis(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	// A server with requirepass refuses PING before AUTH: it is up all the same.
	if !strings.HasPrefix(line, "+PONG") && !strings.HasPrefix(line, "-NOAUTH") {
		return fmt.Errorf("PING answered %q", strings.TrimSpace(line))
	}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
