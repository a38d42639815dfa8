package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
)

// server2Request is one line of interop/server2.mjs's log: an HTTP request as the
// upstream got it.
type server2Request struct {
	Type            string `json:"type"`
	Method          string `json:"method"`
	ProtocolVersion string `json:"protocolVersion"`
	MCPMethod       string `json:"mcpMethod"`
	MCPName         string `json:"mcpName"`
	// Params are the Mcp-Param-* headers, by lower-case name.
	Params              map[string]string `json:"params"`
	TokenSHA256         string            `json:"tokenSHA256"`
	RPCMethod           string            `json:"rpcMethod"`
	Tool                string            `json:"tool"`
	MetaProtocolVersion string            `json:"metaProtocolVersion"`
	RequestState        bool              `json:"requestState"`
	InputResponses      []string          `json:"inputResponses"`
}

// server2 is interop/server2.mjs running: a 2026-07-28 MCP server of the 2.x SDK.
type server2 struct {
	URL string
	p   *nodeProc
}

func startServer2(t *testing.T) *server2 {
	t.Helper()
	p := startNode(t, "server2.mjs", nil, "--port", "0")
	var hello struct {
		URL string `json:"url"`
	}
	p.ready(&hello)
	if !strings.HasPrefix(hello.URL, "http://127.0.0.1:") {
		t.Fatalf("server2 URL %q is not on loopback", hello.URL)
	}
	return &server2{URL: hello.URL, p: p}
}

// Seen is every request server2 logged so far.
func (s *server2) Seen() []server2Request {
	var out []server2Request
	for line := range strings.SplitSeq(s.p.stdout.String(), "\n") {
		var r server2Request
		if json.Unmarshal([]byte(line), &r) == nil && r.Type == "request" {
			out = append(out, r)
		}
	}
	return out
}

// journeySite is the Caddyfile of the 2026-07-28 journey: hybrid mode in front of the
// Node IdP, the read scope as the base set, the write tool behind notes:write, the digest
// tool behind the user's offline access, client metadata documents from loopback.
func journeySite(idp *NodeIdP, upstream string) string {
	up, _ := url.Parse(upstream)
	return fmt.Sprintf(`http://127.0.0.1:{port} {
	mcp_oauth {
		mode hybrid
		issuer %s
		client_id %s
		client_secret %s
		resource http://127.0.0.1:{port}/mcp
		scopes openid notes:read notes:write
		base_scopes openid notes:read
		encryption_key %s
		client_metadata_allow_private
		delegation {
			audience nextcloud
			scopes notes:read
		}
		tool_scope notes_read notes:read
		tool_scope notes_write notes:write
		offline_access {
			scopes notes:read
			tools notes_schedule_*
		}
	}
	reverse_proxy %s
}`, idp.Issuer, nodeBrokerClientID, nodeBrokerClientSecret, testKey, up.Host)
}

// serveClientMetadata serves a client metadata document for redirectURI over TLS and
// returns its URL, a file with the server's certificate (for caddy's SSL_CERT_FILE) and
// a count of the document's fetches.
func serveClientMetadata(t *testing.T, name, redirectURI string) (string, string, *atomic.Int32) {
	t.Helper()
	var docURL string
	var fetches atomic.Int32
	docs := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "max-age=300")
		json.NewEncoder(w).Encode(map[string]any{
			"client_id": docURL, "client_name": name, "redirect_uris": []string{redirectURI},
			"grant_types": []string{"authorization_code", "refresh_token"}, "response_types": []string{"code"},
			"token_endpoint_auth_method": "none",
		})
	}))
	t.Cleanup(docs.Close)
	docURL = docs.URL + "/client.json"
	certFile := filepath.Join(t.TempDir(), "cimd.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: docs.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	return docURL, certFile, &fetches
}

// grantOffline plays the user opening the broker's one-time offline access link in the
// browser br logged in with: the link sends it to the IdP (login, consent to offline
// access), the IdP back to the broker's callback, whose page says it is done.
func (b *nodeHybridBrowser) grantOffline(ctx context.Context, link string) error {
	next, err := url.Parse(link)
	if err != nil {
		return err
	}
	broker := next.Host
	if next, err = b.page.get(ctx, next); err != nil {
		return fmt.Errorf("opening the offline access link: %w", err)
	}
	if next.Scheme+"://"+next.Host != b.idp.Issuer {
		return fmt.Errorf("the offline access link sent the browser to %s, not the IdP", next.Redacted())
	}
	if next, err = b.idp.Login(ctx, next.String(), nodeLoginWithClient(b.page.client)); err != nil {
		return err
	}
	if next.Host != broker {
		return fmt.Errorf("the IdP sent the browser to %s, not the broker", next.Redacted())
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, next.String(), nil)
	resp, err := b.page.client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("offline access callback: %s", resp.Status)
	}
	return nil
}

// journeyNote is the note the journey writes: not ASCII, so that its Mcp-Param header
// takes the Base64 form.
const journeyNote = "Grüße, 世界"

// journeyRow is one client of the journey tests: which SDK, which revision, which way to
// a client id.
type journeyRow struct {
	name      string
	sdk2      bool
	negotiate string // the 2.x client's versionNegotiation mode; "" for the 1.x SDK
	cimd      bool   // a client metadata document; else dynamic registration
	// sdkStepUp leaves the step-up to the SDK alone; the 1.x SDK needs its refresh token
	// hidden (see TestLeastPrivilegeTSClientThroughCaddyBinary).
	sdkStepUp bool
	version   string // the revision the connection must negotiate
	via       string // how the offline access link reached the client (client.mjs's elicitations)
	// comesBack: the user first comes back from the link without opening it and the
	// client retries; the broker asks again with the same link, unused (SECURITY.md S1.35),
	// which the user then opens and grants offline access with.
	comesBack bool
	// listen keeps a subscriptions/listen stream open through the calls; the write tool
	// makes the server publish a tool list change on it.
	listen bool
}

// TestJourney2026ThroughCaddyBinary is issue 13's journey: the 2.x
// @modelcontextprotocol/client 2.4.0, unmodified but for what an application supplies
// (its OAuth provider with a client metadata document URL, an elicitation handler that
// opens a URL), negotiates MCP 2026-07-28 through the real caddy binary with the 2.x
// @modelcontextprotocol/server 2.4.0 (interop/server2.mjs) behind it:
//
//	discovery (401 → RFC 9728 → RFC 8414) → CIMD (the URL as client_id, no registration)
//	→ consent → IdP login → tokens with the base set → tools/list → the read tool → the
//	write tool: 403 insufficient_scope → one re-authorization → success → the digest
//	tool: an InputRequiredResult with a URL-mode elicitation of the one-time offline
//	access link → the user grants offline access at the IdP → the SDK retries with
//	inputResponses and the requestState → success.
//
// The upstream's log shows every request with MCP-Protocol-Version 2026-07-28 and
// Mcp-Method (Mcp-Name on tool calls) matching its body, never the client's token (a
// delegated JWT for the audience nextcloud instead), the write tool only after the step-up
// and with a notes:write token, the digest tool once, without the broker's own input.
//
// The same Caddyfile and upstream serve 2025-11-25 clients in the same run's other rows:
// the 2.x client left at its default (legacy) negotiation and the 1.x
// @modelcontextprotocol/sdk 1.32.2, both registering dynamically; the offline access link
// reaches them as the URL elicitation error (-32042), which neither SDK acts on by
// itself, so client.mjs opens it and calls again, as an application would; the 2.x server
// answers them through its stateless 2025 fallback.
func TestJourney2026ThroughCaddyBinary(t *testing.T) {
	requireInterop(t)
	rows := []journeyRow{
		{name: "2.x client, 2026-07-28, CIMD", sdk2: true, negotiate: "auto", cimd: true, sdkStepUp: true, version: "2026-07-28", via: "input_required", listen: true},
		{name: "2.x client, 2026-07-28, DCR, the user first comes back without granting", sdk2: true, negotiate: "auto", sdkStepUp: true, version: "2026-07-28", via: "input_required", comesBack: true},
		{name: "2.x client, 2025-11-25, DCR", sdk2: true, negotiate: "legacy", sdkStepUp: true, version: "2025-11-25", via: "url_elicitation_error"},
		{name: "1.x client, 2025-11-25, DCR", version: "2025-11-25", via: "url_elicitation_error"},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) { runJourney(t, row) })
	}
}

// journey is what a journey runs against: the Node IdP, server2 behind a token recorder,
// a client metadata document, caddy, and the user's browser.
type journey struct {
	idp        *NodeIdP
	up         *server2
	rec        *tokenRecorder
	docURL     string
	docFetches *atomic.Int32
	caddy      *caddyProc
	br         *nodeHybridBrowser
}

func startJourney(t *testing.T) *journey {
	j := &journey{idp: startNodeIdP(t, profileKeycloak, nodeBrokerClient(), nodeRSClient()), up: startServer2(t)}
	j.rec = startTokenRecorder(t, j.idp, j.up.URL)
	var certFile string
	j.docURL, certFile, j.docFetches = serveClientMetadata(t, "Journey 2026 Client", tsRedirectURL)
	j.caddy = startCaddy(t, journeySite(j.idp, j.rec.URL), withEnv("SSL_CERT_FILE="+certFile))
	j.br = newNodeHybridBrowser(j.idp)
	return j
}

func runJourney(t *testing.T, row journeyRow) {
	j := startJourney(t)
	up, rec, docURL, docFetches, caddy, br := j.up, j.rec, j.docURL, j.docFetches, j.caddy, j.br
	var links []string
	opts := tsClientOptions{
		SDK2: row.sdk2, SDKStepUp: row.sdkStepUp, Negotiate: row.negotiate, Listen: row.listen,
		Calls:   []map[string]any{{"name": "notes_read", "arguments": map[string]any{}}},
		StepUp:  map[string]any{"name": "notes_write", "arguments": map[string]any{"text": journeyNote}},
		Offline: map[string]any{"name": "notes_schedule_digest", "arguments": map[string]any{}},
		Elicit: func(ctx context.Context, link string) (string, error) {
			links = append(links, link)
			if row.comesBack && len(links) == 1 {
				return "accept", nil // back without having opened it
			}
			if err := br.grantOffline(ctx, link); err != nil {
				return "", err
			}
			return "accept", nil
		},
	}
	if row.cimd {
		opts.ClientMetadataURL = docURL
	}
	s, err := runTSClientErr(t, caddy.Base+"/mcp", br.login, opts)
	if err != nil {
		t.Fatalf("%v\ncaddy:\n%s", err, tail(caddy.logs.String()))
	}
	if os.Getenv("JOURNEY_DEBUG") != "" {
		b, _ := json.MarshalIndent(s, "", " ")
		t.Logf("summary %s\nupstream:\n%s", b, up.p.stdout.String())
	}
	modern := row.version == "2026-07-28"

	// Discovery, then CIMD (the URL as client_id, no registration) or DCR.
	if s.ProtocolVersion != row.version {
		t.Errorf("negotiated protocol version %q, want %s", s.ProtocolVersion, row.version)
	}
	for _, path := range []string{"/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-authorization-server"} {
		if s.requestsTo("GET", path, http.StatusOK) == 0 {
			t.Errorf("the client never got %s", path)
		}
	}
	wantClientID := s.RegisteredClientID
	if row.cimd {
		if n := s.requestsTo("POST", "/oauth/register", 0); n != 0 || s.RegisteredClientID != "" {
			t.Errorf("the client registered (%d requests) although the broker takes its metadata document", n)
		}
		if docFetches.Load() == 0 {
			t.Errorf("the broker never fetched the client's metadata document")
		}
		wantClientID = docURL
	} else if n := s.requestsTo("POST", "/oauth/register", http.StatusCreated); n != 1 || s.RegisteredClientID == "" {
		t.Errorf("%d registrations, client id %q; want one", n, s.RegisteredClientID)
	}
	// Consent and base scopes: the first login asks the base set; the step-up one more.
	if len(s.Authorizations) != 2 || s.Authorizations[0].Scope != "openid notes:read" {
		t.Fatalf("authorizations %+v: want the base set, then one step-up", s.Authorizations)
	}
	for _, a := range s.Authorizations {
		if a.ClientID != wantClientID {
			t.Errorf("authorization with client_id %q, want %q", a.ClientID, wantClientID)
		}
	}
	if f := strings.Fields(s.Authorizations[1].Scope); !slices.Contains(f, "notes:write") || !slices.Contains(f, "notes:read") {
		t.Errorf("step-up asked %q, want notes:read and notes:write", s.Authorizations[1].Scope)
	}
	if br.page.consents != 2 {
		t.Errorf("%d consent pages, want one per authorization", br.page.consents)
	}
	// Tools, the read tool, the step-up.
	for _, name := range []string{"notes_read", "notes_write", "notes_schedule_digest"} {
		if !slices.Contains(s.Tools, name) {
			t.Errorf("tools/list %v lacks %s", s.Tools, name)
		}
	}
	if len(s.Calls) == 0 || s.Calls[0].Name != "notes_read" || s.Calls[0].IsError {
		t.Errorf("notes_read: %+v", s.Calls)
	}
	if s.StepUp == nil || !s.StepUp.OK || s.StepUp.Authorizations != 1 {
		t.Errorf("step-up %+v: want one re-authorization and success", s.StepUp)
	}
	if n := s.requestsTo("POST", "/mcp", http.StatusForbidden); n != 1 {
		t.Errorf("%d answers 403, want one (the write tool before the step-up)", n)
	}
	for _, r := range s.Requests {
		if r.Status == http.StatusForbidden && (!strings.Contains(r.WWWAuthenticate, `error="insufficient_scope"`) || !strings.Contains(r.WWWAuthenticate, `scope="openid notes:read notes:write"`)) {
			t.Errorf("403 challenge %q", r.WWWAuthenticate)
		}
	}
	// The subscription: opened through the broker, its stream carried the change the write
	// made the server publish, while the calls went on.
	if row.listen && (s.Listen == nil || !s.Listen.Honored.ToolsListChanged || s.Listen.Notifications == 0 || s.Listen.Closed != "local") {
		t.Errorf("subscriptions/listen %+v: want tool list changes honored, one delivered, closed by the client", s.Listen)
	}
	// The provisioning elicitation and the retry.
	wantElicitations := 1
	if row.comesBack {
		wantElicitations = 2
	}
	if s.Offline == nil || !s.Offline.OK || s.Offline.Elicitations != wantElicitations || !strings.Contains(s.Offline.Text, "digest scheduled") {
		t.Errorf("offline tool %+v: want %d URL elicitations, then the upstream's result", s.Offline, wantElicitations)
	}
	if len(s.Elicitations) != wantElicitations || len(links) != wantElicitations {
		t.Fatalf("elicitations %+v, %d links: want %d", s.Elicitations, len(links), wantElicitations)
	}
	for i, e := range s.Elicitations {
		if e.URL != caddy.Base+"/oauth/offline-access" || e.Action != "accept" || e.Via != row.via || !strings.HasPrefix(links[i], caddy.Base+"/oauth/offline-access?link=") {
			t.Errorf("elicitation %+v: want the broker's one-time offline access link, by %s, accepted", e, row.via)
		}
	}
	if row.comesBack && links[0] != links[1] {
		t.Errorf("the retry without a grant got a new one-time link, not the user's unused one")
	}

	// The 2026-07-28 client sent the transport headers on every MCP request. For a
	// notification (here notifications/cancelled, closing the subscription) the revision
	// defines no header requirement, and the 2.x client sends no Mcp-Method.
	for _, r := range s.Requests {
		if modern && r.Method == http.MethodPost && strings.HasSuffix(r.URL, "/mcp") && (r.ProtocolVersion != row.version || !mirrorsMethod(r.MCPMethod, r.RPCMethod)) {
			t.Errorf("client request %s %s (%s): MCP-Protocol-Version %q, Mcp-Method %q", r.Method, r.URL, r.RPCMethod, r.ProtocolVersion, r.MCPMethod)
		}
	}
	// What the upstream saw.
	seen := up.Seen()
	calls := map[string][]server2Request{}
	for _, r := range seen {
		if r.Method != http.MethodPost {
			if modern {
				t.Errorf("upstream got %s: the 2026-07-28 client uses POST only", r.Method)
			}
			continue
		}
		switch {
		case modern && (r.ProtocolVersion != row.version || r.MetaProtocolVersion != row.version || !mirrorsMethod(r.MCPMethod, r.RPCMethod) || r.MCPName != r.Tool):
			t.Errorf("upstream request %+v: want MCP-Protocol-Version %s and Mcp-Method/Mcp-Name as the body", r, row.version)
		case !modern && r.RPCMethod != "initialize" && r.ProtocolVersion != row.version:
			t.Errorf("upstream request %+v: want MCP-Protocol-Version %s", r, row.version)
		}
		if r.TokenSHA256 == "" || slices.Contains(s.AccessTokens, r.TokenSHA256) {
			t.Errorf("upstream request %s got the client's token, or none", r.RPCMethod)
		}
		if r.RPCMethod == "tools/call" {
			calls[r.Tool] = append(calls[r.Tool], r)
		}
	}
	first := "initialize"
	if modern {
		first = "server/discover"
	}
	want := []string{first, "tools/list", "tools/call"}
	if row.listen {
		want = append(want, "subscriptions/listen", "notifications/cancelled")
	}
	for _, m := range want {
		if !slices.ContainsFunc(seen, func(r server2Request) bool { return r.RPCMethod == m }) {
			t.Errorf("the upstream never got %s", m)
		}
	}
	if len(calls["notes_write"]) != 1 || len(calls["notes_read"]) != 1 {
		t.Errorf("upstream tool calls: %d notes_write, %d notes_read; want one each (the write after the step-up)", len(calls["notes_write"]), len(calls["notes_read"]))
	}
	// The write tool's argument annotated x-mcp-header: the 2026-07-28 client mirrors it
	// into Mcp-Param-Text, Base64 since it is not ASCII; the broker forwards it untouched
	// (and the server, which compares it with the body, answered the call).
	wantParam := map[string]string{}
	if modern {
		wantParam["mcp-param-text"] = "=?base64?" + base64.StdEncoding.EncodeToString([]byte(journeyNote)) + "?="
	}
	for _, w := range calls["notes_write"] {
		if !maps.Equal(w.Params, wantParam) {
			t.Errorf("upstream notes_write headers %v, want %v", w.Params, wantParam)
		}
	}
	if d := calls["notes_schedule_digest"]; len(d) != 1 || d[0].RequestState || len(d[0].InputResponses) != 0 {
		t.Errorf("upstream digest calls %+v: want one, without the broker's requestState and inputResponses", d)
	}
	var writeScoped bool
	for _, u := range rec.Seen() {
		if u.SHA256 != "" && (!u.JWT || !slices.Equal(u.Audience, []string{"nextcloud"}) || u.Subject != nodeUser) {
			t.Errorf("upstream token %+v: want a JWT for nextcloud, the user's", u)
		}
		writeScoped = writeScoped || (u.Tool == "notes_write" && slices.Contains(strings.Fields(u.Scope), "notes:write"))
	}
	if !writeScoped {
		t.Errorf("the write call went upstream without a notes:write token")
	}
	if _, ok := caddy.waitForLog("tool needs offline access"); !ok {
		t.Errorf("caddy logged no offline access elicitation")
	}
	caddy.assertLogsFree(append(br.codes, links...)...)
}

// TestJourney2026OfflineRefusedThroughCaddyBinary: the 2.x client on MCP 2026-07-28 calls
// the tool that needs offline access, and gets no further than a tool result with isError
// whose text carries the one-time link and says what to do: when it declares no URL
// elicitation, at once; when the user declines the URL elicitation, on the SDK's retry
// with that answer. The call never reaches the upstream.
func TestJourney2026OfflineRefusedThroughCaddyBinary(t *testing.T) {
	requireInterop(t)
	for _, decline := range []bool{false, true} {
		name := "no URL elicitation declared"
		if decline {
			name = "the user declines"
		}
		t.Run(name, func(t *testing.T) {
			j := startJourney(t)
			digest := map[string]any{"name": "notes_schedule_digest", "arguments": map[string]any{}}
			opts := tsClientOptions{SDK2: true, SDKStepUp: true, Negotiate: "auto", ClientMetadataURL: j.docURL}
			if decline {
				opts.Offline = digest
				opts.Elicit = func(context.Context, string) (string, error) { return "decline", nil }
			} else {
				opts.Calls = []map[string]any{digest}
			}
			s, err := runTSClientErr(t, j.caddy.Base+"/mcp", j.br.login, opts)
			if err != nil {
				t.Fatalf("%v\ncaddy:\n%s", err, tail(j.caddy.logs.String()))
			}
			wantElicitations := 0
			if decline {
				wantElicitations = 1
				if s.Offline == nil || s.Offline.OK || s.Offline.Elicitations != 1 {
					t.Errorf("offline %+v: want one elicitation, then the tool error", s.Offline)
				}
			}
			if s.ProtocolVersion != "2026-07-28" || len(s.Calls) != 1 || len(s.Elicitations) != wantElicitations {
				t.Fatalf("version %q, calls %+v, elicitations %+v", s.ProtocolVersion, s.Calls, s.Elicitations)
			}
			if c := s.Calls[0]; !c.IsError || !strings.Contains(c.Text, j.caddy.Base+"/oauth/offline-access?link=") || !strings.Contains(c.Text, "try again") {
				t.Errorf("digest call %+v: want isError with the link and what to do", c)
			}
			for _, r := range j.up.Seen() {
				if r.Tool == "notes_schedule_digest" {
					t.Errorf("the upstream got the digest call without the user's offline access")
				}
			}
		})
	}
}

// mirrorsMethod tells whether a 2026-07-28 message's Mcp-Method header is right for its
// JSON-RPC method: the same, and present on every request; a notification's may be absent
// (MCP 2026-07-28 defines no header requirement for notification POSTs).
func mirrorsMethod(header, method string) bool {
	if header == "" {
		return strings.HasPrefix(method, "notifications/")
	}
	return header == method
}
