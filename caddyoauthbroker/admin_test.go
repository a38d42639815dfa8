package caddyoauthbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
)

func init() {
	caddy.RegisterModule(fakeFailingStorage{})
}

// fakeFailingStorage is a test-only storage module: file storage whose every write and
// read fails (a disk gone bad), for a site that cannot be ready.
type fakeFailingStorage struct {
	Root string `json:"root,omitempty"`
}

func (fakeFailingStorage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "caddy.storage.mcp_oauth_test_failing", New: func() caddy.Module { return new(fakeFailingStorage) }}
}

func (s *fakeFailingStorage) CertMagicStorage() (certmagic.Storage, error) {
	return failingFileStorage{&certmagic.FileStorage{Path: s.Root}}, nil
}

type failingFileStorage struct{ *certmagic.FileStorage }

var errFakeDisk = errors.New("fake storage outage: input/output error at /var/lib/caddy")

func (failingFileStorage) Store(context.Context, string, []byte) error { return errFakeDisk }
func (failingFileStorage) Load(context.Context, string) ([]byte, error) {
	return nil, errFakeDisk
}

// TestHealthThroughCaddy: two sites in one configuration, each answering its own public
// probe: one whose storage fails is 503 and tells strangers nothing more, one whose IdP
// is down is 200; Caddy's admin endpoint has the detail of both at /mcp_oauth/health.
func TestHealthThroughCaddy(t *testing.T) {
	var idpAsked atomic.Int64
	downIdP := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		idpAsked.Add(1)
		http.Error(w, "down", http.StatusBadGateway)
	}))
	t.Cleanup(downIdP.Close)
	adminPort, goodPort, badPort := freePort(t), freePort(t), freePort(t)
	dir := t.TempDir()
	site := func(port int, storage map[string]any) (string, map[string]any) {
		resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
		h := map[string]any{
			"handler":         "mcp_oauth",
			"mode":            "progressive", // every bearer token is the IdP's to verify
			"issuer":          downIdP.URL,
			"client_id":       "broker",
			"client_secret":   "secret",
			"resource":        resource,
			"encryption_keys": []string{testKey},
			"delegation":      map[string]any{"mode": "none"},
			"storage":         storage,
		}
		return resource, map[string]any{
			"listen":          []string{fmt.Sprintf("127.0.0.1:%d", port)},
			"automatic_https": map[string]any{"disable": true},
			"routes": []any{map[string]any{"handle": []any{h, map[string]any{
				"handler": "static_response", "body": "upstream",
			}}}},
		}
	}
	goodSite, good := site(goodPort, map[string]any{"module": "file_system", "root": dir + "/good"})
	badSite, bad := site(badPort, map[string]any{"module": "mcp_oauth_test_failing", "root": dir + "/bad"})
	cfg, _ := json.Marshal(map[string]any{
		"admin":   map[string]any{"listen": fmt.Sprintf("127.0.0.1:%d", adminPort), "config": map[string]any{"persist": false}},
		"storage": map[string]any{"module": "file_system", "root": dir + "/caddy"},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR", "writer": map[string]any{"output": "discard"}}}},
		"apps":    map[string]any{"http": map[string]any{"servers": map[string]any{"good": good, "bad": bad}}},
	})
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading Caddy config: %v", err)
	}
	t.Cleanup(func() { caddy.Stop() })

	get := func(url string, header ...string) (int, http.Header, string) {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header, string(body)
	}

	// A request that needs the IdP, so that its discovery has failed once.
	if status, _, _ := get(goodSite, "Authorization", "Bearer opaque-token"); status < 400 {
		t.Fatalf("a request with an unverifiable token passed: %d", status)
	}
	asked := idpAsked.Load()

	if status, _, body := get(fmt.Sprintf("http://127.0.0.1:%d/oauth/health", goodPort)); status != http.StatusOK || body != "ready\n" {
		t.Errorf("the site with its IdP down: %d %q, want 200 ready", status, body)
	}
	status, header, body := get(fmt.Sprintf("http://127.0.0.1:%d/oauth/health", badPort))
	if status != http.StatusServiceUnavailable || body != "not ready\n" {
		t.Errorf("the site with its storage down: %d %q, want 503 not ready", status, body)
	}
	for k := range header {
		switch k {
		case "Content-Type", "Cache-Control", "Content-Length", "Date", "Server":
		default:
			t.Errorf("header %s: %q tells a stranger more than ready or not", k, header.Get(k))
		}
	}

	status, _, body = get(fmt.Sprintf("http://127.0.0.1:%d/mcp_oauth/health", adminPort))
	if status != http.StatusOK {
		t.Fatalf("admin: %d %s", status, body)
	}
	var report struct {
		Sites []siteHealth `json:"sites"`
	}
	if err := json.Unmarshal([]byte(body), &report); err != nil {
		t.Fatalf("admin: %v in %s", err, body)
	}
	bySite := map[string]siteHealth{}
	for _, s := range report.Sites {
		bySite[s.Site] = s
	}
	g, b := bySite[goodSite], bySite[badSite]
	if !g.Ready || !g.Storage.OK || !g.KeyRing.OK || g.IdP.Discovery != "failing" || g.IdP.Error == "" || g.IdP.Issuer != downIdP.URL {
		t.Errorf("admin, the site with its IdP down: %+v, want ready with the IdP failing", g)
	}
	if b.Ready || b.Storage.OK || !strings.Contains(b.Storage.Error, "fake storage outage") {
		t.Errorf("admin, the site with its storage down: %+v, want not ready with the storage's error", b)
	}
	if n := idpAsked.Load() - asked; n != 0 {
		t.Errorf("the probes asked the IdP %d times, want 0", n)
	}

	// The grant routes address one site: with two, the site must be named.
	status, _, body = get(fmt.Sprintf("http://127.0.0.1:%d/mcp_oauth/clients", adminPort))
	if status != http.StatusBadRequest || !strings.Contains(body, goodSite) || !strings.Contains(body, badSite) {
		t.Errorf("admin, clients of no named site among two: %d %s, want 400 naming both", status, body)
	}
	status, _, body = get(fmt.Sprintf("http://127.0.0.1:%d/mcp_oauth/clients?site=%s", adminPort, url.QueryEscape(goodSite)))
	if status != http.StatusOK || !strings.Contains(body, `"clients":[]`) {
		t.Errorf("admin, clients of the good site: %d %s, want 200 and none", status, body)
	}
	status, _, body = get(fmt.Sprintf("http://127.0.0.1:%d/mcp_oauth/sessions?site=%s&subject=someone", adminPort, url.QueryEscape(badSite)))
	if status != http.StatusInternalServerError || !strings.Contains(body, "fake storage outage") {
		t.Errorf("admin, sessions on the site whose storage fails: %d %s, want 500 with the error", status, body)
	}
}

// During a reload a site has the old configuration's handler and the new one's; the admin
// API reports the new one, and the old one again if the new configuration fails.
func TestLiveSitesNewestPerSite(t *testing.T) {
	var s sites
	old, other, reloaded := &Handler{Resource: "https://a.example/mcp"}, &Handler{Resource: "https://b.example/mcp"}, &Handler{Resource: "https://a.example/mcp"}
	s.add(old)
	s.add(other)
	s.add(reloaded)
	if got := s.current(); len(got) != 2 || got[0] != other || got[1] != reloaded {
		t.Errorf("during a reload: %v, want b's and a's new handler", got)
	}
	s.remove(reloaded)
	if got := s.current(); len(got) != 2 || got[0] != old || got[1] != other {
		t.Errorf("after a failed reload: %v, want a's old handler and b's", got)
	}
	s.remove(old)
	s.remove(old)
	if got := s.current(); len(got) != 1 || got[0] != other {
		t.Errorf("after cleanup: %v, want b's handler", got)
	}
}
