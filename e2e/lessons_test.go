package e2e

import (
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestLessonW18RateLimitKeyedOnCaddyClientIP is the Caddy half of W18 (the flows half is
// flows' TestLessonW18StateIsSharedThroughStorage). Weakness: the registration rate limit
// was keyed on the proxy's IP, so one client behind a proxy exhausted it for everyone.
// Instead the limit is keyed on the client IP as Caddy resolves it: behind a trusted
// proxy (`servers { trusted_proxies static 127.0.0.1/8 }`) each X-Forwarded-For client
// has its own budget; without trusted proxies the header is ignored and every request
// from 127.0.0.1 shares one.
func TestLessonW18RateLimitKeyedOnCaddyClientIP(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	site := hybridSite(o, up.URL, "\t\tregistration_rate 2")
	register := func(t *testing.T, base, forwardedFor string) int {
		t.Helper()
		req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/oauth/register",
			strings.NewReader(`{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Forwarded-For", forwardedFor)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	type step struct {
		client string // X-Forwarded-For
		want   int
	}
	expect := func(t *testing.T, base string, steps []step) {
		t.Helper()
		for i, s := range steps {
			if got := register(t, base, s.client); got != s.want {
				t.Errorf("registration %d from %s: %d, want %d", i+1, s.client, got, s.want)
			}
		}
	}

	t.Run("behind a trusted proxy each client has its own limit", func(t *testing.T) {
		caddy := startCaddy(t, site, withGlobal("\tservers {\n\t\ttrusted_proxies static 127.0.0.1/8\n\t}"))
		expect(t, caddy.Base, []step{
			{"203.0.113.1", http.StatusCreated}, {"203.0.113.1", http.StatusCreated}, {"203.0.113.1", http.StatusTooManyRequests},
			{"203.0.113.2", http.StatusCreated}, {"203.0.113.2", http.StatusCreated}, {"203.0.113.2", http.StatusTooManyRequests},
		})
	})
	t.Run("without trusted proxies the header is ignored", func(t *testing.T) {
		caddy := startCaddy(t, site)
		expect(t, caddy.Base, []step{
			{"203.0.113.1", http.StatusCreated}, {"203.0.113.2", http.StatusCreated}, {"203.0.113.3", http.StatusTooManyRequests},
		})
	})
}
