package caddyoauthbroker

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestAccessLogFilter runs a whole hybrid login through a Caddy whose site logs with the
// README's access log filter, and finds the callback's and the redirects' lines in the
// access log without the codes, states, ticket or cookies they carried (SECURITY.md W13).
func TestAccessLogFilter(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	port := freePort(t)
	dir := t.TempDir()
	accessLog := filepath.Join(dir, "access.log")
	filter := testenv.AccessLogFilter(t, "../README.md", accessLog)
	upstream, _ := url.Parse(up.URL)
	site := fmt.Sprintf(`{
	admin off
	auto_https off
	storage file_system %s
	log {
		level ERROR
	}
}

http://127.0.0.1:%d {
%s
	mcp_oauth {
		mode hybrid
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:%d/mcp
		scopes openid notes:read
		encryption_key %s
		delegation none
		client %s {
			redirect_uri http://127.0.0.1/callback
		}
	}
	reverse_proxy %s
}
`, filepath.Join(dir, "storage"), port, filter, o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, port,
		testKey, testenv.NativeClientID, upstream.Host)
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(site), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting the README's filter: %v\n%s", err, site)
	}
	if len(warnings) > 0 {
		t.Errorf("adapt warnings: %v", warnings)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading: %v", err)
	}
	t.Cleanup(func() { caddy.Stop() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)

	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	get := func(u string) (*http.Response, string) {
		t.Helper()
		resp, err := browser.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	location := func(resp *http.Response) *url.URL {
		t.Helper()
		if resp.StatusCode != http.StatusFound {
			t.Fatalf("%s: want 302, got %s", resp.Request.URL.Path, resp.Status)
		}
		u, err := resp.Request.URL.Parse(resp.Header.Get("Location"))
		if err != nil {
			t.Fatal(err)
		}
		return u
	}

	verifier, state := oauth2.GenerateVerifier(), "client-state-"+fmt.Sprint(time.Now().UnixNano())
	q := url.Values{
		"response_type": {"code"}, "client_id": {testenv.NativeClientID}, "redirect_uri": {"http://127.0.0.1/callback"},
		"code_challenge": {oauth2.S256ChallengeFromVerifier(verifier)}, "code_challenge_method": {"S256"}, "state": {state},
	}
	r, _ := get(base + "/oauth/authorize?" + q.Encode())
	consent := location(r)
	_, page := get(consent.String())
	ticket := regexp.MustCompile(`name="ticket" value="([^"]*)"`).FindStringSubmatch(page)
	csrf := regexp.MustCompile(`name="csrf" value="([^"]*)"`).FindStringSubmatch(page)
	if ticket == nil || csrf == nil {
		t.Fatalf("no consent form: %.300s", page)
	}
	resp, err := browser.PostForm(base+"/oauth/consent", url.Values{"ticket": {ticket[1]}, "csrf": {csrf[1]}, "decision": {"approve"}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	toIdP := location(resp)
	cb, err := o.Login(t.Context(), toIdP.String(), testenv.LoginWithClient(browser))
	if err != nil {
		t.Fatalf("logging in at the OP: %v", err)
	}
	r, _ = get(cb.String())
	final := location(r)
	code := final.Query().Get("code")
	if code == "" || !strings.HasPrefix(cb.String(), base+"/oauth/callback?") {
		t.Fatalf("callback %s gave %s", cb.Redacted(), final.Redacted())
	}

	secrets := map[string]string{
		"client state": state, "consent ticket": ticket[1], "CSRF token": csrf[1],
		"IdP state": toIdP.Query().Get("state"), "nonce": toIdP.Query().Get("nonce"),
		"IdP code": cb.Query().Get("code"), "broker code": code,
	}
	for _, c := range jar.Cookies(consent) {
		secrets["cookie "+c.Name] = c.Value
	}
	var lines []byte
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if lines, _ = os.ReadFile(accessLog); bytes.Contains(lines, []byte("/oauth/callback")) {
			break
		}
	}
	for _, path := range []string{`"uri":"/oauth/authorize?`, `"uri":"/oauth/consent?`, `"uri":"/oauth/callback?`} {
		if !bytes.Contains(lines, []byte(path)) {
			t.Errorf("no access log line with %s:\n%s", path, lines)
		}
	}
	if !bytes.Contains(lines, []byte("code=REDACTED")) || !bytes.Contains(lines, []byte("state=REDACTED")) {
		t.Errorf("the callback's line does not show the parameters replaced:\n%s", lines)
	}
	if bytes.Contains(lines, []byte(`"Location"`)) {
		t.Errorf("a Location header is in the access log:\n%s", lines)
	}
	for name, s := range secrets {
		if s != "" && bytes.Contains(lines, []byte(s)) {
			t.Errorf("the %s is in the access log", name)
		}
	}
}
