package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The interop harness (issue 6) runs software nobody here wrote, from interop/: npm
// packages pinned by its package.json and lock file, on Node 22 (the `node` package there),
// and Debian's chromium. .ci/run installs them; a developer without them gets a skip,
// CI never does.

// interopDir is interop/, seen from this package's directory.
var interopDir = func() string {
	dir, err := filepath.Abs(filepath.Join("..", "interop"))
	if err != nil {
		panic(err)
	}
	return dir
}()

// nodeStartTimeout bounds how long a node script may take to say it is ready.
const nodeStartTimeout = 30 * time.Second

// requireInterop skips the test when interop/ is not installed on a developer's machine,
// and fails it under CI, where .ci/run must have installed it.
func requireInterop(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("runs Node programs; not with -short")
	}
	if _, err := os.Stat(filepath.Join(interopDir, "node_modules")); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("interop/node_modules is missing under CI: .ci/run must run `npm ci` in interop/ (%v)", err)
		}
		t.Skip("interop/node_modules is missing: run `npm ci` in interop/ (CI does)")
	}
}

var (
	nodeOnce sync.Once
	nodePath string
	nodeErr  error
)

// nodeBinary finds Node 22 or newer: interop's own (npm package `node`), else `node` on
// PATH if it is new enough.
func nodeBinary(t *testing.T) string {
	t.Helper()
	requireInterop(t)
	nodeOnce.Do(func() {
		candidates := []string{filepath.Join(interopDir, "node_modules", ".bin", "node")}
		if p, err := exec.LookPath("node"); err == nil {
			candidates = append(candidates, p)
		}
		var seen []string
		for _, c := range candidates {
			out, err := exec.Command(c, "--version").Output()
			if err != nil {
				continue
			}
			v := strings.TrimSpace(string(out))
			seen = append(seen, c+" "+v)
			if major, _ := strconv.Atoi(strings.SplitN(strings.TrimPrefix(v, "v"), ".", 2)[0]); major >= 22 {
				nodePath = c
				return
			}
		}
		nodeErr = fmt.Errorf("no Node 22 or newer (found %v): run `npm ci` in interop/", seen)
	})
	if nodeErr != nil {
		t.Fatal(nodeErr)
	}
	return nodePath
}

// nodeProc is a node script run from interop/ for the length of a test.
type nodeProc struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	stdout *syncBuffer
	stderr *syncBuffer
	lines  chan string // stdout, line by line
	done   chan struct{}
	stdin  io.WriteCloser
}

// startNode runs `node script args...` in interop/ with env added to the environment,
// and stops it (its whole process group) when the test ends.
func startNode(t *testing.T, script string, env []string, args ...string) *nodeProc {
	t.Helper()
	node := nodeBinary(t)
	cmd := exec.Command(node, append([]string{script}, args...)...)
	cmd.Dir = interopDir
	// Node from interop/ first on PATH, so that scripts spawning `node` get the same one.
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(node)+string(os.PathListSeparator)+os.Getenv("PATH"), "NO_COLOR=1")
	cmd.Env = append(cmd.Env, env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p := &nodeProc{t: t, name: script, cmd: cmd, stdout: new(syncBuffer), stderr: new(syncBuffer),
		lines: make(chan string, 1024), done: make(chan struct{})}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting node %s: %v", script, err)
	}
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 16<<20)
		for sc.Scan() {
			line := sc.Text()
			p.stdout.Write([]byte(line + "\n"))
			select {
			case p.lines <- line:
			default: // nobody reads: the buffer keeps it
			}
		}
		io.Copy(io.Discard, out)
	}()
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(p.stop)
	return p
}

// stop ends the script's process group: SIGTERM, then SIGKILL after 5 s.
func (p *nodeProc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
}

// nextJSON waits for the next stdout line that is a JSON object and decodes it into v.
func (p *nodeProc) nextJSON(ctx context.Context, v any) error {
	for {
		select {
		case line, ok := <-p.lines:
			if !ok {
				return fmt.Errorf("node %s ended: %v\nstderr:\n%s", p.name, p.cmd.ProcessState, tail(p.stderr.String()))
			}
			if !strings.HasPrefix(strings.TrimSpace(line), "{") {
				continue
			}
			if err := json.Unmarshal([]byte(line), v); err != nil {
				return fmt.Errorf("node %s printed %q: %w", p.name, line, err)
			}
			return nil
		case <-ctx.Done():
			return fmt.Errorf("waiting for node %s: %w\nstdout:\n%s\nstderr:\n%s", p.name, ctx.Err(), tail(p.stdout.String()), tail(p.stderr.String()))
		}
	}
}

// ready waits for the script's first JSON line.
func (p *nodeProc) ready(v any) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.t.Context(), nodeStartTimeout)
	defer cancel()
	if err := p.nextJSON(ctx, v); err != nil {
		p.t.Fatal(err)
	}
}

// send writes one JSON line to the script's stdin.
func (p *nodeProc) send(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = p.stdin.Write(append(b, '\n'))
	return err
}

// wait waits for the script to end by itself, up to d.
func (p *nodeProc) wait(d time.Duration) error {
	select {
	case <-p.done:
		if !p.cmd.ProcessState.Success() {
			return fmt.Errorf("node %s: %v", p.name, p.cmd.ProcessState)
		}
		return nil
	case <-time.After(d):
		return errors.New("node " + p.name + " did not end in time")
	}
}

// tail is the end of a long log, for failure messages.
func tail(s string) string {
	const max = 6000
	if len(s) > max {
		return "…" + s[len(s)-max:]
	}
	return s
}

var jwtShape = regexp.MustCompile(`^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$`)
