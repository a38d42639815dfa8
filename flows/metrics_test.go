package flows

import (
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// recordingMetrics counts what the broker reports, as a real implementation would: with
// atomic adds into arrays, allocating nothing.
type recordingMetrics struct {
	events [NumEvents]atomic.Int64
	logins [NumLoginFlows][NumLoginOutcomes]atomic.Int64
	idp    [NumIdPEndpoints][NumIdPResults]atomic.Int64
}

func (m *recordingMetrics) Count(e Event)                     { m.events[e].Add(1) }
func (m *recordingMetrics) Login(f LoginFlow, o LoginOutcome) { m.logins[f][o].Add(1) }
func (m *recordingMetrics) IdPRequest(e IdPEndpoint, r IdPResult, _ time.Duration) {
	m.idp[e][r].Add(1)
}

// TestMetricsCountAHybridLogin runs a hybrid login, its tokens and MCP requests, and
// checks each step was counted where it happened: once, with the right outcome.
func TestMetricsCountAHybridLogin(t *testing.T) {
	o := testenv.SharedOP(t)
	up := testenv.StartUpstream(t, testenv.TrustedSubjectHeader())
	m := new(recordingMetrics)
	_, front := startHybridFront(t, o, up.URL, func(c *Config) {
		hybridClients(c)
		c.Metrics = m
	})

	// A denied consent fails the login at its consent step.
	br := newHybridBrowser(t)
	denied := br.authorize(front, hybridAuthorizeQuery(testenv.NativeClientID, hybridRedirectURI, oauth2.GenerateVerifier(), "st", nil))
	br.decide(denied, "deny")
	// A callback with a state nobody issued fails at the callback.
	br.get(front.URL + pathCallback + "?state=unknown&code=x")

	verifier := oauth2.GenerateVerifier()
	code := hybridLogin(t, front, o, testenv.NativeClientID, hybridRedirectURI, verifier, []string{"openid", "notes:read"})
	conf := oauth2.Config{
		ClientID:    testenv.NativeClientID,
		Endpoint:    oauth2.Endpoint{TokenURL: front.URL + pathToken, AuthStyle: oauth2.AuthStyleInParams},
		RedirectURL: hybridRedirectURI,
	}
	tok, err := conf.Exchange(t.Context(), code, oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatal(err)
	}
	tok.Expiry = time.Now().Add(-time.Minute) // so that the token source refreshes
	if tok, err = conf.TokenSource(t.Context(), tok).Token(); err != nil {
		t.Fatalf("refreshing: %v", err)
	}

	mcp := func(h http.Header) {
		h.Set("Content-Type", "application/json")
		h.Set("Accept", "application/json, text/event-stream")
		resp := do(t, http.MethodPost, front.URL+"/mcp", h,
			`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`)
		resp.Body.Close()
	}
	mcp(bearer(tok.AccessToken))
	mcp(http.Header{})
	mcp(bearer("mcpat_forged"))

	resp := do(t, http.MethodPost, front.URL+pathRevoke, http.Header{"Content-Type": {"application/x-www-form-urlencoded"}},
		url.Values{"client_id": {testenv.NativeClientID}, "token": {tok.RefreshToken}}.Encode())
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revocation: %d", resp.StatusCode)
	}

	for _, c := range []struct {
		name string
		got  *atomic.Int64
		want int64
	}{
		{"hybrid logins started", &m.logins[LoginHybrid][LoginStarted], 1},
		{"hybrid logins completed", &m.logins[LoginHybrid][LoginCompleted], 1},
		{"hybrid logins denied at consent", &m.logins[LoginHybrid][LoginFailedConsentDenied], 1},
		{"hybrid logins failed on an unknown state", &m.logins[LoginHybrid][LoginFailedUnknownState], 1},
		{"hybrid logins failed in another browser", &m.logins[LoginHybrid][LoginFailedWrongBrowser], 0},
		{"hybrid logins refused at the code exchange", &m.logins[LoginHybrid][LoginFailedCodeRefused], 0},
		{"tokens issued", &m.events[TokenIssued], 1},
		{"tokens refreshed", &m.events[TokenRefreshed], 1},
		{"tokens revoked", &m.events[TokenRevoked], 1},
		{"requests passed", &m.events[RequestPassed], 1},
		{"requests without a token", &m.events[RequestNoToken], 1},
		{"requests with an invalid token", &m.events[RequestInvalidToken], 1},
		{"requests refused", &m.events[RequestRefused], 0},
		{"IdP token requests", &m.idp[IdPToken][IdPOK], 1},
		{"IdP discovery requests", &m.idp[IdPDiscovery][IdPOK], 1},
	} {
		if got := c.got.Load(); got != c.want {
			t.Errorf("%s: %d, want %d", c.name, got, c.want)
		}
	}
	if n := m.idp[IdPJWKS][IdPOK].Load(); n == 0 {
		t.Error("the ID token's keys were fetched without being timed")
	}
}

// TestMetricsCountAReusedRefreshToken: reusing a rotated refresh token after the grace
// window revokes its family and is counted as reuse, not as a refresh.
func TestMetricsCountAReusedRefreshToken(t *testing.T) {
	m := new(recordingMetrics)
	e := newTokenEnv(t, testenv.SharedOP(t), func(c *Config) { c.Metrics = m })
	first := e.login(t)
	e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantTokens(t)
	e.clock.Advance(e.b.cfg.RefreshGrace + time.Second)
	e.refresh(t, testenv.NativeClientID, first.RefreshToken, nil).wantError(t, http.StatusBadRequest, "invalid_grant")
	if got := m.events[TokenReuseDetected].Load(); got != 1 {
		t.Errorf("reuse detected %d times, want 1", got)
	}
	if got := m.events[TokenRefreshed].Load(); got != 1 {
		t.Errorf("refreshed %d times, want 1", got)
	}
}

// TestRequestOutcomes names the outcome of each refusal at the MCP endpoint.
func TestRequestOutcomes(t *testing.T) {
	b := &Broker{metadataURL: "x"}
	b.offered.Store(&scopeOffer{challengeTail: `resource_metadata="x"`})
	for _, c := range []struct {
		name string
		err  *requestError
		want Event
	}{
		{"no token", b.errBearer("", "a bearer token is required"), RequestNoToken},
		{"invalid token", b.errBearer("invalid_token", "invalid"), RequestInvalidToken},
		{"insufficient scope", newRequestError(http.StatusForbidden, "insufficient_scope", ""), RequestInsufficientScope},
		{"framing", newRequestError(http.StatusUnsupportedMediaType, "invalid_request", ""), RequestRefused},
		{"token in the query", errInvalidRequest("access tokens are accepted only in the Authorization header"), RequestRefused},
		{"cold verification limit", errTooManyRequests(time.Second, ""), RequestRateLimited},
		{"IdP down", errIdPUnavailable(nil), RequestUnavailable},
		{"delegation failed", errServer(http.StatusBadGateway, "", nil), RequestFailed},
	} {
		if got := requestOutcome(c.err); got != c.want {
			t.Errorf("%s: outcome %d, want %d", c.name, got, c.want)
		}
	}
	if !strings.Contains(b.errBearer("invalid_token", "x").challenge, "error=") {
		t.Error("errBearer changed: requestOutcome reads error= in the challenge")
	}
}

// TestMetricsCountAnOfflineAccessLogin: the offline access login is counted apart from
// the hybrid one, and so is a background token.
func TestMetricsCountAnOfflineAccessLogin(t *testing.T) {
	o := testenv.StartOP(t)
	m := new(recordingMetrics)
	f := startOfflineAccess(t, o, func(c *Config) { c.Metrics = m })
	f.grantOfflineAccess(t, f.userToken(t, o.User))
	resp := f.backgroundRequest(t, basicCredentials(testWorkerID, testWorkerSecret), url.Values{"subject": {o.User.Subject}})
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("background token: %s", resp.Status)
	}
	for _, c := range []struct {
		name string
		got  *atomic.Int64
		want int64
	}{
		{"offline access logins started", &m.logins[LoginOfflineAccess][LoginStarted], 1},
		{"offline access logins completed", &m.logins[LoginOfflineAccess][LoginCompleted], 1},
		{"hybrid logins started", &m.logins[LoginHybrid][LoginStarted], 0},
		{"background tokens", &m.events[BackgroundTokenIssued], 1},
	} {
		if got := c.got.Load(); got != c.want {
			t.Errorf("%s: %d, want %d", c.name, got, c.want)
		}
	}
}

// TestMetricsCountDelegations: a cold delegation is a miss and an exchange, a warm one a
// hit that reaches no IdP.
func TestMetricsCountDelegations(t *testing.T) {
	o := testenv.StartOP(t)
	m := new(recordingMetrics)
	b := newTestBroker(t, o, delegating(ModeHybrid, "", func(c *Config) { c.Metrics = m }))
	who, _ := hybridPrincipal(t, b, o, o.User)
	for range 2 {
		if w, _, ok := delegate(t.Context(), b, who, "broker-token", []string{"notes:read"}); !ok {
			t.Fatalf("delegation refused: %d %s", w.Code, w.Body.String())
		}
	}
	for _, c := range []struct {
		name string
		got  *atomic.Int64
		want int64
	}{
		{"misses", &m.events[DelegationCacheMiss], 1},
		{"exchanges", &m.events[DelegationExchanged], 1},
		{"hits", &m.events[DelegationCacheHit], 1},
		{"failures", &m.events[DelegationFailed], 0},
	} {
		if got := c.got.Load(); got != c.want {
			t.Errorf("delegation %s: %d, want %d", c.name, got, c.want)
		}
	}
	if m.idp[IdPToken][IdPOK].Load() == 0 {
		t.Error("the token exchange at the IdP was not timed")
	}
}

// TestLoginOutcomeLabels: every outcome has a step; every failure a reason; no two failures
// share a (step, reason) pair, so each failure is its own series.
func TestLoginOutcomeLabels(t *testing.T) {
	seen := map[[2]string]LoginOutcome{}
	for o := range NumLoginOutcomes {
		if o.Step() == "" {
			t.Errorf("outcome %d has no step", o)
		}
		if o.Failed() != (o.Reason() != "") {
			t.Errorf("outcome %d (%s): failed %v with reason %q", o, o.Step(), o.Failed(), o.Reason())
		}
		pair := [2]string{o.Step(), o.Reason()}
		if prev, dup := seen[pair]; dup {
			t.Errorf("outcomes %d and %d share step %q and reason %q", prev, o, pair[0], pair[1])
		}
		seen[pair] = o
	}
}
