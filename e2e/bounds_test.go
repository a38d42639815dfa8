package e2e

import (
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// goroutines reads the caddy process's goroutine count from its admin API's pprof.
func goroutines(t *testing.T, admin int) int {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/goroutine?debug=1", admin))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`goroutine profile: total (\d+)`).FindSubmatch(body)
	if m == nil {
		t.Fatalf("no goroutine count in the profile: %.200s", body)
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

func getFrom(t *testing.T, u, forwardedFor string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Forwarded-For", forwardedFor)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

// TestAnonymousBoundsThroughCaddyBinary holds the real caddy to the bounds on what
// strangers can make the broker do (SECURITY.md): a registration is capped and stored in
// at most 4 KiB; a burst of made-up login states leaves no storage lock behind (no lock
// file, no goroutine per lock), and one client address gets 429 with Retry-After after 60
// a minute, per the client IP Caddy resolves behind its trusted proxies.
func TestAnonymousBoundsThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	admin := freePort(t)
	caddy := startCaddy(t, hybridSite(o, up.URL, ""), withAdmin(admin), withLogLevel("INFO"),
		withGlobal("\tservers {\n\t\ttrusted_proxies static 127.0.0.1/8\n\t}"))

	t.Run("registration caps", func(t *testing.T) {
		uri := "https://app.example.com/cb?x=" + strings.Repeat("a", 512-len("https://app.example.com/cb?x="))
		six := `{"redirect_uris":["` + strings.Repeat(uri+`","`, 5) + uri + `"]}`
		resp, err := http.Post(caddy.Base+"/oauth/register", "application/json", strings.NewReader(six))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("6 redirect URIs: %s, want 400", resp.Status)
		}
		five := `{"client_name":"` + strings.Repeat("n", 100) + `","redirect_uris":["` + strings.Repeat(uri+`","`, 4) + uri + `"]}`
		resp, err = http.Post(caddy.Base+"/oauth/register", "application/json", strings.NewReader(five))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("5 redirect URIs of 512 bytes: %s, want 201", resp.Status)
		}
		var clients int
		filepath.WalkDir(filepath.Join(caddy.storage, "mcp_oauth", "clients"), func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			clients++
			if info, err := d.Info(); err == nil && info.Size() > 4096 {
				t.Errorf("a registration takes %d bytes on disk, want at most 4096", info.Size())
			}
			return nil
		})
		if clients != 1 {
			t.Errorf("%d registrations on disk, want 1", clients)
		}
	})

	t.Run("made-up login states take no lock", func(t *testing.T) {
		getFrom(t, caddy.Base+"/oauth/callback?state=warm-up", "198.51.100.250")
		before := goroutines(t, admin)
		for i := range 100 {
			resp := getFrom(t, caddy.Base+"/oauth/callback?code=x&state=junk-"+strconv.Itoa(i), fmt.Sprintf("198.51.100.%d", i))
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("junk state %d: %s, want 400", i, resp.Status)
			}
		}
		if grown := goroutines(t, admin) - before; grown > 10 {
			t.Errorf("100 made-up states left %d more goroutines in caddy, want about none", grown)
		}
		if entries, _ := os.ReadDir(filepath.Join(caddy.storage, "locks")); len(entries) != 0 {
			t.Errorf("%d lock files after made-up states", len(entries))
		}
	})

	t.Run("one address gets 429 after 60 a minute", func(t *testing.T) {
		for i := range 60 {
			if resp := getFrom(t, caddy.Base+"/oauth/callback?state=junk", "203.0.113.9"); resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("request %d: %s, want 400", i+1, resp.Status)
			}
		}
		resp := getFrom(t, caddy.Base+"/oauth/callback?state=junk", "203.0.113.9")
		if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" ||
			!strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
			t.Errorf("61st request: %s, Retry-After %q, %s; want 429, a Retry-After, a page",
				resp.Status, resp.Header.Get("Retry-After"), resp.Header.Get("Content-Type"))
		}
		if resp := getFrom(t, caddy.Base+"/oauth/callback?state=junk", "203.0.113.10"); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("another address: %s, want 400", resp.Status)
		}
	})
}
