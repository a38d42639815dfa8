package flows

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/caddyserver/certmagic"
	"go.uber.org/goleak"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// writeFaultStorage is a fault injector: file storage whose Nth write (Store or Delete,
// counted from the first once armed) fails, as a storage that drops its connection in the
// middle of a flow. With applied, the failing write reaches the storage before the error
// is returned (the reply was lost, not the write).
type writeFaultStorage struct {
	certmagic.Storage

	mu      sync.Mutex
	writes  int    // writes seen since arm
	failAt  int    // the write that fails; 0 for none
	applied bool   // the failing write is done all the same
	failed  string // the key of the write that failed, for the test's messages
}

// errInjectedWrite is the failure writeFaultStorage injects.
var errInjectedWrite = errors.New("injected storage fault: connection lost")

// arm counts writes from zero and fails the nth (0: none).
func (s *writeFaultStorage) arm(n int, applied bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes, s.failAt, s.applied, s.failed = 0, n, applied, ""
}

// disarm lets every write through from now on, keeping the count.
func (s *writeFaultStorage) disarm() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failAt = 0
}

// count is the number of writes since arm, and the key of the failed one.
func (s *writeFaultStorage) count() (int, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.writes, s.failed
}

// write runs do unless this write is the one to fail.
func (s *writeFaultStorage) write(key string, do func() error) error {
	s.mu.Lock()
	s.writes++
	fail := s.writes == s.failAt
	applied := s.applied
	if fail {
		s.failed = key
	}
	s.mu.Unlock()
	if !fail {
		return do()
	}
	if applied {
		_ = do()
	}
	return errInjectedWrite
}

func (s *writeFaultStorage) Store(ctx context.Context, key string, value []byte) error {
	return s.write(key, func() error { return s.Storage.Store(ctx, key, value) })
}

func (s *writeFaultStorage) Delete(ctx context.Context, key string) error {
	return s.write(key, func() error { return s.Storage.Delete(ctx, key) })
}

// faultLogin is one user's way through a hybrid broker: a whole login in a browser, the
// code's redemption, a refresh, an MCP call. Each step reports what the broker answered
// instead of failing the test, so that the test can judge a failure injected under it.
type faultLogin struct {
	t *testing.T
	// from is the loopback address the browser and client send from: one per run, as the
	// token endpoint limits requests per address.
	from     net.IP
	o        *testenv.OP
	front    *httptest.Server
	br       *hybridBrowser
	verifier string
}

// stepAnswer is the broker's answer to one step that did not succeed: its status, its
// Retry-After and the OAuth error it carried (in JSON or in a redirect to the client).
type stepAnswer struct {
	step, status, retryAfter, code string
}

func (a *stepAnswer) String() string {
	return fmt.Sprintf("%s: %s %q (Retry-After %q)", a.step, a.status, a.code, a.retryAfter)
}

// clean reports whether a failed step failed as a storage failure must: 503
// temporarily_unavailable with Retry-After in JSON, a page of status 503 for the browser,
// or the error temporarily_unavailable sent to the client's redirect URI; never a 500.
func (a *stepAnswer) clean() bool {
	switch a.status {
	case "302 Found":
		return a.code == "temporarily_unavailable"
	case "503 Service Unavailable":
		return a.retryAfter != "" && (a.code == "temporarily_unavailable" || a.code == "page")
	}
	return false
}

// answerOf reads a failed step's answer.
func answerOf(step string, resp *http.Response, body string) *stepAnswer {
	a := &stepAnswer{step: step, status: resp.Status, retryAfter: resp.Header.Get("Retry-After")}
	switch {
	case resp.StatusCode == http.StatusFound:
		loc, _ := url.Parse(resp.Header.Get("Location"))
		if loc != nil {
			a.code = loc.Query().Get("error")
		}
	case strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html"):
		a.code = "page"
	default:
		var e oauthError
		_ = json.Unmarshal([]byte(body), &e)
		a.code = e.Error
	}
	return a
}

// browserCode runs authorize → consent → the OP's login → callback and returns the code
// the client's redirect URI got, or the broker's answer to the step that failed.
func (l *faultLogin) browserCode() (string, *stepAnswer) {
	t := l.t
	t.Helper()
	l.br = newHybridBrowser(t)
	if l.from != nil {
		tr := &http.Transport{DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: l.from}}).DialContext}
		t.Cleanup(tr.CloseIdleConnections)
		l.br.client.Transport = tr
	}
	l.verifier = oauth2.GenerateVerifier()
	q := hybridAuthorizeQuery(testenv.NativeClientID, tokenTestRedirect, l.verifier, "st", tokenTestScopes)
	resp, body := l.br.get(l.front.URL + pathAuthorize + "?" + q.Encode())
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusFound || !strings.HasPrefix(loc, l.front.URL+pathConsent) {
		return "", answerOf("authorize", resp, body)
	}
	resp, page := l.br.get(loc)
	if resp.StatusCode != http.StatusOK {
		return "", answerOf("consent page", resp, page)
	}
	ticket, csrf := consentForm(t, page)
	resp, body = l.br.post(l.front.URL+pathConsent, url.Values{"ticket": {ticket}, "csrf": {csrf}, "decision": {"approve"}}, nil)
	loc = resp.Header.Get("Location")
	if resp.StatusCode != http.StatusFound || !strings.HasPrefix(loc, l.o.Issuer) {
		return "", answerOf("consent", resp, body)
	}
	idpURL, _ := url.Parse(loc)
	cb := l.br.loginAtIdP(l.o, idpURL)
	resp, body = l.br.get(cb.String())
	final, _ := url.Parse(resp.Header.Get("Location"))
	if resp.StatusCode != http.StatusFound || final == nil || final.Query().Get("code") == "" {
		return "", answerOf("callback", resp, body)
	}
	return final.Query().Get("code"), nil
}

// redeem posts the code to the token endpoint.
func (l *faultLogin) redeem(code string) (TokenResponse, *stepAnswer) {
	return l.token("code redemption", exchangeForm(testenv.NativeClientID, code, l.verifier, nil))
}

// refresh posts a refresh grant.
func (l *faultLogin) refresh(refreshToken string) (TokenResponse, *stepAnswer) {
	return l.token("refresh", url.Values{"grant_type": {"refresh_token"}, "client_id": {testenv.NativeClientID}, "refresh_token": {refreshToken}})
}

func (l *faultLogin) token(step string, form url.Values) (TokenResponse, *stepAnswer) {
	t := l.t
	t.Helper()
	resp, body := l.br.post(l.front.URL+pathToken, form, nil)
	if resp.StatusCode != http.StatusOK {
		return TokenResponse{}, answerOf(step, resp, body)
	}
	var tok TokenResponse
	if err := json.Unmarshal([]byte(body), &tok); err != nil || tok.AccessToken == "" || tok.RefreshToken == "" {
		t.Fatalf("%s: 200 without a token pair: %v", step, err)
	}
	return tok, nil
}

// mcpStatus is the status of an MCP initialize request with token.
func (l *faultLogin) mcpStatus(token string) int {
	l.t.Helper()
	h := bearer(token)
	h.Set("Content-Type", "application/json")
	h.Set("Accept", "application/json, text/event-stream")
	resp := do(l.t, http.MethodPost, l.front.URL+"/mcp", h,
		`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`)
	return resp.StatusCode
}

// TestFaultStorageFailsOnNthWrite: a storage that fails on its Nth write (writeFaultStorage),
// for every N over the writes of a whole login, the code's redemption and a refresh, and
// with the write lost or done all the same. The step under the fault answers cleanly (503
// with Retry-After, or the error sent to the client); nothing is left half written: the code
// is never redeemed twice, every token handed out works and refreshes (none without its
// record), and no grant is lost: the same refresh token retried succeeds, a failed code's
// redemption retried succeeds or is refused, and a login started again succeeds.
func TestFaultStorageFailsOnNthWrite(t *testing.T) {
	o := testenv.SharedOP(t)
	before := goleak.IgnoreCurrent()
	t.Run("each write", func(t *testing.T) { nthWriteRuns(t, o) })
	if !t.Failed() {
		goleak.VerifyNone(t, append(brokerLeakIgnores, before)...)
	}
}

// nthWriteRuns is TestFaultStorageFailsOnNthWrite's broker and runs, whose servers close
// when it ends.
func nthWriteRuns(t *testing.T, o *testenv.OP) {
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	fault := &writeFaultStorage{Storage: &certmagic.FileStorage{Path: t.TempDir()}}
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, storage.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	_, front := startHybridFront(t, o, up.URL, func(c *Config) {
		c.Records = storage.New(fault, ring)
		c.Clients[0].RedirectURIs = []string{tokenTestRedirect}
	})

	// The flow without a fault: how many writes it makes.
	l := &faultLogin{t: t, o: o, front: front}
	fault.arm(0, false)
	writes := func() int {
		code, a := l.browserCode()
		if a != nil {
			t.Fatalf("without a fault: %v", a)
		}
		tok, a := l.redeem(code)
		if a != nil {
			t.Fatalf("without a fault: %v", a)
		}
		if _, a := l.refresh(tok.RefreshToken); a != nil {
			t.Fatalf("without a fault: %v", a)
		}
		n, _ := fault.count()
		return n
	}()
	if writes < 5 {
		t.Fatalf("a whole login, redemption and refresh wrote %d times: the count is wrong", writes)
	}
	t.Logf("a login, its redemption and a refresh write %d times", writes)

	for _, applied := range []bool{false, true} {
		for n := 1; n <= writes; n++ {
			name := fmt.Sprintf("write %d lost", n)
			if applied {
				name = fmt.Sprintf("write %d done, its reply lost", n)
			}
			t.Run(name, func(t *testing.T) {
				l := &faultLogin{t: t, o: o, front: front, from: net.IPv4(127, 0, byte(1+b2i(applied)), byte(n))}
				fault.arm(n, applied)
				failed := nwriteFlow(t, l, fault)
				if _, key := fault.count(); key == "" {
					t.Errorf("the flow made fewer than %d writes this time", n)
				} else if failed == nil {
					t.Logf("write %d (%s) failed, and the flow went on", n, key)
				}
			})
		}
	}
}

// nwriteFlow runs the flow of TestFaultStorageFailsOnNthWrite once under the armed fault,
// and checks that what failed failed cleanly and that the user gets through with retries
// once the storage works. It returns the step that failed under the fault, if any.
func nwriteFlow(t *testing.T, l *faultLogin, fault *writeFaultStorage) *stepAnswer {
	t.Helper()
	var failed *stepAnswer
	check := func(a *stepAnswer) {
		t.Helper()
		if a == nil {
			return
		}
		_, key := fault.count()
		if failed != nil || key == "" {
			t.Fatalf("%v failed with no fault injected under it", a)
		}
		failed = a
		if !a.clean() {
			t.Errorf("write %d (%s) failed the %v: want 503 temporarily_unavailable with Retry-After", fault.failAt, key, a)
		}
		fault.disarm() // the storage is back
	}

	code, a := l.browserCode()
	check(a)
	if a != nil {
		// Nothing to redeem: logging in again works.
		if code, a = l.browserCode(); a != nil {
			t.Fatalf("logging in again after the fault: %v", a)
		}
	}

	tok, a := l.redeem(code)
	check(a)
	if a != nil {
		// The same code again: redeemed now, or refused; never a 5xx. Refused, the user
		// logs in again.
		if tok, a = l.redeem(code); a != nil {
			if a.code != "invalid_grant" {
				t.Errorf("the code redeemed again after the fault: %v, want tokens or invalid_grant", a)
			}
			if code, a = l.browserCode(); a != nil {
				t.Fatalf("logging in again after the fault: %v", a)
			}
			if tok, a = l.redeem(code); a != nil {
				t.Fatalf("redeeming a new login's code: %v", a)
			}
		}
	}
	if st := l.mcpStatus(tok.AccessToken); st != http.StatusOK {
		t.Errorf("the access token of the redemption: MCP answered %d", st)
	}

	next, a := l.refresh(tok.RefreshToken)
	check(a)
	if a != nil {
		// The grant is not lost: the same refresh token works.
		if next, a = l.refresh(tok.RefreshToken); a != nil {
			t.Fatalf("the refresh token retried after the fault: %v", a)
		}
	}
	if st := l.mcpStatus(next.AccessToken); st != http.StatusOK {
		t.Errorf("the refreshed access token: MCP answered %d", st)
	}
	if _, a := l.refresh(next.RefreshToken); a != nil {
		t.Errorf("the refreshed refresh token: %v", a)
	}
	// Last, as a code redeemed again revokes what it yielded (RFC 6749 §4.1.2).
	if _, again := l.redeem(code); again == nil || again.code != "invalid_grant" {
		t.Errorf("a redeemed code redeemed a second time: %v", again)
	}
	return failed
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestFaultStorageOfflineAccess: a storage that fails the write of an offline access link
// answers 503 temporarily_unavailable with Retry-After, never a 500: at the start endpoint
// and at the elicitation of a tool that needs offline access (FAULT: writeFaultStorage).
func TestFaultStorageOfflineAccess(t *testing.T) {
	o := testenv.SharedOP(t)
	fault := &writeFaultStorage{Storage: &certmagic.FileStorage{Path: t.TempDir()}}
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, storage.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	f := startOfflineAccess(t, o, func(c *Config) { c.Records = storage.New(fault, ring) })
	token := f.userToken(t, o.User)
	check := func(what string, resp *http.Response) {
		t.Helper()
		var e oauthError
		decodeJSON(t, resp, &e)
		if resp.StatusCode != http.StatusServiceUnavailable || e.Error != "temporarily_unavailable" || resp.Header.Get("Retry-After") == "" {
			t.Errorf("%s: %d %q Retry-After %q, want 503 temporarily_unavailable with Retry-After", what, resp.StatusCode, e.Error, resp.Header.Get("Retry-After"))
		}
	}
	fault.arm(1, false)
	check("offline access start", get(t, f.front.URL+pathOfflineAccessStart, bearer(token)))
	fault.arm(1, false)
	h := bearer(token)
	h.Set("Content-Type", "application/json")
	h.Set("Accept", "application/json, text/event-stream")
	check("a tool that needs offline access", do(t, http.MethodPost, f.front.URL+"/mcp", h,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"notes_read","arguments":{}}}`))
}
