package flows

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// auditSecrets are the secrets a test handled, by name, to look for in logs.
type auditSecrets map[string]string

func (s auditSecrets) add(name, value string) {
	if value != "" {
		s[name] = value
	}
}

// assertNoSecretInLogs fails for any log entry, message, logger name or any field as
// serialized, that contains one of secrets (SECURITY.md W13).
func assertNoSecretInLogs(t *testing.T, logs *observer.ObservedLogs, secrets auditSecrets) {
	t.Helper()
	for _, e := range logs.All() {
		line, err := json.Marshal(map[string]any{"logger": e.LoggerName, "msg": e.Message, "fields": e.ContextMap()})
		if err != nil {
			t.Fatalf("serializing %q: %v", e.Message, err)
		}
		for name, s := range secrets {
			if bytes.Contains(line, []byte(s)) {
				t.Errorf("the %s is in the log entry %s", name, line)
			}
		}
	}
}

// TestAuditEventsAndNoSecretsInLogs drives every flow with the broker's logger at DEBUG:
// a registered confidential client's hybrid login with consent, its code exchange, tool
// calls with delegation, a client known by its metadata document, refreshes, refresh-token reuse, a replayed code, revocation, bad
// codes, verifiers and secrets; and in progressive mode an offline access grant, a
// background token and the grant's revocation. Each audit event is logged once on the
// audit logger with who and from where, every logger is one of the named ones, and no
// token, code, verifier, secret, password, state, cookie or Authorization value is in any
// entry (SECURITY.md W13).
func TestAuditEventsAndNoSecretsInLogs(t *testing.T) {
	o := testenv.SharedOP(t)
	core, logs := observer.New(zapcore.DebugLevel)
	logger := zap.New(core)
	secrets := auditSecrets{"password": o.User.Password, "broker's client secret": testenv.BrokerClientSecret}

	// Hybrid mode, token exchange.
	up := delegationUpstream(t, o)
	docs := startDocumentServer(t, serveDocument(claudeCodeDocument, "max-age=3600"))
	b, front := startHybridFrontWith(t, o, up.URL, delegating(ModeHybrid, DelegationTokenExchange, func(c *Config) {
		c.Logger, c.Registration, c.CIMDAllowPrivate = logger, true, true
	}), func(b *Broker) {
		roots := x509.NewCertPool()
		roots.AddCert(docs.Certificate())
		b.clients.documents.rootCAs = roots
	})
	e := lessonTokens(o, b, front)

	reg := postJSON(t, front.URL+pathRegister, `{"redirect_uris":["`+tokenTestRedirect+`"],"token_endpoint_auth_method":"client_secret_post","client_name":"Audit"}`)
	var client clientInformation
	if err := json.Unmarshal(reg, &client); err != nil || client.ClientSecret == "" {
		t.Fatalf("registration: %v %s", err, reg)
	}
	secrets.add("registered client's secret", client.ClientSecret)
	withSecret := func(f url.Values) { f.Set("client_secret", client.ClientSecret) }

	br := newHybridBrowser(t)
	verifier, state := oauth2.GenerateVerifier(), "client-"+randomToken()
	consentURL := consentURLFor(t, br, front, hybridAuthorizeQuery(client.ClientID, tokenTestRedirect, verifier, state, []string{"openid", "notes:read", "notes:write"}))
	_, page := br.get(consentURL.String())
	ticket, csrf := consentForm(t, page)
	idpURL := br.decide(consentURL, "approve")
	cb := br.loginAtIdP(o, idpURL)
	code := br.redirect(br.get(cb.String())).Query().Get("code")
	for _, c := range br.client.Jar.Cookies(mustParse(t, front.URL)) {
		secrets.add("broker cookie "+c.Name, c.Value)
	}
	secrets.add("client state", state)
	secrets.add("PKCE verifier", verifier)
	secrets.add("consent ticket", ticket)
	secrets.add("CSRF token", csrf)
	secrets.add("IdP state", idpURL.Query().Get("state"))
	secrets.add("nonce", idpURL.Query().Get("nonce"))
	secrets.add("IdP code", cb.Query().Get("code"))
	secrets.add("broker code", code)

	// Error paths first: a wrong secret, a bad verifier (which consumes the code: the
	// client starts again), an unknown code.
	e.exchange(t, client.ClientID, code, verifier, func(f url.Values) { f.Set("client_secret", "wrong-"+client.ClientSecret) }).
		wantError(t, http.StatusUnauthorized, "invalid_client")
	badVerifier := oauth2.GenerateVerifier()
	secrets.add("bad PKCE verifier", badVerifier)
	e.exchange(t, client.ClientID, code, badVerifier, withSecret).wantError(t, http.StatusBadRequest, "invalid_grant")
	unknown := "unknown-" + randomToken()
	secrets.add("unknown code", unknown)
	e.exchange(t, client.ClientID, unknown, verifier, withSecret).wantError(t, http.StatusBadRequest, "invalid_grant")

	// Consent is not remembered for a loopback redirect URI (SECURITY.md S1.40): the
	// second login asks again.
	verifier = oauth2.GenerateVerifier()
	secrets.add("second PKCE verifier", verifier)
	code = br.login(front, o, client.ClientID, tokenTestRedirect, verifier, []string{"openid", "notes:read", "notes:write"})
	secrets.add("second broker code", code)
	tok := e.exchange(t, client.ClientID, code, verifier, withSecret).wantTokens(t)
	addSessions := func() {
		for i, sess := range sessions(t, b) {
			secrets.add(fmt.Sprintf("session id %s", sess.ID[:4]), sess.ID)
			if g, err := b.sessions.grant(&sess); err == nil {
				secrets.add(fmt.Sprintf("IdP access token %d/%s", i, sess.ID[:4]), g.AccessToken)
				secrets.add(fmt.Sprintf("IdP refresh token %d/%s", i, sess.ID[:4]), g.RefreshToken)
				secrets.add(fmt.Sprintf("ID token %d/%s", i, sess.ID[:4]), g.IDToken)
			}
		}
	}
	addSessions()

	s := connect(t, front.URL, tok.AccessToken)
	for _, call := range []*mcp.CallToolParams{{Name: "notes_write", Arguments: map[string]any{"text": "x"}}, {Name: "notes_read"}, {Name: "notes_read"}} {
		if res, err := s.CallTool(t.Context(), call); err != nil || res.IsError {
			t.Fatalf("%s: %v %+v", call.Name, err, res)
		}
	}
	if st := initStatus(t, front, "mcpat_"+randomToken()); st != http.StatusUnauthorized {
		t.Fatalf("unknown access token: %d", st)
	}

	next := e.refresh(t, client.ClientID, tok.RefreshToken, withSecret).wantTokens(t)
	last := e.refresh(t, client.ClientID, next.RefreshToken, withSecret).wantTokens(t)
	// The first refresh token again, after its successor was used: reuse.
	e.refresh(t, client.ClientID, tok.RefreshToken, withSecret).wantError(t, http.StatusBadRequest, "invalid_grant")
	// The second code again: a replay, which revokes what it issued.
	e.exchange(t, client.ClientID, code, verifier, withSecret).wantError(t, http.StatusBadRequest, "invalid_grant")

	// A third login, revoked by its client.
	verifier = oauth2.GenerateVerifier()
	secrets.add("third PKCE verifier", verifier)
	code = br.login(front, o, client.ClientID, tokenTestRedirect, verifier, nil)
	secrets.add("third broker code", code)
	third := e.exchange(t, client.ClientID, code, verifier, withSecret).wantTokens(t)
	addSessions()
	if res := e.post(t, pathRevoke, url.Values{"client_id": {client.ClientID}, "client_secret": {client.ClientSecret}, "token": {third.RefreshToken}}, nil); res.status != http.StatusOK {
		t.Fatalf("revocation: %d", res.status)
	}
	// A client known by its metadata document, in a browser of its own.
	cimdID := docs.URL + "/oauth/client-metadata.json"
	verifier = oauth2.GenerateVerifier()
	secrets.add("metadata document client's PKCE verifier", verifier)
	code = newHybridBrowser(t).login(front, o, cimdID, tokenTestRedirect, verifier, []string{"openid", "notes:read"})
	secrets.add("metadata document client's code", code)
	cimdTok := e.exchange(t, cimdID, code, verifier, nil).wantTokens(t)
	addSessions()
	for i, tk := range []TokenResponse{tok, next, last, third, cimdTok} {
		secrets.add(fmt.Sprintf("access token %d", i), tk.AccessToken)
		secrets.add(fmt.Sprintf("refresh token %d", i), tk.RefreshToken)
	}
	for i, r := range up.Seen() {
		secrets.add(fmt.Sprintf("delegated token %d", i), strings.TrimPrefix(r.Authorization, "Bearer "))
	}

	// Progressive mode: offline access granted, a background token, revoked.
	f := startOfflineAccess(t, o, func(c *Config) { c.Logger = logger })
	user := f.userToken(t, o.User)
	secrets.add("user's IdP access token", user)
	link := f.link(t, user)
	secrets.add("offline access link", mustParse(t, link).Query().Get("link"))
	cbOffline := f.loginAt(t, link)
	secrets.add("offline access IdP state", cbOffline.Query().Get("state"))
	secrets.add("offline access IdP code", cbOffline.Query().Get("code"))
	if resp, page := f.callback(t, cbOffline); resp.StatusCode != http.StatusOK {
		t.Fatalf("offline access callback: %s %s", resp.Status, page)
	}
	_, offlineRefresh, err := f.grant(t, o.User.Subject)
	if err != nil {
		t.Fatal(err)
	}
	secrets.add("offline access refresh token", offlineRefresh)
	basic := basicCredentials(testWorkerID, testWorkerSecret)
	secrets.add("background client's Authorization", basic)
	secrets.add("background client's secret", testWorkerSecret)
	resp := f.backgroundRequest(t, basic, url.Values{"subject": {o.User.Subject}})
	var bg TokenResponse
	decodeJSON(t, resp, &bg)
	if bg.AccessToken == "" {
		t.Fatalf("background token: %s", resp.Status)
	}
	secrets.add("background token", bg.AccessToken)
	wrongBasic := basicCredentials(testWorkerID, "wrong-"+testWorkerSecret)
	secrets.add("wrong background Authorization", wrongBasic)
	if resp := f.backgroundRequest(t, wrongBasic, url.Values{"subject": {o.User.Subject}}); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("wrong background secret: %s", resp.Status)
	}
	if resp := do(t, http.MethodDelete, f.front.URL+pathOfflineAccessStatus, bearer(user), ""); resp.StatusCode != http.StatusOK {
		t.Fatalf("offline access revocation: %s", resp.Status)
	}

	// The audit events, each with who and from where.
	events := map[string]int{}
	for _, entry := range logs.FilterLoggerName("audit").All() {
		events[entry.Message]++
		fields := entry.ContextMap()
		if entry.Level != zapcore.InfoLevel || fields["client_ip"] != "127.0.0.1" {
			t.Errorf("audit event %s at %s from %v, want INFO from 127.0.0.1", entry.Message, entry.Level, fields["client_ip"])
		}
	}
	for event, want := range map[string]int{
		auditClientRegistered: 1, auditConsentGiven: 4, auditSessionCreated: 4, auditTokenRefreshed: 2,
		auditReuseDetected: 2, auditSessionRevoked: 3, auditOfflineAccessGranted: 1, auditOfflineAccessRevoked: 1,
		auditBackgroundTokenIssued: 1,
	} {
		if events[event] != want {
			t.Errorf("%d %s events, want %d (all: %v)", events[event], event, want, events)
		}
	}
	for _, entry := range logs.FilterMessage(auditSessionCreated).All() {
		if f := entry.ContextMap(); f["subject"] != o.User.Subject || (f["client_id"] != client.ClientID && f["client_id"] != cimdID) {
			t.Errorf("session_created: %v", f)
		}
	}

	// Every entry comes from a named logger; the debug lines of the warm path are there.
	named := []string{"authorize", "consent", "login", "token", "resource", "delegation", "offline", "register", "storage", "verify", "audit"}
	for _, entry := range logs.All() {
		if !slices.Contains(named, strings.SplitN(entry.LoggerName, ".", 2)[0]) {
			t.Errorf("entry %q on logger %q", entry.Message, entry.LoggerName)
		}
	}
	for _, msg := range []string{"request admitted", "delegated token from the cache", "delegated token obtained", "broker access token checked", "request failed"} {
		if logs.FilterMessage(msg).FilterLevelExact(zapcore.DebugLevel).Len() == 0 {
			t.Errorf("no DEBUG entry %q", msg)
		}
	}

	if len(secrets) < 40 {
		t.Fatalf("only %d secrets collected", len(secrets))
	}
	assertNoSecretInLogs(t, logs, secrets)
}

// postJSON posts body to u and returns the answer's body.
func postJSON(t *testing.T, u, body string) []byte {
	t.Helper()
	resp, err := http.Post(u, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("POST %s: %s %s", u, resp.Status, b)
	}
	return b
}

func mustParse(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// TestAuditedPathsResolveTheClientAddress: every endpoint whose audit events carry
// client_ip asks the server in front for the client's address (NeedsClientIP); else,
// behind a proxy, its events would name the proxy.
func TestAuditedPathsResolveTheClientAddress(t *testing.T) {
	for _, p := range []string{
		pathRegister, pathConsent, pathCallback, pathToken, pathRevoke, // client registered, consent given, session created, token refreshed, reuse, revoked
		OfflineAccessCallback, OfflineAccessCallbackLegacy, // offline access granted
		pathOfflineAccessStatus, pathOfflineAccessStatusLegacy, // offline access revoked
		pathBackgroundToken, // background token issued, offline access revoked at the IdP
	} {
		if !NeedsClientIP(p) {
			t.Errorf("NeedsClientIP(%q) = false: its audit events would name the proxy's address", p)
		}
	}
}

// TestAppPasswordAuditEventsAndNoSecretsInLogs drives delegation mode app_password with the
// broker's logger at DEBUG: a grant by another account (refused), the user's own grant,
// tool calls carrying it, and its revocation. Each of its audit events is logged on the
// audit logger, and no app password, poll token, login token, Basic value or client
// token is in any entry (SECURITY.md W13).
func TestAppPasswordAuditEventsAndNoSecretsInLogs(t *testing.T) {
	o := testenv.SharedOP(t)
	nc := testenv.StartNextcloudStandIn(t)
	f := startAppPassword(t, o, nc, nil)
	token := f.token(t, o.User)
	if err := nc.Grant(f.open(t, f.elicit(t, token)), o.OtherUser.Subject); err != nil {
		t.Fatal(err)
	}
	if err := f.b.PollLoginFlows(t.Context()); err != nil {
		t.Fatal(err)
	}
	f.provision(t, o.User)
	f.whoami(t, token)
	auth := f.up.Seen()[len(f.up.Seen())-1].Authorization
	resp := do(t, http.MethodDelete, f.front.URL+pathOfflineAccessStatus, bearer(token), "")
	resp.Body.Close()

	for event, want := range map[string]int{
		auditAppPasswordFlowStarted: 2, auditAppPasswordRefused: 1, auditAppPasswordGranted: 1, auditAppPasswordRevoked: 1,
	} {
		entries := f.logs.FilterLoggerName("audit").FilterMessage(event).All()
		if len(entries) != want {
			t.Errorf("%s logged %d times, want %d", event, len(entries), want)
		}
		for _, e := range entries {
			if e.ContextMap()["subject"] != o.User.Subject {
				t.Errorf("%s names %v", event, e.ContextMap()["subject"])
			}
		}
	}
	secrets := auditSecrets{"client token": token}
	secrets.add("Basic value", strings.TrimPrefix(auth, "Basic "))
	for i, s := range nc.Secrets() {
		secrets.add(fmt.Sprintf("Nextcloud secret %d", i), s)
	}
	if len(secrets) < 7 { // two flows' poll and login tokens, two app passwords
		t.Fatalf("only %d secrets to look for", len(secrets))
	}
	assertNoSecretInLogs(t, f.logs, secrets)
}
