package e2e

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// The hot path's budget: Caddy with mcp_oauth keeps at least 0.90x the throughput of
// Caddy's reverse_proxy alone, so that the broker costs less than a tenth of the proxy. BenchmarkProxy runs the same request through
// the real caddy binary twice, with and without the broker (warm token, token exchange
// cached); scripts/bench.sh prints the ratio.
func BenchmarkProxy(b *testing.B) {
	o := testenv.StartOP(b)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}`)
	}))
	b.Cleanup(upstream.Close)
	up := strings.TrimPrefix(upstream.URL, "http://")
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read","arguments":{}}}`

	for _, bc := range []struct {
		name   string
		broker bool
	}{{"reverse_proxy", false}, {"mcp_oauth+reverse_proxy", true}} {
		b.Run(bc.name, func(b *testing.B) {
			port := freePort(b)
			resource := fmt.Sprintf("http://127.0.0.1:%d/mcp", port)
			site := fmt.Sprintf("http://127.0.0.1:%d {\n\treverse_proxy %s\n}", port, up)
			if bc.broker {
				site = fmt.Sprintf(`http://127.0.0.1:%d {
	mcp_oauth {
		mode progressive
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
	}
	reverse_proxy %s
}`, port, o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, resource, testKey, up)
			}
			proc := startCaddy(b, site, withPort(port), withLogLevel("INFO"))
			caddy := proc.Base
			claims := o.AccessTokenClaims(o.User.Subject, resource)
			claims["scope"] = "openid notes:read"
			token := o.MintJWT(claims)
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
			send := func() {
				req, _ := http.NewRequest(http.MethodPost, caddy+"/mcp", strings.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+token)
				req.Header.Set("Content-Type", "application/json")
				resp, err := client.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b.Fatalf("status %s", resp.Status)
				}
			}
			send() // warm: token verified, delegated token cached
			cpu := proc.cpuTime()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					send()
				}
			})
			b.StopTimer()
			// Caddy's own CPU per request: steadier than wall time on a machine whose
			// cores the load generator shares.
			b.ReportMetric(float64((proc.cpuTime()-cpu).Microseconds())/float64(b.N), "caddy-cpu-µs/op")
		})
	}
}
