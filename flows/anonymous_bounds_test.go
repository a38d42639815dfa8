package flows

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// lockCountingStorage is a FileStorage that counts Lock calls: a spy, so a test can see
// which requests take storage locks.
type lockCountingStorage struct {
	*certmagic.FileStorage
	locks atomic.Int32
}

func (s *lockCountingStorage) Lock(ctx context.Context, name string) error {
	s.locks.Add(1)
	return s.FileStorage.Lock(ctx, name)
}

// newLockCountingBroker is a hybrid broker with registration and offline access on, over
// lockCountingStorage in dir.
func newLockCountingBroker(t *testing.T, dir string) (*Broker, *lockCountingStorage) {
	t.Helper()
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		t.Fatal(err)
	}
	s := &lockCountingStorage{FileStorage: &certmagic.FileStorage{Path: dir}}
	b := newRegistrationBroker(t, func(c *Config) {
		c.Records = storage.New(s, ring)
		c.OfflineAccessTools = []string{"background_*"}
	})
	return b, s
}

// junkRequest is an anonymous request carrying a made-up state, link, code or refresh
// token, from client address ip.
func junkRequest(endpoint, ip string, i int) *http.Request {
	junk := fmt.Sprintf("junk-%d-%s", i, randomToken())
	var req *http.Request
	switch endpoint {
	case "callback":
		req = httptest.NewRequest(http.MethodGet, "https://mcp.example.test"+pathCallback+"?state="+junk+"&code=x", nil)
	case "offline access callback":
		req = httptest.NewRequest(http.MethodGet, "https://mcp.example.test"+OfflineAccessCallbackLegacy+"?state="+junk+"&code=x", nil)
	case "offline access link":
		req = httptest.NewRequest(http.MethodGet, "https://mcp.example.test"+pathOfflineAccessStart+"?link="+junk, nil)
	case "code":
		form := url.Values{"grant_type": {grantAuthorizationCode}, "client_id": {testenv.NativeClientID},
			"code": {junk}, "code_verifier": {strings.Repeat("v", 43)}, "redirect_uri": {"http://127.0.0.1/callback"}}
		req = httptest.NewRequest(http.MethodPost, "https://mcp.example.test"+pathToken, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	case "refresh token":
		form := url.Values{"grant_type": {grantRefreshToken}, "client_id": {testenv.NativeClientID},
			"refresh_token": {newBrokerToken(refreshTokenPrefix)}}
		req = httptest.NewRequest(http.MethodPost, "https://mcp.example.test"+pathToken, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	default:
		panic("unknown endpoint " + endpoint)
	}
	return req.WithContext(WithClientIP(req.Context(), ip))
}

var junkEndpoints = []string{"callback", "offline access callback", "offline access link", "code", "refresh token"}

// A burst of made-up states, links, codes and refresh tokens takes no storage lock: no
// lock file, no goroutine kept alive for seconds by FileStorage per lock (SECURITY.md).
// Every request comes from another address, so that no rate limit hides the lookups.
func TestJunkValuesTakeNoStorageLock(t *testing.T) {
	for _, endpoint := range junkEndpoints {
		t.Run(endpoint, func(t *testing.T) {
			dir := t.TempDir()
			b, s := newLockCountingBroker(t, dir)
			before := runtime.NumGoroutine()
			const burst = 100
			for i := range burst {
				rec := answerOwn(t, b, junkRequest(endpoint, fmt.Sprintf("192.0.2.%d", i), i))
				if rec.Code != http.StatusBadRequest {
					t.Fatalf("junk %s: %d %s, want 400", endpoint, rec.Code, rec.Body)
				}
			}
			if n := s.locks.Load(); n != 0 {
				t.Errorf("%d junk requests took %d storage locks, want 0", burst, n)
			}
			if grown := runtime.NumGoroutine() - before; grown > burst/10 {
				t.Errorf("%d junk requests left %d more goroutines running, want about none", burst, grown)
			}
			entries, _ := os.ReadDir(filepath.Join(dir, "locks"))
			if len(entries) != 0 {
				t.Errorf("%d junk requests left %d lock files", burst, len(entries))
			}
		})
	}
}

// The browser endpoints that redeem a one-time value (the login state at both callbacks,
// the offline access link) answer one address 60 times a minute, then 429 with Retry-After
// and a page.
func TestOneTimeValueEndpointsAreRateLimitedPerClientIP(t *testing.T) {
	for _, endpoint := range []string{"callback", "offline access callback", "offline access link"} {
		t.Run(endpoint, func(t *testing.T) {
			b, _ := newLockCountingBroker(t, t.TempDir())
			clock := newRegistrationClock()
			b.now = clock.Now
			for i := range 60 {
				if rec := answerOwn(t, b, junkRequest(endpoint, "203.0.113.7", i)); rec.Code != http.StatusBadRequest {
					t.Fatalf("request %d: %d, want 400", i+1, rec.Code)
				}
			}
			rec := answerOwn(t, b, junkRequest(endpoint, "203.0.113.7", 60))
			if rec.Code != http.StatusTooManyRequests || rec.Header().Get("Retry-After") != "1" {
				t.Errorf("61st request: %d, Retry-After %q; want 429, 1", rec.Code, rec.Header().Get("Retry-After"))
			}
			if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
				t.Errorf("the 429 is %q, want a page", ct)
			}
			if rec := answerOwn(t, b, junkRequest(endpoint, "198.51.100.9", 0)); rec.Code != http.StatusBadRequest {
				t.Errorf("another address: %d, want 400", rec.Code)
			}
			clock.Advance(time.Second)
			if rec := answerOwn(t, b, junkRequest(endpoint, "203.0.113.7", 61)); rec.Code != http.StatusBadRequest {
				t.Errorf("a second later: %d, want 400", rec.Code)
			}
		})
	}
	for _, p := range []string{pathCallback, OfflineAccessCallbackLegacy, pathOfflineAccessStart} {
		if !NeedsClientIP(p) {
			t.Errorf("NeedsClientIP(%q) = false: behind a proxy every client would share one bucket", p)
		}
	}
}
