package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"golang.org/x/oauth2"
)

// Glue for the interop tests that need hybrid mode: the broker as the MCP client's
// authorization server in front of the Node IdP.

// nodeRSClientID is a confidential client of the Node IdP that the upstream recorder
// uses to introspect opaque tokens, as Nextcloud's user_oidc would.
const (
	nodeRSClientID     = "nextcloud-rs"
	nodeRSClientSecret = "node-idp-rs-secret-0123456789"
	// tsRedirectURL is where MCP clients of these tests say their redirect URI is; nothing
	// listens there: the login helpers stop at it.
	tsRedirectURL = "http://127.0.0.1:49152/callback"
)

func nodeRSClient() nodeClient {
	return nodeClient{
		"client_id":      nodeRSClientID,
		"client_secret":  nodeRSClientSecret,
		"redirect_uris":  []string{"http://127.0.0.1/unused"},
		"grant_types":    []string{"authorization_code"},
		"response_types": []string{"code"},
	}
}

// hybridNodeSite is a Caddyfile site for hybrid mode in front of upstream with the Node
// IdP, delegating for the audience nextcloud with the mode left to the broker (token
// exchange where discovery advertises it, else the refresh fallback).
func hybridNodeSite(idp *NodeIdP, upstream string, extra string) string {
	up, _ := url.Parse(upstream)
	return fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		mode hybrid
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:{port}/mcp
		scopes openid notes:read notes:write
		encryption_key %s
		client conformance {
			name "MCP Conformance Suite"
			redirect_uri http://127.0.0.1/callback
		}
		delegation {
			audience nextcloud
			scopes notes:read
		}
		tool_scope echo notes:read
		tool_scope get-sum notes:write
%s
	}
	reverse_proxy %s
}`, idp.Issuer, nodeBrokerClientID, nodeBrokerClientSecret, testKey, extra, up.Host)
}

// nodeLoginWithClient makes NodeIdP.Login's requests with c's cookie jar and transport
// (redirects are not followed by c itself).
func nodeLoginWithClient(c *http.Client) NodeLoginOption {
	return func(l *nodeLogin) { l.client = c }
}

// nodeHybridBrowser walks a hybrid login as a person would, with the Node IdP: the
// broker's authorize URL, its consent page (the browser of browser_test.go answers it),
// the IdP's login and consent, the broker's callback; it stops at the client's redirect
// URI. One cookie jar throughout.
type nodeHybridBrowser struct {
	idp   *NodeIdP
	page  *browser // consent page and broker redirects
	codes []string
}

func newNodeHybridBrowser(idp *NodeIdP) *nodeHybridBrowser {
	jar, _ := cookiejar.New(nil)
	return &nodeHybridBrowser{idp: idp, page: &browser{approve: true, client: &http.Client{
		Jar:           jar,
		Timeout:       20 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}}
}

func (b *nodeHybridBrowser) login(ctx context.Context, authorizeURL string) (*url.URL, error) {
	next, err := url.Parse(authorizeURL)
	if err != nil {
		return nil, err
	}
	broker := next.Host
	for range 20 {
		switch {
		case next.Host == broker && next.Path == "/oauth/consent":
			if next, err = b.page.consent(ctx, next); err != nil {
				return nil, err
			}
		case next.Host == broker && strings.HasPrefix(next.Path, "/oauth/"):
			if next, err = b.page.get(ctx, next); err != nil {
				return nil, err
			}
		case next.Scheme+"://"+next.Host == b.idp.Issuer:
			if next, err = b.idp.Login(ctx, next.String(), nodeLoginWithClient(b.page.client)); err != nil {
				return nil, err
			}
		default:
			if c := next.Query().Get("code"); c != "" {
				b.codes = append(b.codes, c)
			}
			return next, nil
		}
	}
	return nil, fmt.Errorf("hybrid login: too many hops")
}

// brokerClient registers a public client at the broker by DCR and returns its oauth2
// config (the broker's endpoints, the loopback redirect URI).
func brokerClient(t *testing.T, caddy *caddyProc, name string) oauth2.Config {
	t.Helper()
	body, _ := json.Marshal(map[string]any{
		"client_name": name, "redirect_uris": []string{tsRedirectURL}, "token_endpoint_auth_method": "none",
		"grant_types": []string{"authorization_code", "refresh_token"}, "response_types": []string{"code"},
	})
	resp, err := http.Post(caddy.Base+"/oauth/register", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var reg struct {
		ClientID string `json:"client_id"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&reg); err != nil || resp.StatusCode != http.StatusCreated || reg.ClientID == "" {
		t.Fatalf("DCR at the broker: %s %v", resp.Status, err)
	}
	return oauth2.Config{
		ClientID:    reg.ClientID,
		RedirectURL: tsRedirectURL,
		Scopes:      []string{"openid", "notes:read", "notes:write"},
		Endpoint:    oauth2.Endpoint{AuthURL: caddy.Base + "/oauth/authorize", TokenURL: caddy.Base + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams},
	}
}

// brokerAuthorizeURL builds an authorization request to the broker with PKCE and the
// resource; it returns the URL and the verifier.
func brokerAuthorizeURL(cfg oauth2.Config, caddy *caddyProc) (string, string) {
	verifier := oauth2.GenerateVerifier()
	return cfg.AuthCodeURL("st-"+oauth2.GenerateVerifier()[:8], oauth2.S256ChallengeOption(verifier),
		oauth2.SetAuthURLParam("resource", caddy.Base+"/mcp")), verifier
}

// brokerToken logs the IdP's user in through the broker and returns the broker's tokens.
func brokerToken(t *testing.T, caddy *caddyProc, idp *NodeIdP) *oauth2.Token {
	t.Helper()
	cfg := brokerClient(t, caddy, "e2e wire client")
	authURL, verifier := brokerAuthorizeURL(cfg, caddy)
	final, err := newNodeHybridBrowser(idp).login(t.Context(), authURL)
	if err != nil {
		t.Fatalf("hybrid login: %v\n%s", err, tail(caddy.logs.String()))
	}
	tok, err := cfg.Exchange(t.Context(), final.Query().Get("code"), oauth2.VerifierOption(verifier),
		oauth2.SetAuthURLParam("resource", caddy.Base+"/mcp"))
	if err != nil {
		t.Fatalf("code at the broker: %v", err)
	}
	return tok
}

// upstreamToken is a bearer token as the upstream saw it, resolved at the IdP.
type upstreamToken struct {
	Method    string
	RPCMethod string
	Tool      string
	SHA256    string // of the token
	JWT       bool
	Active    bool
	Audience  []string
	Scope     string
	Subject   string
	ClientID  string
	Error     string
}

// tokenRecorder is the upstream's front door: it records the bearer token of every
// request and what the IdP says of it (a JWT's verified claims; an opaque token's
// introspection), then passes the request on unchanged, streaming.
type tokenRecorder struct {
	URL   string // the MCP endpoint to give caddy
	idp   *NodeIdP
	keys  *oidc.RemoteKeySet
	intro string

	mu   sync.Mutex
	seen []upstreamToken
}

func startTokenRecorder(t *testing.T, idp *NodeIdP, upstream string) *tokenRecorder {
	t.Helper()
	disc, err := idp.Discovery(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	target, _ := url.Parse(upstream)
	rec := &tokenRecorder{idp: idp, intro: disc["introspection_endpoint"].(string),
		keys: oidc.NewRemoteKeySet(context.Background(), disc["jwks_uri"].(string))}
	proxy := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: target.Scheme, Host: target.Host})
	proxy.FlushInterval = -1
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec.record(r)
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	rec.URL = srv.URL + target.Path
	return rec
}

func (rec *tokenRecorder) record(r *http.Request) {
	seen := upstreamToken{Method: r.Method}
	if r.Body != nil && r.Method == http.MethodPost {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 4<<20))
		r.Body = io.NopCloser(bytes.NewReader(body))
		var m struct {
			Method string `json:"method"`
			Params struct {
				Name string `json:"name"`
			} `json:"params"`
		}
		json.Unmarshal(body, &m)
		seen.RPCMethod, seen.Tool = m.Method, m.Params.Name
	}
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if ok {
		sum := sha256.Sum256([]byte(tok))
		seen.SHA256 = hex.EncodeToString(sum[:])
		rec.resolve(r.Context(), tok, &seen)
	}
	rec.mu.Lock()
	rec.seen = append(rec.seen, seen)
	rec.mu.Unlock()
}

func (rec *tokenRecorder) resolve(ctx context.Context, tok string, seen *upstreamToken) {
	var claims struct {
		Active   *bool  `json:"active"`
		Aud      any    `json:"aud"`
		Scope    string `json:"scope"`
		Sub      string `json:"sub"`
		ClientID string `json:"client_id"`
	}
	if jwtShape.MatchString(tok) {
		seen.JWT = true
		payload, err := rec.keys.VerifySignature(ctx, tok)
		if err != nil {
			seen.Error = err.Error()
			return
		}
		json.Unmarshal(payload, &claims)
		seen.Active = true
	} else {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, rec.intro, strings.NewReader(url.Values{"token": {tok}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth(nodeRSClientID, nodeRSClientSecret)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			seen.Error = err.Error()
			return
		}
		defer resp.Body.Close()
		json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&claims)
		seen.Active = claims.Active != nil && *claims.Active
	}
	seen.Audience = audiences(map[string]any{"aud": claims.Aud})
	seen.Scope, seen.Subject, seen.ClientID = claims.Scope, claims.Sub, claims.ClientID
}

// Seen returns what the upstream received so far.
func (rec *tokenRecorder) Seen() []upstreamToken {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]upstreamToken(nil), rec.seen...)
}

// artifactsDir is where files for CI's artifacts go: $MCP_OAUTH_ARTIFACTS, else
// e2e/artifacts (ignored by git).
func artifactsDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("MCP_OAUTH_ARTIFACTS")
	if dir == "" {
		dir = "artifacts"
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// consentRun and consentReport mirror interop/consent.mjs's input and output.
type consentRun struct {
	Name           string         `json:"name"`
	URL            string         `json:"url"`
	Action         string         `json:"action"`
	RedirectPrefix string         `json:"redirectPrefix"`
	Expect         map[string]any `json:"expect,omitempty"`
	Screenshot     string         `json:"screenshot,omitempty"`
	ForgeOrigins   []string       `json:"forgeOrigins,omitempty"`
	Handoff        bool           `json:"handoff,omitempty"`
}

type consentResult struct {
	Name          string `json:"name"`
	ConsentStatus int    `json:"consentStatus"`
	ConsentPath   string `json:"consentPath"`
	Text          string `json:"text"`
	Checks        struct {
		ClientName   *bool           `json:"clientName"`
		RedirectHost *bool           `json:"redirectHost"`
		Scopes       map[string]bool `json:"scopes"`
	} `json:"checks"`
	Screenshot *struct {
		Path  string `json:"path"`
		Bytes int    `json:"bytes"`
	} `json:"screenshot"`
	Forged []struct {
		Origin   string `json:"origin"`
		Status   int    `json:"status"`
		Location string `json:"location"`
		Text     string `json:"text"`
	} `json:"forged"`
	ConsentStatusAfterForgery string `json:"consentStatusAfterForgery"`
	Handoff                   *struct {
		URL    string `json:"url"`
		Status int    `json:"status"`
		Text   string `json:"text"`
	} `json:"handoff"`
	Redirect string `json:"redirect"`
	Error    string `json:"error"`
}

// runConsentBrowser runs interop/consent.mjs (Debian's chromium) over runs.
func runConsentBrowser(t *testing.T, runs []consentRun) []consentResult {
	t.Helper()
	cfg, _ := json.Marshal(map[string]any{"chromium": chromiumPath(t), "login": nodeUser, "runs": runs})
	p := startNode(t, "consent.mjs", nil, "--config", string(cfg))
	var out struct {
		Runs []consentResult `json:"runs"`
	}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	if err := p.nextJSON(ctx, &out); err != nil {
		t.Fatal(err)
	}
	return out.Runs
}

// chromiumPath is Debian's chromium; under CI its absence fails the test.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/usr/bin/chromium", "/usr/bin/chromium-browser"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("chromium is missing under CI: .ci/run must `apt-get install -y chromium`")
	}
	t.Skip("chromium is not installed (apt-get install -y chromium)")
	return ""
}

// forgeServer serves /forge: a page that auto-submits ticket, csrf and decision=approve
// to action, from its own origin (a cross-site or cross-origin attacker's page).
func forgeServer(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprintf(w, `<!doctype html><html><body><form method="post" action="%s">
<input type="hidden" name="ticket" value="%s"><input type="hidden" name="csrf" value="%s">
<input type="hidden" name="decision" value="approve"></form>
<script>document.forms[0].submit()</script></body></html>`,
			htmlAttr(q.Get("action")), htmlAttr(q.Get("ticket")), htmlAttr(q.Get("csrf")))
	}))
	t.Cleanup(srv.Close)
	return srv
}

func htmlAttr(s string) string {
	return strings.NewReplacer(`&`, "&amp;", `"`, "&quot;", `<`, "&lt;", `>`, "&gt;").Replace(s)
}

// runStamp is the time conformance appends to each result directory's name.
var runStamp = regexp.MustCompile(`-\d{4}-\d\d-\d\dT[\dTZ-]+$`)

// conformanceCheck is one check of @modelcontextprotocol/conformance's results.
type conformanceCheck struct {
	ID           string `json:"id"`
	Name         string `json:"name"`
	Status       string `json:"status"`
	ErrorMessage string `json:"errorMessage"`
}

// runConformance runs `conformance authorization` against the broker's issuer with a
// client pre-registered in the Caddyfile, plays the browser when it prints the
// authorization URL (login, then the redirect to its callback server), and returns the
// status of every check by check id, with the process's exit code. The checks.json files
// are copied to the artifacts directory.
func runConformance(t *testing.T, issuer, clientID, resource string, login tsLoginFunc) (map[string]conformanceCheck, int) {
	t.Helper()
	outDir := t.TempDir()
	port := freePort(t)
	p := startNode(t, "node_modules/@modelcontextprotocol/conformance/dist/index.js", nil,
		"authorization", "--url", issuer, "--client-id", clientID, "--resource", resource,
		"--port", fmt.Sprint(port), "--output-dir", outDir)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	// The authorization URL is a line of its own; then it waits for its callback.
	prefix := issuer + "/oauth/authorize?"
	var authorizeURL string
	for authorizeURL == "" {
		select {
		case line, ok := <-p.lines:
			if !ok {
				t.Logf("conformance ended before asking for a browser:\n%s\n%s", tail(p.stdout.String()), tail(p.stderr.String()))
				goto done
			}
			if strings.HasPrefix(strings.TrimSpace(line), prefix) {
				authorizeURL = strings.TrimSpace(line)
			}
		case <-ctx.Done():
			t.Fatalf("conformance printed no authorization URL:\n%s\n%s", tail(p.stdout.String()), tail(p.stderr.String()))
		}
	}
	{
		final, err := login(ctx, authorizeURL)
		if err != nil {
			t.Fatalf("conformance's authorization: %v", err)
		}
		if !strings.HasPrefix(final.String(), fmt.Sprintf("http://127.0.0.1:%d/callback?", port)) {
			t.Fatalf("conformance's authorization ended at %s", final.Redacted())
		}
		// Its callback server starts as it prints the URL: retry a refused connection briefly.
		for attempt := 0; ; attempt++ {
			resp, err := http.Get(final.String())
			if err == nil {
				resp.Body.Close()
				break
			}
			if attempt == 20 {
				t.Fatalf("handing the redirect to conformance: %v", err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
done:
	p.wait(60 * time.Second)
	code := -1
	if p.cmd.ProcessState != nil {
		code = p.cmd.ProcessState.ExitCode()
	}
	results := map[string]conformanceCheck{}
	files, _ := filepath.Glob(filepath.Join(outDir, "*", "checks.json"))
	artifacts := filepath.Join(artifactsDir(t), "conformance")
	os.MkdirAll(artifacts, 0o755)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var checks []conformanceCheck
		if err := json.Unmarshal(b, &checks); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, c := range checks {
			results[c.ID] = c
		}
		name := runStamp.ReplaceAllString(filepath.Base(filepath.Dir(f)), "")
		os.WriteFile(filepath.Join(artifacts, name+".json"), b, 0o644)
	}
	t.Logf("conformance output:\n%s", tail(p.stdout.String()))
	return results, code
}
