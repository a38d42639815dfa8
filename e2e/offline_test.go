package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// offlineSiteBlock enables offline access with one background worker and a low background token
// rate.
const offlineSiteBlock = `		offline_access {
			scopes notes:read
			tools notes_r*
		}
		background_client worker worker-secret
		background_token_rate 3`

// userTokenFor is an access token of the OP's test user for resource, as an MCP client
// holds it in progressive mode.
func userTokenFor(t *testing.T, o *testenv.OP, resource string) string {
	t.Helper()
	cfg := oauth2.Config{ClientID: testenv.NativeClientID, Endpoint: o.Endpoint(), RedirectURL: "http://127.0.0.1/callback", Scopes: []string{"openid", "notes:read"}}
	v := oauth2.GenerateVerifier()
	cb, err := o.Login(t.Context(), cfg.AuthCodeURL("s", oauth2.S256ChallengeOption(v), oauth2.SetAuthURLParam("resource", resource)))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := cfg.Exchange(t.Context(), cb.Query().Get("code"), oauth2.VerifierOption(v))
	if err != nil {
		t.Fatal(err)
	}
	return tok.AccessToken
}

// backgroundToken asks base for a background token for subject as worker.
func backgroundToken(t *testing.T, base, worker, secret, subject string) (*http.Response, map[string]any) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/oauth/background-token", strings.NewReader(url.Values{"subject": {subject}}.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(worker, secret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&body)
	return resp, body
}

// TestOfflineAccessGrantsPerSiteThroughCaddyBinary: two mcp_oauth sites on one storage, each
// with a worker of the same name. A user grants offline access on one; the other
// site's worker gets nothing for that user, the site's own worker does, and a worker
// past its rate gets 429 with Retry-After.
func TestOfflineAccessGrantsPerSiteThroughCaddyBinary(t *testing.T) {
	o := testenv.StartOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	upURL, _ := url.Parse(up.URL)
	shared := withStorage(filepath.Join(t.TempDir(), "storage"))
	site := progressiveSite(o.Issuer, testenv.BrokerClientID, testenv.BrokerClientSecret, "openid notes:read", upURL.Host, nativeClientBlock+"\n"+offlineSiteBlock)
	a, b := startCaddy(t, site, shared), startCaddy(t, site, shared)

	// Grant offline access on site a: the link names the worker, so does the final page.
	// The start is asked at its name of earlier releases, which scripts still use; the
	// IdP sends the browser back to the callback of earlier releases, the default.
	token := userTokenFor(t, o, a.Base+"/mcp")
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, a.Base+"/oauth/authorize-nextcloud", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var link struct {
		AuthorizationURL  string   `json:"authorization_url"`
		BackgroundClients []string `json:"background_clients"`
	}
	err = json.NewDecoder(resp.Body).Decode(&link)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !slices.Equal(link.BackgroundClients, []string{"worker"}) {
		t.Fatalf("offline access link: %s %+v %v\n%s", resp.Status, link, err, a.logs.String())
	}
	// One browser opens the link, logs in and comes back: the login cookie binds them.
	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar}
	cb, err := o.Login(t.Context(), link.AuthorizationURL, testenv.LoginWithClient(browser))
	if err != nil {
		t.Fatal(err)
	}
	resp, err = browser.Get(cb.String())
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(page), "<code>worker</code>") {
		t.Fatalf("offline access callback: %s %s", resp.Status, page)
	}
	if !strings.HasPrefix(link.AuthorizationURL, a.Base+"/oauth/offline-access?link=") || cb.Path != "/oauth/callback-nextcloud" {
		t.Errorf("link %s, callback %s: want the new start path and the callback of earlier releases", link.AuthorizationURL, cb.Path)
	}
	req, _ = http.NewRequestWithContext(t.Context(), http.MethodGet, a.Base+"/oauth/offline-access/status", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	var status struct {
		Granted bool `json:"provisioned"`
	}
	err = json.NewDecoder(resp.Body).Decode(&status)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !status.Granted {
		t.Errorf("status: %s %+v %v", resp.Status, status, err)
	}

	if resp, body := backgroundToken(t, b.Base, "worker", "worker-secret", o.User.Subject); resp.StatusCode != http.StatusBadRequest || body["error"] != "invalid_grant" {
		t.Errorf("the other site's worker: %s %v, want 400 invalid_grant", resp.Status, body["error"])
	}
	resp, body := backgroundToken(t, a.Base, "worker", "worker-secret", o.User.Subject)
	if resp.StatusCode != http.StatusOK || body["access_token"] == nil {
		t.Fatalf("the site's own worker: %s %v", resp.Status, body["error"])
	}
	accessToken, _ := body["access_token"].(string)

	// Three a minute: two more (for a user with no grant, which costs no IdP call), then 429.
	for range 2 {
		backgroundToken(t, a.Base, "worker", "worker-secret", "nobody")
	}
	resp, body = backgroundToken(t, a.Base, "worker", "worker-secret", "nobody")
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" || body["error"] != "temporarily_unavailable" {
		t.Errorf("past the rate: %s Retry-After %q %v", resp.Status, resp.Header.Get("Retry-After"), body)
	}
	a.assertLogsFree(token, accessToken, "worker-secret", testenv.BrokerClientSecret, testKey)
	b.assertLogsFree(token, "worker-secret", testenv.BrokerClientSecret, testKey)
}
