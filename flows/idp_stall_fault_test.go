package flows

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// stallProxy is a fault proxy: a TCP proxy in front of the OP that, while stalled, holds
// every byte sent to the OP (on connections old and new) until released, as an IdP that
// accepts connections and never answers. Close ends its connections and goroutines.
type stallProxy struct {
	ln     net.Listener
	target string

	mu       sync.Mutex
	released chan struct{} // closed while not stalled
	conns    map[net.Conn]struct{}
	done     chan struct{}
	wg       sync.WaitGroup
}

// startStallProxy proxies to target (host:port) until the test ends.
func startStallProxy(t *testing.T, target string) *stallProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{ln: ln, target: target, released: make(chan struct{}), conns: map[net.Conn]struct{}{}, done: make(chan struct{})}
	close(p.released)
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

func (p *stallProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		if !p.track(c, up) {
			return
		}
		p.wg.Add(2)
		go p.pipe(up, c, true)
		go p.pipe(c, up, false)
	}
}

// track registers conns for close, unless the proxy is closing.
func (p *stallProxy) track(conns ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		for _, c := range conns {
			c.Close()
		}
		return false
	default:
	}
	for _, c := range conns {
		p.conns[c] = struct{}{}
	}
	return true
}

// pipe copies from src to dst; toOP copies wait while the proxy is stalled.
func (p *stallProxy) pipe(dst, src net.Conn, toOP bool) {
	defer p.wg.Done()
	defer dst.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if toOP {
				p.mu.Lock()
				gate := p.released
				p.mu.Unlock()
				select {
				case <-gate:
				case <-p.done:
					return
				}
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// stall holds what is sent to the OP from now on; release lets it through.
func (p *stallProxy) stall() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.released = make(chan struct{})
}

func (p *stallProxy) release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.released:
	default:
		close(p.released)
	}
}

func (p *stallProxy) close() {
	p.mu.Lock()
	select {
	case <-p.done:
		p.mu.Unlock()
		return
	default:
	}
	close(p.done)
	p.ln.Close()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// TestFaultIdPStalls: the IdP accepts connections and answers nothing (stallProxy). A
// login's first step that needs the IdP's discovery, a callback's code exchange and a
// cold delegation each answer within their documented bound (idp_timeout per IdP call; a
// delegation flight 3 × idp_timeout) with 503 temporarily_unavailable, never hang; once
// the IdP answers again the same broker logs in and delegates. The broker's HTTP client
// has no timeout of its own here, so the bounds are the broker's. When everything is
// closed, no goroutine of the broker is left (goleak).
func TestFaultIdPStalls(t *testing.T) {
	o := testenv.SharedOP(t)
	up := delegationUpstream(t, o)
	// What runs before this test (the shared OP, other tests' idle connections) is not ours.
	before := goleak.IgnoreCurrent()
	const idpTimeout = 400 * time.Millisecond
	// Slack for a loaded 2-core machine under -race.
	const slack = 1500 * time.Millisecond

	t.Run("stalled", func(t *testing.T) {
		opURL, _ := url.Parse(o.Issuer)
		proxy := startStallProxy(t, opURL.Host)
		transport := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if addr == opURL.Host {
				addr = proxy.ln.Addr().String()
			}
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		}}
		t.Cleanup(transport.CloseIdleConnections)
		config := delegating(ModeHybrid, DelegationTokenExchange, func(c *Config) {
			c.HTTPClient = &http.Client{Transport: transport} // no timeout but the broker's
			c.IdPTimeout = idpTimeout
			c.Clients[0].RedirectURIs = []string{tokenTestRedirect}
		})
		_, front := startHybridFront(t, o, up.URL, config)
		clientGot := func(t *testing.T, what string, bound time.Duration, request func() (*http.Response, string)) {
			t.Helper()
			start := time.Now()
			resp, body := request()
			took := time.Since(start)
			if took > bound+slack {
				t.Errorf("%s took %v with the IdP stalled, bound %v", what, took.Round(time.Millisecond), bound)
			}
			a := answerOf(what, resp, body)
			if !a.clean() {
				t.Errorf("%s with the IdP stalled: %v, want temporarily_unavailable", what, a)
			}
		}

		l := &faultLogin{t: t, o: o, front: front}
		code, a := l.browserCode()
		if a != nil {
			t.Fatalf("logging in: %v", a)
		}
		tok, a := l.redeem(code)
		if a != nil {
			t.Fatalf("redeeming: %v", a)
		}

		// The callback's code exchange.
		verifier := oauth2.GenerateVerifier()
		br := newHybridBrowser(t)
		cb := br.loginAtIdP(o, br.toIdP(front, hybridAuthorizeQuery(testenv.NativeClientID, tokenTestRedirect, verifier, "st", tokenTestScopes)))
		proxy.stall()
		clientGot(t, "the callback (code exchange)", idpTimeout, func() (*http.Response, string) { return br.get(cb.String()) })

		// A cold delegation (token exchange) for an MCP request.
		initialize := func() (*http.Response, string) {
			h := bearer(tok.AccessToken)
			h.Set("Accept", "application/json, text/event-stream")
			resp := do(t, http.MethodPost, front.URL+"/mcp", h,
				`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`)
			body, _ := io.ReadAll(resp.Body)
			return resp, string(body)
		}
		clientGot(t, "an MCP request (cold delegation)", 3*idpTimeout, initialize)

		// Discovery, on a broker that has not read it yet: the consent's approval sends the
		// browser to the IdP. (A failed discovery is retried after 5 s, idp.Provider.)
		_, fresh := startHybridFront(t, o, up.URL, config)
		br = newHybridBrowser(t)
		consent := br.authorize(fresh, hybridAuthorizeQuery(testenv.NativeClientID, tokenTestRedirect, verifier, "st", tokenTestScopes))
		_, page := br.get(consent.String())
		ticket, csrf := consentForm(t, page)
		clientGot(t, "the consent's approval (discovery)", idpTimeout, func() (*http.Response, string) {
			return br.post(fresh.URL+pathConsent, url.Values{"ticket": {ticket}, "csrf": {csrf}, "decision": {"approve"}}, nil)
		})

		proxy.release()
		if resp, body := initialize(); resp.StatusCode != http.StatusOK {
			t.Errorf("an MCP request once the IdP answers: %s %.200s", resp.Status, body)
		}
		if seen := up.Seen(); len(seen) == 0 || seen[len(seen)-1].AuthError != "" {
			t.Errorf("the upstream did not get a delegated token once the IdP answered")
		}
		if code, a := l.browserCode(); a != nil {
			t.Errorf("logging in once the IdP answers: %v", a)
		} else if _, a := l.redeem(code); a != nil {
			t.Errorf("redeeming once the IdP answers: %v", a)
		}
	})
	if t.Failed() {
		return
	}
	// Every server, proxy and connection of the subtest is closed: what remains leaked.
	// An idle client connection's loops end when its server closes; they get the time
	// goleak retries for.
	goleak.VerifyNone(t, append(brokerLeakIgnores, before)...)
}

// brokerLeakIgnores are the goroutines goleak may find after a broker test that are not
// the broker's, or end by themselves shortly.
var brokerLeakIgnores = []goleak.Option{
	// certmagic's file storage keeps a lock file fresh in a goroutine that sees the lock
	// gone within 5 s of Unlock, then ends.
	goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
	// The test's MCP upstream (go-sdk) keeps its session until the session times out.
	goleak.IgnoreAnyFunction("github.com/modelcontextprotocol/go-sdk/mcp.(*streamableServerConn).Read"),
}
