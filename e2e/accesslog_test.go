package e2e

import (
	"bytes"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// TestAccessLogFilterThroughCaddyBinary: a site with the README's access log filter, a
// hybrid login and tool calls through it. The access log has the broker's URIs with code
// and state replaced and no Location; caddy's own log, at DEBUG, has the module's audit
// events under http.handlers.mcp_oauth.audit, and neither holds a code, state, token or
// cookie (SECURITY.md W13).
func TestAccessLogFilterThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.AccessTokens(o.Issuer, o.JWKSURI, "nextcloud"))
	accessLog := filepath.Join(t.TempDir(), "access.log")
	site := strings.Replace(hybridSite(o, up.URL, "\t\tregistration off"), " {\n", " {\n"+testenv.AccessLogFilter(t, "../README.md", accessLog)+"\n", 1)
	caddy := startCaddy(t, site)
	br := newBrowser(o)
	s, tok := connectPreregistered(t, caddy.Base, br)
	checkDelegation(t, s, up, o, tok.AccessToken)

	secrets := append([]string{tok.AccessToken, tok.RefreshToken, testenv.BrokerClientSecret, o.User.Password}, br.codes...)
	for _, v := range br.visited {
		if u, err := url.Parse(v); err == nil {
			secrets = append(secrets, u.Query().Get("state"))
		}
	}
	base, _ := url.Parse(caddy.Base)
	for _, c := range br.client.Jar.Cookies(base) {
		secrets = append(secrets, c.Value)
	}
	var lines []byte
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if lines, _ = os.ReadFile(accessLog); bytes.Contains(lines, []byte(`"uri":"/oauth/callback?`)) {
			break
		}
	}
	for _, want := range []string{`"uri":"/oauth/authorize?`, `"uri":"/oauth/callback?`, "code=REDACTED", "state=REDACTED"} {
		if !bytes.Contains(lines, []byte(want)) {
			t.Errorf("no %s in the access log:\n%s", want, lines)
		}
	}
	if bytes.Contains(lines, []byte(`"Location"`)) {
		t.Errorf("a Location header is in the access log:\n%s", lines)
	}
	for _, s := range secrets {
		if s != "" && bytes.Contains(lines, []byte(s)) {
			t.Errorf("the access log holds a secret (%d chars, starts %.4s…)", len(s), s)
		}
	}
	caddy.assertLogsFree(secrets...)
	if logs := caddy.logs.String(); !strings.Contains(logs, `"logger":"http.handlers.mcp_oauth.audit","msg":"session_created"`) {
		t.Errorf("no session_created audit event in caddy's log")
	}
}
