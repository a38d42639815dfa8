package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

const initializeBody = `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"e2e","version":"1"}}}`

// mcpCall posts an MCP initialize with token and returns the status and Retry-After.
func mcpCall(t *testing.T, base, token, forwardedFor string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/mcp", strings.NewReader(initializeBody))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	if forwardedFor != "" {
		req.Header.Set("X-Forwarded-For", forwardedFor)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Retry-After")
}

// TestDiscoverySurvivesClosedPRMRequests: a stranger asks for the protected-resource
// metadata (no login needed) and closes the connection at once, every 20 ms, while the
// IdP has not been discovered yet. Those closed connections must not keep discovery
// failing (SECURITY.md: discovery kept failing): every MCP call made meanwhile, and after,
// succeeds. The IdP answers after 30 ms, so each closed connection lands mid-fetch.
func TestDiscoverySurvivesClosedPRMRequests(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	upURL, _ := url.Parse(up.URL)
	caddy := startCaddy(t, progressiveSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret,
		"openid notes:read notes:write", upURL.Host, ""), withLogLevel("INFO"))
	o.SetLatency(30 * time.Millisecond)
	token := o.MintJWT(o.AccessTokenClaims(o.User.Subject, caddy.Base+"/mcp"))

	const rounds = 60
	addr := strings.TrimPrefix(caddy.Base, "http://")
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range rounds {
			if c, err := net.Dial("tcp", addr); err == nil {
				fmt.Fprintf(c, "GET /.well-known/oauth-protected-resource/mcp HTTP/1.1\r\nHost: %s\r\n\r\n", addr)
				c.Close()
			}
			time.Sleep(20 * time.Millisecond) // the attacker's pace
		}
	}()
	failed := 0
	for range rounds {
		if status, _ := mcpCall(t, caddy.Base, token, ""); status != http.StatusOK {
			failed++
		}
		time.Sleep(20 * time.Millisecond)
	}
	wg.Wait()
	if failed > 0 {
		t.Errorf("%d of %d MCP calls failed while connections asking for the metadata were closed", failed, rounds)
	}
	if status, _ := mcpCall(t, caddy.Base, token, ""); status != http.StatusOK {
		t.Errorf("an MCP call after the burst: %d, want 200", status)
	}
}

// TestColdVerifyBudgetThroughCaddyBinary: junk opaque tokens from one client (as Caddy
// resolves it behind a trusted proxy) cost at most its cold_verify_rate of
// introspections, then 429 with Retry-After, even for a valid new token; another client
// behind the same proxy still gets in (SECURITY.md: strangers can make the broker call
// out).
func TestColdVerifyBudgetThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	upURL, _ := url.Parse(up.URL)
	caddy := startCaddy(t, progressiveSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret,
		"openid notes:read notes:write", upURL.Host, "\t\tcold_verify_rate 5 100"),
		withLogLevel("INFO"), withGlobal("\tservers {\n\t\ttrusted_proxies static 127.0.0.1/8\n\t}"))
	valid := o.MintJWT(o.AccessTokenClaims(o.User.Subject, caddy.Base+"/mcp"))
	if status, _ := mcpCall(t, caddy.Base, valid, "203.0.113.1"); status != http.StatusOK {
		t.Fatalf("a valid token: %d", status) // discovery and the first JWKS fetch: one cold verification
	}
	o.ResetCounts()
	statuses := map[int]int{}
	for i := range 10 {
		status, retry := mcpCall(t, caddy.Base, fmt.Sprintf("junk-%d", i), "198.51.100.7")
		statuses[status]++
		if status == http.StatusTooManyRequests && retry == "" {
			t.Error("429 without Retry-After")
		}
	}
	if n := o.Count(testenv.CountIntrospect); n != 5 {
		t.Errorf("10 junk tokens from one client cost %d introspections, want 5 (statuses %v)", n, statuses)
	}
	if statuses[http.StatusUnauthorized] != 5 || statuses[http.StatusTooManyRequests] != 5 {
		t.Errorf("statuses %v, want 5×401 then 5×429", statuses)
	}
	newValid := o.MintJWT(o.AccessTokenClaims(o.User.Subject, caddy.Base+"/mcp"))
	if status, retry := mcpCall(t, caddy.Base, "another-junk", "198.51.100.7"); status != http.StatusTooManyRequests || retry == "" {
		t.Errorf("the spent client again: %d (Retry-After %q), want 429 with Retry-After", status, retry)
	}
	if status, _ := mcpCall(t, caddy.Base, newValid, "203.0.113.2"); status != http.StatusOK {
		t.Errorf("another client behind the same proxy: %d, want 200", status)
	}
	if status, _ := mcpCall(t, caddy.Base, valid, "198.51.100.7"); status != http.StatusOK {
		t.Errorf("a warm token from the spent client: %d, want 200", status)
	}
}
