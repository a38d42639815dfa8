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

// newLockCountingBroker is a hybrid broker with registration and provisioning on, over
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
		c.ProvisioningTools = []string{"background_*"}
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
	case "provisioning callback":
		req = httptest.NewRequest(http.MethodGet, "https://mcp.example.test"+pathProvisioningCallback+"?state="+junk+"&code=x", nil)
	case "provisioning link":
		req = httptest.NewRequest(http.MethodGet, "https://mcp.example.test"+pathProvisioningStart+"?link="+junk, nil)
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

var junkEndpoints = []string{"callback", "provisioning callback", "provisioning link", "code", "refresh token"}

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
