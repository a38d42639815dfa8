package flows

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-mcp/oauth-broker/idp"
	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/mcprequest"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// writerBroker is a Broker with only what the error writer uses, logging to logs.
func writerBroker() (*Broker, *observer.ObservedLogs) {
	core, logs := observer.New(zap.DebugLevel)
	l := zap.New(core)
	return &Broker{logger: l, log: newLoggers(l), issuer: "https://broker.example"}, logs
}

// errSecretCause is a cause no answer may carry: paths and texts of the broker's insides.
var errSecretCause = errors.New("open /var/lib/caddy/x: input/output error")

func TestWriteErrorJSON(t *testing.T) {
	for _, tc := range []struct {
		name                     string
		err                      error
		status                   int
		code, description        string
		retryAfter, allow, chall string
		level                    zapcore.Level
	}{
		{"a client's mistake is a 400 logged at debug", errInvalidRequest("grant_type is required"),
			http.StatusBadRequest, "invalid_request", "grant_type is required", "", "", "", zapcore.DebugLevel},
		{"a wrong method names the methods allowed", errMethodNotAllowed("POST, OPTIONS"),
			http.StatusMethodNotAllowed, "invalid_request", "method not allowed", "", "POST, OPTIONS", "", zapcore.DebugLevel},
		{"a rate limit says when to retry, rounded up", errTooManyRequests(1500*time.Millisecond, "too many requests from this address; retry later"),
			http.StatusTooManyRequests, "temporarily_unavailable", "too many requests from this address; retry later", "2", "", "", zapcore.DebugLevel},
		{"a storage failure is a 503 with Retry-After, logged at error", errStorage("reading refresh token", errSecretCause),
			http.StatusServiceUnavailable, "temporarily_unavailable", "the broker cannot complete this request now; try again shortly", "5", "", "", zapcore.ErrorLevel},
		{"an IdP failure is a 503 with Retry-After, logged at error", errIdPUnavailable(fmt.Errorf("%w: %w", idp.ErrUnavailable, errSecretCause)),
			http.StatusServiceUnavailable, "temporarily_unavailable", "the identity provider cannot be reached; try again shortly", "5", "", "", zapcore.ErrorLevel},
		{"an MCP request refused for its method names the methods allowed", errRefusal(mcprequest.ErrMethod),
			http.StatusMethodNotAllowed, "invalid_request", "method not allowed", "", "GET, HEAD, POST, DELETE, OPTIONS", "", zapcore.DebugLevel},
		{"invalid_client carries its Basic challenge",
			func() error {
				e := newRequestError(http.StatusUnauthorized, "invalid_client", "client authentication failed").because(errSecretCause)
				e.challenge = `Basic realm="https://broker.example"`
				return e
			}(),
			http.StatusUnauthorized, "invalid_client", "client authentication failed", "", "", `Basic realm="https://broker.example"`, zapcore.DebugLevel},
		{"any other error is a 500 server_error without its text", errSecretCause,
			http.StatusInternalServerError, "server_error", "the request could not be completed", "", "", "", zapcore.ErrorLevel},
		{"a wrapped requestError is found", fmt.Errorf("serving: %w", errInvalidGrant("the refresh token is invalid, expired or revoked")),
			http.StatusBadRequest, "invalid_grant", "the refresh token is invalid, expired or revoked", "", "", "", zapcore.DebugLevel},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, logs := writerBroker()
			w := httptest.NewRecorder()
			b.writeError(w, httptest.NewRequest(http.MethodPost, "/oauth/token", nil), tc.err)

			if w.Code != tc.status {
				t.Errorf("status %d, want %d", w.Code, tc.status)
			}
			h := w.Header()
			for k, want := range map[string]string{
				"Content-Type": "application/json", "Cache-Control": "no-store", "Pragma": "no-cache",
				"Retry-After": tc.retryAfter, "Allow": tc.allow, "WWW-Authenticate": tc.chall, "Location": "",
			} {
				if got := h.Get(k); got != want {
					t.Errorf("%s: %q, want %q", k, got, want)
				}
			}
			var body map[string]string
			if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil {
				t.Fatalf("body %q: %v", w.Body, err)
			}
			if want := map[string]string{"error": tc.code, "error_description": tc.description}; fmt.Sprint(body) != fmt.Sprint(want) {
				t.Errorf("body %v, want %v", body, want)
			}
			if strings.Contains(w.Body.String(), "input/output") || strings.Contains(w.Body.String(), "/var/lib") {
				t.Errorf("the cause reached the client: %s", w.Body)
			}
			entries := logs.All()
			if len(entries) != 1 {
				t.Fatalf("%d log entries, want 1: %v", len(entries), entries)
			}
			if entries[0].Level != tc.level {
				t.Errorf("logged at %v, want %v", entries[0].Level, tc.level)
			}
			if errors.Is(tc.err, errSecretCause) && !strings.Contains(fmt.Sprint(entries[0].ContextMap()), errSecretCause.Error()) {
				t.Errorf("the cause is not in the log: %v", entries[0].ContextMap())
			}
		})
	}
}

func TestWriteErrorRedirect(t *testing.T) {
	const redirectURI = "http://127.0.0.1:8765/cb?keep=1"

	t.Run("to a trusted redirect URI, with state and iss", func(t *testing.T) {
		b, logs := writerBroker()
		w := httptest.NewRecorder()
		err := errServer(http.StatusInternalServerError, "the request could not be stored", errSecretCause).to(redirectURI, "xyz", false)
		b.writeError(w, httptest.NewRequest(http.MethodGet, "/oauth/authorize", nil), err)

		if w.Code != http.StatusFound || w.Header().Get("Cache-Control") != "no-store" {
			t.Fatalf("%d, Cache-Control %q", w.Code, w.Header().Get("Cache-Control"))
		}
		loc, perr := url.Parse(w.Header().Get("Location"))
		if perr != nil || !strings.HasPrefix(loc.String(), "http://127.0.0.1:8765/cb?") {
			t.Fatalf("Location %q", w.Header().Get("Location"))
		}
		q := loc.Query()
		want := url.Values{"keep": {"1"}, "error": {"server_error"}, "error_description": {"the request could not be stored"},
			"state": {"xyz"}, "iss": {"https://broker.example"}}
		if q.Encode() != want.Encode() {
			t.Errorf("query %v, want %v", q, want)
		}
		if strings.Contains(loc.String(), "input") || w.Header().Get("Content-Type") == "application/json" {
			t.Errorf("the cause, or a JSON body, reached the client: %s", loc)
		}
		if n := logs.Len(); n != 1 {
			t.Errorf("%d log entries, want 1", n)
		}
	})

	t.Run("without the error's headers", func(t *testing.T) {
		b, _ := writerBroker()
		w := httptest.NewRecorder()
		b.writeError(w, httptest.NewRequest(http.MethodGet, "/oauth/authorize", nil), errIdPUnavailable(errSecretCause).to(redirectURI, "s", false))
		if w.Code != http.StatusFound || w.Header().Get("Retry-After") != "" {
			t.Errorf("%d, Retry-After %q", w.Code, w.Header().Get("Retry-After"))
		}
	})

	t.Run("without state when there is none", func(t *testing.T) {
		b, _ := writerBroker()
		w := httptest.NewRecorder()
		b.writeError(w, httptest.NewRequest(http.MethodGet, "/oauth/authorize", nil), errInvalidRequest("state is too long").to(redirectURI, "", false))
		loc, _ := url.Parse(w.Header().Get("Location"))
		if w.Code != http.StatusFound || loc.Query().Has("state") || loc.Query().Get("error") != "invalid_request" {
			t.Errorf("%d to %s", w.Code, loc)
		}
	})

	t.Run("to a URI anyone could register, as a page with a link", func(t *testing.T) {
		b, logs := writerBroker()
		w := httptest.NewRecorder()
		err := errInvalidScope("a requested scope is not allowed for this client").to("https://app.example/cb", "s1", true)
		b.writeError(w, httptest.NewRequest(http.MethodGet, "/oauth/authorize", nil), err)
		if w.Code != http.StatusBadRequest || w.Header().Get("Location") != "" || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") {
			t.Fatalf("%d, Location %q, Content-Type %q", w.Code, w.Header().Get("Location"), w.Header().Get("Content-Type"))
		}
		page := w.Body.String()
		for _, want := range []string{"app.example", "invalid_scope", "error=invalid_scope", "state=s1", "iss=https%3A%2F%2Fbroker.example"} {
			if !strings.Contains(page, want) {
				t.Errorf("the page lacks %q: %s", want, page)
			}
		}
		if n := logs.Len(); n != 1 {
			t.Errorf("%d log entries, want 1", n)
		}
	})
}

func TestWriteErrorPage(t *testing.T) {
	b, logs := writerBroker()
	w := httptest.NewRecorder()
	err := errConsentPage(http.StatusTooManyRequests, "Too many logins from your network right now.")
	err.retryAfter = 30 * time.Second
	b.writeError(w, httptest.NewRequest(http.MethodGet, "/oauth/callback", nil), err)
	if w.Code != http.StatusTooManyRequests || w.Header().Get("Retry-After") != "30" ||
		!strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") || !strings.Contains(w.Body.String(), "Too many logins") {
		t.Errorf("%d, Retry-After %q, %s", w.Code, w.Header().Get("Retry-After"), w.Body)
	}
	if n := logs.Len(); n != 1 {
		t.Errorf("%d log entries, want 1", n)
	}
}

// A storage failure is the broker's own: it is answered 503 like an IdP outage, but the
// error and the log say storage, never the identity provider.
func TestStorageFailureIsNotAnIdPFailure(t *testing.T) {
	// The fake fails storage alone: the IdP stays up all along.
	down := &failingStorage{Storage: &certmagic.FileStorage{Path: t.TempDir()}, text: "fake storage outage"}
	e := newTokenEnv(t, testenv.SharedOP(t), func(c *Config) {
		ring, err := storage.NewKeyRing(bytes.Repeat([]byte{9}, storage.KeySize))
		if err != nil {
			t.Fatal(err)
		}
		c.Records = storage.New(down, ring)
	})
	tok := e.login(t)
	down.fail.Store(true)

	_, _, err := e.b.checkAccessToken(t.Context(), tok.AccessToken, e.b.now())
	if !errors.Is(err, ErrStorageUnavailable) || errors.Is(err, idp.ErrUnavailable) || errors.Is(err, idp.ErrInvalidToken) {
		t.Errorf("checkAccessToken = %v, want ErrStorageUnavailable alone", err)
	}

	h := bearer(tok.AccessToken)
	h.Set("Content-Type", "application/json")
	e.logs.TakeAll()
	resp := do(t, http.MethodPost, e.front.URL+"/mcp", h, `{"jsonrpc":"2.0","id":1,"method":"ping"}`)
	body, _ := io.ReadAll(resp.Body)
	var oe oauthError
	_ = json.Unmarshal(body, &oe)
	if resp.StatusCode != http.StatusServiceUnavailable || oe.Error != "temporarily_unavailable" || resp.Header.Get("Retry-After") != "5" {
		t.Fatalf("%s, Retry-After %q: %s", resp.Status, resp.Header.Get("Retry-After"), body)
	}
	if strings.Contains(oe.Description, "identity provider") {
		t.Errorf("a storage failure is reported to the client as the IdP's: %q", oe.Description)
	}
	failed := e.logs.FilterMessage("request failed").FilterField(zap.String("failed", "storage")).All()
	if len(failed) != 1 {
		t.Fatalf("%d request failures logged as storage, want 1; log: %v", len(failed), e.logs.All())
	}
	if failed[0].Level != zapcore.ErrorLevel || !strings.Contains(fmt.Sprint(failed[0].ContextMap()), down.text) {
		t.Errorf("logged at %v without the cause: %v", failed[0].Level, failed[0].ContextMap())
	}
	if n := e.logs.FilterField(zap.String("failed", "identity provider")).Len(); n != 0 {
		t.Errorf("the storage failure was logged as the identity provider's %d times", n)
	}
}
