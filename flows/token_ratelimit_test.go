package flows

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// tokenRequest is a POST of form to path from ip, answered by b as the Caddy module would.
func tokenRequest(t *testing.T, b *Broker, path, ip string, form url.Values) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req = req.WithContext(WithClientIP(req.Context(), ip))
	return answerOwn(t, b, req)
}

// wantRateLimited checks a 429 with an OAuth error and a Retry-After of at most a minute.
func wantRateLimited(t *testing.T, rec *httptest.ResponseRecorder) {
	t.Helper()
	var e oauthError
	_ = json.Unmarshal(rec.Body.Bytes(), &e)
	if rec.Code != http.StatusTooManyRequests || e.Error != "temporarily_unavailable" {
		t.Fatalf("got %d %q, want 429 temporarily_unavailable", rec.Code, e.Error)
	}
	if ra := rec.Header().Get("Retry-After"); ra == "" || ra == "0" || len(ra) > 2 {
		t.Errorf("Retry-After %q", ra)
	}
}

// The token and revocation endpoints take at most tokenRatePerIP requests a minute from
// one address (both together) and tokenRatePerClient from one registered client: limits
// no real client reaches, which bound what one stranger makes the broker do.
func TestTokenEndpointsAreRateLimited(t *testing.T) {
	const perIP, perClient = 120, 60 // the documented limits (README, "Hybrid mode")
	b := newRegistrationBroker(t, nil)
	clock := &testenv.Clock{Base: time.Now()} // stands still: a slow machine refills no bucket
	b.now = clock.Now
	refresh := func(clientID string) url.Values {
		return url.Values{"grant_type": {"refresh_token"}, "client_id": {clientID}, "refresh_token": {"garbage"}}
	}

	t.Run("per address, over both endpoints", func(t *testing.T) {
		for i := range perIP {
			path, form := pathToken, refresh(testenv.NativeClientID)
			if i%2 == 1 {
				path, form = pathRevoke, url.Values{"client_id": {testenv.NativeClientID}, "token": {"garbage"}}
			}
			if rec := tokenRequest(t, b, path, "192.0.2.1", form); rec.Code == http.StatusTooManyRequests {
				t.Fatalf("request %d was limited", i+1)
			}
		}
		wantRateLimited(t, tokenRequest(t, b, pathToken, "192.0.2.1", refresh(testenv.NativeClientID)))
		wantRateLimited(t, tokenRequest(t, b, pathRevoke, "192.0.2.1", url.Values{"client_id": {testenv.NativeClientID}, "token": {"garbage"}}))
		if rec := tokenRequest(t, b, pathToken, "192.0.2.2", refresh(testenv.NativeClientID)); rec.Code != http.StatusBadRequest {
			t.Errorf("another address: %d %s", rec.Code, rec.Body)
		}
		clock.Advance(time.Minute)
		if rec := tokenRequest(t, b, pathToken, "192.0.2.1", refresh(testenv.NativeClientID)); rec.Code != http.StatusBadRequest {
			t.Errorf("a minute later: %d %s", rec.Code, rec.Body)
		}
	})

	t.Run("per confidential registered client, from any address", func(t *testing.T) {
		const confidential = `{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"client_secret_post"}`
		client, other := registerClient(t, b, confidential), registerClient(t, b, confidential)
		withSecret := func(c clientInformation) url.Values {
			form := refresh(c.ClientID)
			form.Set("client_secret", c.ClientSecret)
			return form
		}
		for i := range perClient {
			ip := "198.51.100." + string(rune('0'+i%10))
			if rec := tokenRequest(t, b, pathToken, ip, withSecret(client)); rec.Code != http.StatusBadRequest {
				t.Fatalf("request %d: %d %s", i+1, rec.Code, rec.Body)
			}
		}
		wantRateLimited(t, tokenRequest(t, b, pathToken, "203.0.113.9", withSecret(client)))
		if rec := tokenRequest(t, b, pathToken, "203.0.113.9", withSecret(other)); rec.Code != http.StatusBadRequest {
			t.Errorf("another client: %d %s", rec.Code, rec.Body)
		}
	})

	// A public client authenticates with its id alone, and an id is no secret: a hosted
	// client sharing one registration among its users shows it to each of them. Limited per
	// id, a stranger holding it would lock every one of those users out of their tokens.
	t.Run("a public registered client's id is limited per address only", func(t *testing.T) {
		client := registerClient(t, b, `{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`)
		for i := range perClient + 1 {
			ip := "198.18.0." + string(rune('0'+i%10)) + string(rune('0'+i/10))
			if rec := tokenRequest(t, b, pathToken, ip, refresh(client.ClientID)); rec.Code != http.StatusBadRequest {
				t.Fatalf("request %d: %d %s", i+1, rec.Code, rec.Body)
			}
		}
	})

	t.Run("a configured client's id, shared by all its users, is limited per address only", func(t *testing.T) {
		for i := range perClient + 1 {
			ip := "203.0.113." + string(rune('0'+i%10)) + string(rune('0'+i/10))
			if rec := tokenRequest(t, b, pathToken, ip, refresh(testenv.NativeClientID)); rec.Code != http.StatusBadRequest {
				t.Fatalf("request %d: %d %s", i+1, rec.Code, rec.Body)
			}
		}
	})
}

// An unknown client, or one whose registration is gone, gets 401 invalid_client at the
// token and revocation endpoints (RFC 6749 §5.2): the answer hosted clients act on by
// registering again.
func TestTokenEndpointsUnknownClient(t *testing.T) {
	b := newRegistrationBroker(t, nil)
	gone := registerClient(t, b, `{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`)
	if err := b.cfg.Records.Delete(t.Context(), recordKey(kindClient, gone.ClientID)); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"nobody", gone.ClientID} {
		for _, path := range []string{pathToken, pathRevoke} {
			form := url.Values{"client_id": {id}, "grant_type": {"refresh_token"}, "refresh_token": {"garbage"}, "token": {"garbage"}}
			rec := tokenRequest(t, b, path, "192.0.2.7", form)
			var e oauthError
			_ = json.Unmarshal(rec.Body.Bytes(), &e)
			if rec.Code != http.StatusUnauthorized || e.Error != "invalid_client" {
				t.Errorf("%s as %s: %d %q, want 401 invalid_client", path, id, rec.Code, e.Error)
			}
			if rec.Header().Get("WWW-Authenticate") != "" {
				t.Errorf("%s: a challenge without HTTP authentication tried", path)
			}
		}
	}
}

func TestNeedsClientIP(t *testing.T) {
	for _, p := range []string{pathRegister, pathAuthorize, pathToken, pathRevoke} {
		if !NeedsClientIP(p) {
			t.Errorf("%s is rate-limited per address but does not ask for the client IP", p)
		}
	}
	if NeedsClientIP("/mcp") {
		t.Error("the MCP path asks for the client IP: work on the warm path")
	}
}
