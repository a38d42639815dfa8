package flows

import (
	"fmt"
	"testing"
	"time"
)

// Many addresses together may register RegistrationRateTotal clients a minute, however
// few each of them makes.
func TestRegistrationRateTotal(t *testing.T) {
	b := newRegistrationBroker(t, func(c *Config) { c.RegistrationRate = 2; c.RegistrationRateTotal = 5 })
	clock := newRegistrationClock()
	b.now = clock.Now
	body := `{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`
	for i := range 5 {
		if rec := answerOwn(t, b, registerRequest(body, fmt.Sprintf("203.0.113.%d", i))); rec.Code != 201 {
			t.Fatalf("registration %d: %d %s", i, rec.Code, rec.Body)
		}
	}
	rec := answerOwn(t, b, registerRequest(body, "198.51.100.1"))
	wantRegistrationError(t, rec, 429, "temporarily_unavailable")
	if got := rec.Header().Get("Retry-After"); got != "12" { // one token per 60/5 s
		t.Errorf("Retry-After %q, want 12", got)
	}
	clock.Advance(12 * time.Second)
	if rec := answerOwn(t, b, registerRequest(body, "198.51.100.1")); rec.Code != 201 {
		t.Errorf("after 12 s: %d", rec.Code)
	}
}

func TestRegistrationRateTotalDefault(t *testing.T) {
	b := newRegistrationBroker(t, nil)
	if b.cfg.RegistrationRateTotal != 30 {
		t.Errorf("default RegistrationRateTotal %d, want 30", b.cfg.RegistrationRateTotal)
	}
}
