package flows

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// newRegistrationBroker is a hybrid-mode test broker with registration on, after change.
func newRegistrationBroker(t *testing.T, change func(*Config)) *Broker {
	t.Helper()
	return newTestBroker(t, testenv.SharedOP(t), func(c *Config) {
		c.Mode = ModeHybrid
		c.Registration = true
		if change != nil {
			change(c)
		}
	})
}

// newRegistrationClock is a clock standing still at a fixed date, for b.now and storage
// expiry.
func newRegistrationClock() *testenv.Clock {
	return &testenv.Clock{Base: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

// registerRequest is a registration POST from ip (none: httptest's default peer).
func registerRequest(body, ip string) *http.Request {
	req := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/register", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if ip != "" {
		req = req.WithContext(WithClientIP(req.Context(), ip))
	}
	return req
}

// serve runs req through the broker like the Caddy module, which must answer it itself.
func answerOwn(t *testing.T, b *Broker, req *http.Request) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	if pass, _ := b.Handle(rec, req); pass != nil {
		t.Fatalf("%s %s was passed on instead of answered", req.Method, req.URL.Path)
	}
	return rec
}

// registerClient registers metadata and returns the client information.
func registerClient(t *testing.T, b *Broker, metadata string) clientInformation {
	t.Helper()
	rec := answerOwn(t, b, registerRequest(metadata, ""))
	if rec.Code != http.StatusCreated {
		t.Fatalf("registration: %d %s", rec.Code, rec.Body)
	}
	var info clientInformation
	if err := json.Unmarshal(rec.Body.Bytes(), &info); err != nil {
		t.Fatal(err)
	}
	return info
}

func wantRegistrationError(t *testing.T, rec *httptest.ResponseRecorder, status int, code string) {
	t.Helper()
	var e oauthError
	if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil {
		t.Fatalf("%d: body is not OAuth JSON: %q", rec.Code, rec.Body)
	}
	if rec.Code != status || e.Error != code {
		t.Fatalf("got %d %q (%s), want %d %q", rec.Code, e.Error, e.Description, status, code)
	}
	if rec.Header().Get("Cache-Control") != "no-store" {
		t.Errorf("Cache-Control %q, want no-store", rec.Header().Get("Cache-Control"))
	}
}

func TestRegisterClient(t *testing.T) {
	b := newRegistrationBroker(t, nil)
	clock := newRegistrationClock()
	b.now = clock.Now

	for _, tc := range []struct {
		name       string
		metadata   string
		wantMethod string
		wantSecret bool
		wantEcho   clientMetadata
	}{
		{
			name:       "public client as MCP clients register",
			metadata:   `{"client_name":"Claude <script>","redirect_uris":["http://127.0.0.1:33418/callback","https://claude.ai/api/mcp/auth_callback"],"token_endpoint_auth_method":"none","grant_types":["authorization_code","refresh_token"],"response_types":["code"],"scope":"openid notes:read","logo_uri":"https://x.example/l.png"}`,
			wantMethod: AuthMethodNone,
			wantEcho: clientMetadata{
				RedirectURIs:            []string{"http://127.0.0.1:33418/callback", "https://claude.ai/api/mcp/auth_callback"},
				TokenEndpointAuthMethod: AuthMethodNone,
				GrantTypes:              []string{"authorization_code", "refresh_token"},
				ResponseTypes:           []string{"code"},
				ClientName:              "Claude <script>",
				Scope:                   "openid notes:read",
			},
		},
		{
			name:       "defaults: confidential basic, code and refresh grants",
			metadata:   `{"redirect_uris":["https://app.example.com/cb"]}`,
			wantMethod: AuthMethodBasic,
			wantSecret: true,
			wantEcho: clientMetadata{
				RedirectURIs:            []string{"https://app.example.com/cb"},
				TokenEndpointAuthMethod: AuthMethodBasic,
				GrantTypes:              []string{"authorization_code", "refresh_token"},
				ResponseTypes:           []string{"code"},
			},
		},
		{
			name:       "confidential post client with offline_access, configured though not advertised",
			metadata:   `{"redirect_uris":["https://app.example.com/cb"],"token_endpoint_auth_method":"client_secret_post","grant_types":["authorization_code"],"scope":"  notes:write   offline_access "}`,
			wantMethod: AuthMethodPost,
			wantSecret: true,
			wantEcho: clientMetadata{
				RedirectURIs:            []string{"https://app.example.com/cb"},
				TokenEndpointAuthMethod: AuthMethodPost,
				GrantTypes:              []string{"authorization_code"},
				ResponseTypes:           []string{"code"},
				Scope:                   "notes:write offline_access",
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := registerRequest(tc.metadata, "")
			req.Header.Set("Content-Type", "application/json; charset=utf-8")
			req.Header.Set("Origin", "https://inspector.example")
			rec := answerOwn(t, b, req)
			if rec.Code != http.StatusCreated {
				t.Fatalf("status %d %s", rec.Code, rec.Body)
			}
			h := rec.Header()
			if h.Get("Cache-Control") != "no-store" || h.Get("Access-Control-Allow-Origin") != "*" || h.Get("Access-Control-Allow-Credentials") != "" {
				t.Errorf("headers %v", h)
			}
			var raw map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &raw); err != nil {
				t.Fatal(err)
			}
			var info clientInformation
			_ = json.Unmarshal(rec.Body.Bytes(), &info)

			if info.ClientID == "" || info.ClientIDIssuedAt != clock.Now().Unix() {
				t.Errorf("client_id %q issued at %d", info.ClientID, info.ClientIDIssuedAt)
			}
			if _, has := raw["logo_uri"]; has {
				t.Error("unknown metadata echoed")
			}
			_, hasExpiry := raw["client_secret_expires_at"]
			if (info.ClientSecret != "") != tc.wantSecret || hasExpiry != tc.wantSecret {
				t.Fatalf("secret issued %v, expiry present %v; want %v", info.ClientSecret != "", hasExpiry, tc.wantSecret)
			}
			if tc.wantSecret && raw["client_secret_expires_at"] != float64(0) {
				t.Errorf("client_secret_expires_at %v, want 0", raw["client_secret_expires_at"])
			}
			gotEcho, _ := json.Marshal(info.clientMetadata)
			wantEcho, _ := json.Marshal(tc.wantEcho)
			if !bytes.Equal(gotEcho, wantEcho) {
				t.Errorf("echo\n got %s\nwant %s", gotEcho, wantEcho)
			}

			var stored RegisteredClient
			if err := b.cfg.Records.Get(t.Context(), recordKey(kindClient, info.ClientID), &stored); err != nil {
				t.Fatal(err)
			}
			if tc.wantSecret && (stored.ClientSecretHash != storage.Hash(info.ClientSecret) || strings.Contains(fmt.Sprint(stored), info.ClientSecret)) {
				t.Error("the stored record is not the secret's hash alone")
			}

			c, err := b.findClient(t.Context(), info.ClientID)
			if err != nil {
				t.Fatal(err)
			}
			if c.Source != ClientSourceRegistered || c.AuthMethod != tc.wantMethod ||
				strings.Join(c.RedirectURIs, " ") != strings.Join(tc.wantEcho.RedirectURIs, " ") ||
				strings.Join(c.GrantTypes, " ") != strings.Join(tc.wantEcho.GrantTypes, " ") {
				t.Errorf("found %+v", c)
			}
			if tc.wantEcho.ClientName != "" && c.Name != tc.wantEcho.ClientName {
				t.Errorf("name %q", c.Name)
			}
			if tc.wantEcho.Scope == "" && strings.Join(c.Scopes, " ") != strings.Join(b.cfg.Scopes, " ") {
				t.Errorf("scopes %v, want the configured ones", c.Scopes)
			}
		})
	}
}

func TestRegisterRefusals(t *testing.T) {
	b := newRegistrationBroker(t, func(c *Config) { c.RegistrationRate = 1000 })

	uris := func(u string) string { return `{"redirect_uris":["` + u + `"],"token_endpoint_auth_method":"none"}` }
	good := func(extra string) string {
		return `{"redirect_uris":["https://app.example.com/cb"],` + extra + `}`
	}
	for _, tc := range []struct {
		name        string
		body        string
		contentType string
		status      int
		code        string
	}{
		{"userinfo before host is refused (W1)", uris("http://localhost:@evil.com/cb"), "", 400, "invalid_redirect_uri"},
		{"userinfo is refused", uris("https://user@app.example.com/cb"), "", 400, "invalid_redirect_uri"},
		{"http on a public host is refused", uris("http://app.example.com/cb"), "", 400, "invalid_redirect_uri"},
		{"loopback look-alike host is refused", uris("http://127.0.0.1.evil.com/cb"), "", 400, "invalid_redirect_uri"},
		{"localhost with an empty port is refused", uris("http://localhost:/cb"), "", 400, "invalid_redirect_uri"},
		{"localhost with a named port is refused", uris("http://localhost:abc/cb"), "", 400, "invalid_redirect_uri"},
		{"fragment is refused", uris("https://app.example.com/cb#x"), "", 400, "invalid_redirect_uri"},
		{"javascript scheme is refused", uris("javascript:alert(1)"), "", 400, "invalid_redirect_uri"},
		{"relative URI is refused", uris("/cb"), "", 400, "invalid_redirect_uri"},
		{"one bad URI among good ones is refused", `{"redirect_uris":["https://app.example.com/cb","http://evil.com/cb"]}`, "", 400, "invalid_redirect_uri"},
		{"missing redirect_uris is refused", `{"client_name":"x"}`, "", 400, "invalid_redirect_uri"},
		{"empty redirect_uris is refused", `{"redirect_uris":[]}`, "", 400, "invalid_redirect_uri"},
		{"implicit grant is refused", good(`"grant_types":["implicit"]`), "", 400, "invalid_client_metadata"},
		{"client_credentials grant is refused", good(`"grant_types":["authorization_code","client_credentials"]`), "", 400, "invalid_client_metadata"},
		{"refresh_token without authorization_code is refused", good(`"grant_types":["refresh_token"]`), "", 400, "invalid_client_metadata"},
		{"token response type is refused", good(`"response_types":["code","token"]`), "", 400, "invalid_client_metadata"},
		{"private_key_jwt is refused", good(`"token_endpoint_auth_method":"private_key_jwt"`), "", 400, "invalid_client_metadata"},
		{"unknown scope is refused", good(`"scope":"openid admin"`), "", 400, "invalid_client_metadata"},
		{"overlong client_name is refused", good(`"client_name":"` + strings.Repeat("é", 201) + `"`), "", 400, "invalid_client_metadata"},
		{"redirect_uris as a string is refused", `{"redirect_uris":"https://app.example.com/cb"}`, "", 400, "invalid_client_metadata"},
		{"not JSON is refused", `redirect_uris=https://app.example.com/cb`, "", 400, "invalid_client_metadata"},
		{"a JSON array is refused", `[{"redirect_uris":["https://app.example.com/cb"]}]`, "", 400, "invalid_client_metadata"},
		{"data after the object is refused", good(`"client_name":"a"`) + `{}`, "", 400, "invalid_client_metadata"},
		{"empty body is refused", ``, "", 400, "invalid_client_metadata"},
		{"a body over 64 KiB is refused", good(`"client_name":"` + strings.Repeat("a", 65<<10) + `"`), "", 413, "invalid_client_metadata"},
		{"form content type is refused", good(``), "application/x-www-form-urlencoded", 415, "invalid_client_metadata"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := registerRequest(tc.body, "")
			if tc.contentType != "" {
				req.Header.Set("Content-Type", tc.contentType)
			}
			rec := answerOwn(t, b, req)
			wantRegistrationError(t, rec, tc.status, tc.code)
			if strings.Contains(rec.Body.String(), "evil") {
				t.Error("the error echoes client input")
			}
		})
	}

	t.Run("GET is not allowed", func(t *testing.T) {
		req := httptest.NewRequest(http.MethodGet, "https://mcp.example.test/oauth/register", nil)
		rec := answerOwn(t, b, req)
		wantRegistrationError(t, rec, http.StatusMethodNotAllowed, "invalid_request")
		if rec.Header().Get("Allow") != "POST, OPTIONS" {
			t.Errorf("Allow %q", rec.Header().Get("Allow"))
		}
	})
	t.Run("nothing was stored", func(t *testing.T) {
		keys, err := b.cfg.Records.List(t.Context(), storage.Key(kindClient))
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) != 0 {
			t.Errorf("%d clients stored", len(keys))
		}
	})
}

func TestRegisterPreflightAndDisabled(t *testing.T) {
	for _, enabled := range []bool{true, false} {
		b := newRegistrationBroker(t, func(c *Config) { c.Registration = enabled })
		req := httptest.NewRequest(http.MethodOptions, "https://mcp.example.test/oauth/register", nil)
		req.Header.Set("Origin", "https://inspector.example")
		req.Header.Set("Access-Control-Request-Method", "POST")
		rec := answerOwn(t, b, req)
		h := rec.Header()
		if rec.Code != http.StatusNoContent || h.Get("Access-Control-Allow-Origin") != "*" ||
			!strings.Contains(h.Get("Access-Control-Allow-Methods"), "POST") ||
			!strings.Contains(h.Get("Access-Control-Allow-Headers"), "Content-Type") ||
			h.Get("Access-Control-Allow-Credentials") != "" {
			t.Errorf("preflight (registration %v): %d %v", enabled, rec.Code, h)
		}
	}

	t.Run("registration off is 403 access_denied", func(t *testing.T) {
		b := newRegistrationBroker(t, func(c *Config) { c.Registration = false })
		rec := answerOwn(t, b, registerRequest(`{"redirect_uris":["https://app.example.com/cb"]}`, ""))
		wantRegistrationError(t, rec, http.StatusForbidden, "access_denied")
		if rec.Header().Get("Access-Control-Allow-Origin") != "*" {
			t.Error("a browser client cannot read the refusal")
		}
	})
}

func TestRegisterRateLimitPerClientIP(t *testing.T) {
	b := newRegistrationBroker(t, func(c *Config) { c.RegistrationRate = 3 })
	clock := newRegistrationClock()
	b.now = clock.Now
	body := `{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`
	reg := func(ip string) *httptest.ResponseRecorder { return answerOwn(t, b, registerRequest(body, ip)) }

	for i := range 3 {
		if rec := reg("203.0.113.7"); rec.Code != http.StatusCreated {
			t.Fatalf("registration %d: %d", i+1, rec.Code)
		}
	}
	rec := reg("203.0.113.7")
	wantRegistrationError(t, rec, http.StatusTooManyRequests, "temporarily_unavailable")
	if got := rec.Header().Get("Retry-After"); got != "20" { // one token per 60/3 s
		t.Errorf("Retry-After %q, want 20", got)
	}

	if rec := reg("198.51.100.9"); rec.Code != http.StatusCreated {
		t.Errorf("another address is limited too: %d", rec.Code)
	}
	// Without WithClientIP the peer address counts: httptest's 192.0.2.1.
	if rec := reg(""); rec.Code != http.StatusCreated {
		t.Errorf("peer address: %d", rec.Code)
	}

	clock.Advance(19 * time.Second)
	if rec := reg("203.0.113.7"); rec.Code != http.StatusTooManyRequests || rec.Header().Get("Retry-After") != "1" {
		t.Errorf("after 19 s: %d, Retry-After %q", rec.Code, rec.Header().Get("Retry-After"))
	}
	clock.Advance(time.Second)
	if rec := reg("203.0.113.7"); rec.Code != http.StatusCreated {
		t.Errorf("after 20 s: %d", rec.Code)
	}

	t.Run("an IPv6 /56 is one client", func(t *testing.T) {
		for i := range 3 {
			reg("2001:db8:1:2::" + string(rune('a'+i)))
		}
		if rec := reg("2001:db8:1:ff:ffff::1"); rec.Code != http.StatusTooManyRequests {
			t.Errorf("same /56: %d", rec.Code)
		}
		if rec := reg("2001:db8:1:100::1"); rec.Code != http.StatusCreated {
			t.Errorf("next /56: %d", rec.Code)
		}
	})
}

// A registration is in storage: a second broker over the same storage, as after a
// restart or on another instance of a cluster, knows the client and its secret.
func TestRegisteredClientSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	records := func() *storage.Records {
		ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
		if err != nil {
			t.Fatal(err)
		}
		return storage.New(&certmagic.FileStorage{Path: dir}, ring)
	}
	first := newRegistrationBroker(t, func(c *Config) { c.Records = records() })
	info := registerClient(t, first, `{"redirect_uris":["https://app.example.com/cb"],"client_name":"Restart"}`)

	second := newRegistrationBroker(t, func(c *Config) { c.Records = records() })
	req := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/token", nil)
	req.SetBasicAuth(info.ClientID, info.ClientSecret)
	c, err := second.authenticateClient(req, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Name != "Restart" || c.RedirectURIs[0] != "https://app.example.com/cb" {
		t.Errorf("found %+v", c)
	}
}
