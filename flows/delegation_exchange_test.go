package flows

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/internal/tokencache"
)

// tokenEndpointFault answers requests to the OP's token endpoint itself (a fault: an IdP
// gone wrong) and passes everything else to the real OP.
type tokenEndpointFault struct {
	path   string
	status int
	ctype  string
	body   string
}

func (f tokenEndpointFault) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Path != f.path {
		return http.DefaultTransport.RoundTrip(r)
	}
	if r.Body != nil {
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
	}
	return &http.Response{
		StatusCode: f.status,
		Status:     http.StatusText(f.status),
		Header:     http.Header{"Content-Type": {f.ctype}},
		Body:       io.NopCloser(strings.NewReader(f.body)),
		Request:    r,
	}, nil
}

func TestDelegationIdPAnswers(t *testing.T) {
	o := testenv.SharedOP(t)
	endpoint, err := url.Parse(o.TokenEndpoint)
	if err != nil {
		t.Fatal(err)
	}
	const js = "application/json"
	for _, tc := range []struct {
		name              string
		status            int
		ctype, body       string
		wantStatus        int
		wantError, wantWA string
	}{
		{"an answer that is not JSON is a 502", 200, "text/html", "<html>hello</html>", 502, "server_error", ""},
		{"an answer without access_token is a 502", 200, js, `{"token_type":"Bearer","expires_in":60}`, 502, "server_error", ""},
		{"a token type other than Bearer is a 502", 200, js, `{"access_token":"x","token_type":"mac","expires_in":60}`, 502, "server_error", ""},
		{"an issued token that is no access token is a 502", 200, js,
			`{"access_token":"x","token_type":"Bearer","issued_token_type":"urn:ietf:params:oauth:token-type:refresh_token"}`, 502, "server_error", ""},
		{"an answer over the bound is a 502", 200, js, `{"access_token":"` + strings.Repeat("a", 70<<10) + `","token_type":"Bearer"}`, 502, "server_error", ""},
		{"a 400 without JSON is a 502", 400, "text/plain", "bad", 502, "server_error", ""},
		{"a refused grant type is a 502", 400, js, `{"error":"unsupported_grant_type"}`, 502, "server_error", ""},
		{"a refused client is a 502", 401, js, `{"error":"invalid_client"}`, 502, "server_error", ""},
		{"a refused subject is a 401 challenge", 400, js, `{"error":"invalid_grant","error_description":"<script>"}`, 401, "invalid_token", `error="invalid_token"`},
		{"refused scopes are a 403 step-up", 400, js, `{"error":"invalid_scope"}`, 403, "insufficient_scope", `error="insufficient_scope"`},
		{"a refusal with status 200 is still a refusal", 200, js, `{"error":"invalid_grant"}`, 401, "invalid_token", `error="invalid_token"`},
		{"a server error is a 503", 500, "text/plain", "oops", 503, "temporarily_unavailable", ""},
		{"throttling is a 503", 429, js, `{"error":"slow_down"}`, 503, "temporarily_unavailable", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fault := tokenEndpointFault{path: endpoint.Path, status: tc.status, ctype: tc.ctype, body: tc.body}
			b := newTestBroker(t, o, delegating(ModeProgressive, DelegationTokenExchange, func(c *Config) {
				c.HTTPClient = &http.Client{Transport: fault, Timeout: 5 * time.Second}
			}))
			who, raw := progressivePrincipal(t, b, o, o.User)
			w, h, ok := delegate(context.Background(), b, who, raw, nil)
			if ok || h != "" {
				t.Fatalf("delegation passed with %q", h)
			}
			var e oauthError
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil {
				t.Fatalf("body %q: %v", w.Body.String(), err)
			}
			if w.Code != tc.wantStatus || e.Error != tc.wantError {
				t.Errorf("%d %+v, want %d %s", w.Code, e, tc.wantStatus, tc.wantError)
			}
			if !strings.Contains(w.Header().Get("WWW-Authenticate"), tc.wantWA) {
				t.Errorf("WWW-Authenticate %q", w.Header().Get("WWW-Authenticate"))
			}
			if tc.wantStatus == 503 && w.Header().Get("Retry-After") == "" {
				t.Error("no Retry-After")
			}
			if strings.Contains(w.Body.String(), "<script>") {
				t.Error("the IdP's description reached the client")
			}
		})
	}
	t.Run("expires_in given as a string is understood", func(t *testing.T) {
		fault := tokenEndpointFault{path: endpoint.Path, status: 200, ctype: js,
			body: `{"access_token":"delegated","token_type":"bearer","expires_in":"120","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}`}
		b := newTestBroker(t, o, delegating(ModeProgressive, DelegationTokenExchange, func(c *Config) {
			c.HTTPClient = &http.Client{Transport: fault}
		}))
		now := time.Now()
		b.now = func() time.Time { return now }
		who, raw := progressivePrincipal(t, b, o, o.User)
		if tok := mustDelegate(t, b, who, raw, nil); tok != "delegated" {
			t.Fatalf("token %q", tok)
		}
		key := tokenDelegationKey(tokencache.Key(raw), sortedSet(nil, who.Scopes)) // the whole grant: no tool_scope rule
		// 120 s less the margin: a tenth of the lifetime, 12 s.
		if _, ok := b.delegation.cache.get(key, now.Add(107*time.Second).UnixNano()); !ok {
			t.Error("not served before the margin")
		}
		if _, ok := b.delegation.cache.get(key, now.Add(109*time.Second).UnixNano()); ok {
			t.Error("served within the margin before expiry")
		}
	})
}

func TestDelegationIdPDownOrSlow(t *testing.T) {
	o := testenv.StartOP(t)
	up := delegationUpstream(t, o)
	b := newTestBroker(t, o, delegating(ModeProgressive, DelegationTokenExchange, func(c *Config) { c.IdPTimeout = 300 * time.Millisecond }))
	front := startFront(t, b, up.URL)
	who, raw := progressivePrincipal(t, b, o, o.User) // discovery and keys fetched
	unavailable := func(t *testing.T, need []string) {
		t.Helper()
		w, h, ok := delegate(context.Background(), b, who, raw, need)
		var e oauthError
		_ = json.Unmarshal(w.Body.Bytes(), &e)
		if ok || h != "" || w.Code != http.StatusServiceUnavailable || e.Error != "temporarily_unavailable" || w.Header().Get("Retry-After") == "" {
			t.Errorf("%d %+v Retry-After %q", w.Code, e, w.Header().Get("Retry-After"))
		}
	}

	t.Run("down: 503 with Retry-After, then recovery without restart", func(t *testing.T) {
		o.SetDown(true)
		unavailable(t, []string{"notes:read"})
		resp := do(t, http.MethodPost, front.URL+"/mcp", bearer(raw), `{"jsonrpc":"2.0","id":1,"method":"initialize"}`)
		if resp.StatusCode != http.StatusServiceUnavailable || len(up.Seen()) != 0 {
			t.Errorf("through the front: %s, upstream saw %d", resp.Status, len(up.Seen()))
		}
		o.SetDown(false)
		mustDelegate(t, b, who, raw, []string{"notes:read"})
	})
	t.Run("slow beyond the IdP timeout: 503", func(t *testing.T) {
		o.SetLatency(2 * time.Second)
		defer o.SetLatency(0)
		start := time.Now()
		unavailable(t, []string{"notes:write"})
		if d := time.Since(start); d > time.Second {
			t.Errorf("answered after %s", d)
		}
	})
}
