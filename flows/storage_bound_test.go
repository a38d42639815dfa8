package flows

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"golang.org/x/oauth2"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/storage"
)

// The README's bounds on what strangers can make the broker store (section "What a
// stranger can make the broker store"), with the default rates.
const (
	maxRegistrationRecordBytes  = 4 << 10 // a registered client on disk
	maxAuthorizationRecordBytes = 7 << 10 // a consent ticket or a pending login on disk
	// maxHeldPerAddress is the most one client address can make the broker hold.
	maxHeldPerAddress = 70 << 20
	// maxHeldRegistrations is the most all addresses together can make it hold in
	// registrations.
	maxHeldRegistrations = 171 << 20
	// janitorDelay is how long an expired record may stay on disk: the module's janitor
	// sweeps every 10 minutes.
	janitorDelay = 10 * time.Minute
)

func fileSize(t *testing.T, dir, key string) int64 {
	t.Helper()
	st, err := os.Stat(filepath.Join(dir, filepath.FromSlash(key)))
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// The records an authorization request leaves on disk (the consent ticket, then the
// pending login) are at most 7 KiB each, however the stranger shapes the request.
func TestAuthorizationRecordsOnDiskAreAtMost7KiB(t *testing.T) {
	dir := t.TempDir()
	ring, err := storage.NewKeyRing(bytes.Repeat([]byte{7}, 32))
	if err != nil {
		t.Fatal(err)
	}
	o := testenv.SharedOP(t)
	b, front := startHybridFront(t, o, "", func(c *Config) {
		c.Registration = true
		c.Records = storage.New(&certmagic.FileStorage{Path: dir}, ring)
	})
	// A registered loopback redirect URI of 512 bytes, mostly characters JSON escapes.
	redirect := "http://127.0.0.1/cb?" + strings.Repeat("<", 512-len("http://127.0.0.1/cb?"))
	client := registerClient(t, b, registrationJSON([]string{redirect}, "x", `"token_endpoint_auth_method":"none"`)).ClientID

	accepted := 0
	for _, state := range []string{strings.Repeat("a", maxStateLen), strings.Repeat("<", maxStateLen), strings.Repeat("<", maxStateLen/4)} {
		br := newHybridBrowser(t)
		q := hybridAuthorizeQuery(client, redirect, oauth2.GenerateVerifier(), state, []string{"openid", "notes:read", "notes:write"})
		resp, body := br.get(front.URL + pathAuthorize + "?" + q.Encode())
		if resp.StatusCode != http.StatusFound {
			t.Fatalf("authorize: %d %.200s", resp.StatusCode, body)
		}
		next := br.redirect(resp, body)
		if next.Path != pathConsent {
			if next.Query().Get("error") != "invalid_request" {
				t.Fatalf("authorize sent the browser to %s", next.Redacted())
			}
			continue // refused as too large
		}
		accepted++
		if n := fileSize(t, dir, recordKey(kindConsent, next.Query().Get("ticket"))); n > maxAuthorizationRecordBytes {
			t.Errorf("consent ticket of %d bytes, want at most %d", n, maxAuthorizationRecordBytes)
		}
		idp := br.decide(next, "approve")
		if n := fileSize(t, dir, recordKey(kindIdPState, idp.Query().Get("state"))); n > maxAuthorizationRecordBytes {
			t.Errorf("pending login of %d bytes, want at most %d", n, maxAuthorizationRecordBytes)
		}
	}
	if accepted < 2 {
		t.Errorf("only %d of the largest authorization requests were accepted", accepted)
	}
}

// admitted counts the requests the broker lets past its rate limit during window, from
// one address or (ip nil) from a new address each time: every minute of the injected
// clock it sends requests that pass the limiter and are then refused without a write,
// until it answers 429. No time is waited.
func admitted(t *testing.T, b *Broker, clock *testenv.Clock, window time.Duration, request func(ip string) *http.Request, ip func(i int) string) int {
	t.Helper()
	n, sent := 0, 0
	for end := clock.Now().Add(window); !clock.Now().After(end); clock.Advance(time.Minute) {
		for {
			sent++
			rec := httptest.NewRecorder()
			b.Handle(rec, request(ip(sent)))
			if rec.Code == http.StatusTooManyRequests {
				break
			}
			if n++; n > 200_000 {
				t.Fatalf("more than %d requests admitted: no limit", n-1)
			}
		}
	}
	return n
}

// One address can make the broker hold at most what the README says, and all addresses
// together at most its figure in registrations; computed from the record caps above and
// the requests the rate limits admit, run against the injected clock over each record's
// time on disk (its lifetime plus the janitor's delay).
func TestAnonymousStorageBoundPerAddress(t *testing.T) {
	b := newRegistrationBroker(t, nil)
	clock := newRegistrationClock()
	b.now = clock.Now
	one := func(int) string { return "203.0.113.7" }
	registration := func(ip string) *http.Request {
		req := registerRequest(`{}`, ip)
		req.Header.Set("Content-Type", "text/plain") // 415 past the limiter: nothing stored
		return req
	}
	authorization := func(ip string) *http.Request {
		req := httptest.NewRequest(http.MethodGet, "https://mcp.example.test"+pathAuthorize, nil) // 400: no client_id
		return req.WithContext(WithClientIP(req.Context(), ip))
	}

	// An unused registration lives a day; tickets and pending logins 10 minutes each, one
	// after the other, so an authorization's record lives at most 20 minutes.
	registrations := admitted(t, b, clock, unusedRegistrationTTL+janitorDelay, registration, one)
	authorizations := admitted(t, b, clock, consentTicketTTL+idpStateTTL+janitorDelay, authorization, one)
	held := registrations*maxRegistrationRecordBytes + authorizations*maxAuthorizationRecordBytes
	t.Logf("one address: %d registrations, %d authorizations alive at once: %.1f MiB", registrations, authorizations, float64(held)/(1<<20))
	if held > maxHeldPerAddress {
		t.Errorf("one address can make the broker hold %d bytes, more than the README's %d", held, maxHeldPerAddress)
	}

	b = newRegistrationBroker(t, nil)
	b.now = clock.Now
	all := admitted(t, b, clock, unusedRegistrationTTL+janitorDelay, registration, func(i int) string { return fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255) })
	t.Logf("all addresses: %d registrations alive at once: %.1f MiB", all, float64(all*maxRegistrationRecordBytes)/(1<<20))
	if all*maxRegistrationRecordBytes > maxHeldRegistrations {
		t.Errorf("all addresses together can make the broker hold %d bytes of registrations, more than the README's %d", all*maxRegistrationRecordBytes, maxHeldRegistrations)
	}
}
