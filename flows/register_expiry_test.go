package flows

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// A registration nobody logs in with is gone after a day, whatever strangers do with it
// at /oauth/authorize; a code redemption or a refresh gives it a whole lifetime again,
// writing its record at most once an hour (SECURITY.md: strangers filling storage).
func TestRegistrationExpiresUnlessUsed(t *testing.T) {
	const day = 24 * time.Hour
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		t.Fatal(err)
	}
	storeClock := &testenv.Clock{Base: time.Now()}
	e := newTokenEnv(t, testenv.SharedOP(t), func(c *Config) {
		c.Registration = true
		c.Records = storage.New(&certmagic.FileStorage{Path: t.TempDir()}, ring, storage.WithClock(storeClock.Now))
		c.SessionTTL, c.RefreshTokenTTL = 20*day, 20*day
	})
	advance := func(d time.Duration) { storeClock.Advance(d); e.clock.Advance(d) }
	register := func() string {
		t.Helper()
		rec := answerOwn(t, e.b, registerRequest(`{"redirect_uris":["`+tokenTestRedirect+`"],"token_endpoint_auth_method":"none"}`, ""))
		if rec.Code != http.StatusCreated {
			t.Fatalf("registration: %d %s", rec.Code, rec.Body)
		}
		var info clientInformation
		if err := json.Unmarshal(rec.Body.Bytes(), &info); err != nil {
			t.Fatal(err)
		}
		return info.ClientID
	}
	known := func(id string) bool {
		t.Helper()
		_, err := e.b.findClient(t.Context(), id)
		if err != nil && !errors.Is(err, ErrUnknownClient) {
			t.Fatal(err)
		}
		return err == nil
	}
	renewedAt := func(id string) time.Time {
		t.Helper()
		var rec RegisteredClient
		if err := e.b.cfg.Records.Get(t.Context(), recordKey(kindClient, id), &rec); err != nil {
			t.Fatal(err)
		}
		return rec.RenewedAt
	}

	unused, used := register(), register()
	code, verifier := e.codeFor(t, e.session(t, used), used, testResource)
	tokens := e.exchange(t, used, code, verifier, nil).wantTokens(t)
	loginAt := e.clock.Now()
	if got := renewedAt(used); !got.Equal(loginAt) {
		t.Errorf("a code redemption left renewed_at %v, want %v", got, loginAt)
	}

	advance(23 * time.Hour)
	q := hybridAuthorizeQuery(unused, tokenTestRedirect, oauth2.GenerateVerifier(), "st", nil)
	rec := answerOwn(t, e.b, httptest.NewRequest(http.MethodGet, e.front.URL+pathAuthorize+"?"+q.Encode(), nil))
	if rec.Code != http.StatusFound {
		t.Fatalf("authorize with the unused client: %d %s", rec.Code, rec.Body)
	}
	advance(time.Hour)
	if known(unused) {
		t.Error("a registration nobody logged in with lived past a day")
	}
	if !known(used) {
		t.Fatal("a registration used for a login expired after a day")
	}

	tokens = e.refresh(t, used, tokens.RefreshToken, nil).wantTokens(t)
	refreshedAt := e.clock.Now()
	if got := renewedAt(used); !got.Equal(refreshedAt) {
		t.Errorf("a refresh a day after the login left renewed_at %v, want %v", got, refreshedAt)
	}
	advance(30 * time.Minute)
	e.refresh(t, used, tokens.RefreshToken, nil).wantTokens(t)
	if got := renewedAt(used); !got.Equal(refreshedAt) {
		t.Errorf("a second refresh within the hour rewrote the registration (renewed_at %v)", got)
	}

	// It lives 20 days (the longer of the session and refresh token lifetimes) and the
	// renewal interval after its last renewal.
	advance(20*day + time.Hour - 30*time.Minute - time.Second)
	if !known(used) {
		t.Error("a registration expired before its lifetime since the last refresh")
	}
	advance(2 * time.Second)
	if known(used) {
		t.Error("a registration outlived its lifetime since the last refresh")
	}
}
