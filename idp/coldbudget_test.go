package idp

import (
	"errors"
	"net/http"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// The global budget caps what all addresses together can cost; its refusal is 503.
func TestColdVerificationBudgetGlobal(t *testing.T) {
	o := testenv.StartOP(t)
	clock := &testenv.Clock{Base: time.Now()}
	v := newVerifierFor(o, func(c *VerifierConfig) {
		c.ColdVerifyRate, c.ColdVerifyRateGlobal, c.Now = 3, 5, clock.Now
	})
	if _, err := v.cfg.Provider.Discovery(t.Context()); err != nil {
		t.Fatal(err)
	}
	o.ResetCounts()
	var refused []int
	for i := range 4 {
		for range 3 {
			ctx := withClientIP(t.Context(), "203.0.113."+string(rune('1'+i)))
			_, err := v.Verify(ctx, "junk-"+testenv.RandomKID())
			var later *RetryLaterError
			if errors.As(err, &later) {
				refused = append(refused, later.Status)
			} else if !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("Verify = %v", err)
			}
		}
	}
	if n := o.Count(testenv.CountIntrospect); n != 5 {
		t.Errorf("%d introspections, want the global budget of 5", n)
	}
	for _, s := range refused {
		if s != http.StatusServiceUnavailable {
			t.Errorf("global refusal status %d, want 503", s)
		}
	}
	clock.Advance(time.Minute)
	if _, err := v.Verify(withClientIP(t.Context(), "203.0.113.1"), "junk-"+testenv.RandomKID()); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("a minute later: %v, want a plain refusal", err)
	}
}

// go-oidc's RemoteKeySet fetched the JWKS again for every JWT naming an unknown key; the
// broker fetches it at most once per 30 s, answering 503 with Retry-After meanwhile, so a
// key rotated at the IdP is still picked up (SECURITY.md: strangers can make the broker
// call out).
func TestJWKSRefetchAtMostEvery30s(t *testing.T) {
	o, clock, v, claims := startWithKnownKey(t)
	o.ResetCounts()
	for i := range 20 {
		ctx := withClientIP(t.Context(), "203.0.113."+string(rune('1'+i%9)))
		forged := testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, testenv.RandomKID(), claims())
		_, err := v.Verify(ctx, forged)
		if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrInvalidToken) {
			t.Fatalf("forged JWT %d within 30 s of a fetch: %v, want unavailable (retry later), not invalid", i, err)
		}
	}
	if n := o.Count(testenv.CountJWKS); n != 0 {
		t.Errorf("20 unknown kids within 30 s of a fetch cost %d JWKS fetches, want 0", n)
	}
	if _, err := v.Verify(t.Context(), o.MintJWT(claims())); err != nil {
		t.Errorf("a token under the known key meanwhile: %v", err)
	}

	clock.Advance(JWKSRefetchInterval)
	forged := testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, testenv.RandomKID(), claims())
	if _, err := v.Verify(t.Context(), forged); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("an unknown kid 30 s later: %v, want invalid after one fetch", err)
	}
	if n := o.Count(testenv.CountJWKS); n != 1 {
		t.Errorf("%d JWKS fetches 30 s later, want 1", n)
	}
}

// A JWT naming a known key whose signature does not verify is refused without a fetch.
func TestJWKSKnownKidBadSignatureNoFetch(t *testing.T) {
	o := testenv.StartOP(t)
	v := newVerifierFor(o, nil)
	claims := o.AccessTokenClaims(o.User.Subject, verifierResource)
	if _, err := v.Verify(t.Context(), o.MintJWT(claims)); err != nil {
		t.Fatal(err)
	}
	o.ResetCounts()
	forged := testenv.SignJWT(t, testenv.AttackerKey(), jose.RS256, o.SigningKey().KeyID, claims)
	if _, err := v.Verify(t.Context(), forged); !errors.Is(err, ErrInvalidToken) || errors.Is(err, ErrUnavailable) {
		t.Errorf("Verify = %v, want invalid", err)
	}
	if n := o.Count(testenv.CountJWKS); n != 0 {
		t.Errorf("%d JWKS fetches, want 0", n)
	}
}

// Every cold verification from one private address, and no other, makes one warning
// about trusted_proxies; a second address means none.
func TestColdBudgetWarnsOfASingleProxyAddress(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ips   func(i int) string
		warns int
	}{
		{"one private address warns once", func(int) string { return "10.1.2.3" }, 1},
		{"one loopback address warns once", func(int) string { return "127.0.0.1" }, 1},
		{"one public address does not warn", func(int) string { return "203.0.113.5" }, 0},
		{"two addresses do not warn", func(i int) string { return []string{"10.1.2.3", "10.1.2.4"}[i%2] }, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zap.WarnLevel)
			c := newColdBudget(-1, -1, zap.New(core))
			for i := range 3 * singleSourceEvidence {
				if err := c.admit(tc.ips(i), time.Now()); err != nil {
					t.Fatal(err)
				}
			}
			if n := logs.FilterMessageSnippet("trusted_proxies").Len(); n != tc.warns {
				t.Errorf("%d warnings, want %d", n, tc.warns)
			}
		})
	}
}

// A budget refusal is the spent address's, not the token's: a caller from another address
// that joined the refused verification of the same token verifies on its own budget.
func TestColdBudgetRefusalIsNotTheWaiters(t *testing.T) {
	o := testenv.SharedOP(t)
	raw := o.LoginAccessToken(t, testenv.OpaqueClientID, testenv.OpaqueClientSecret, []string{"openid"}, verifierResource)
	fault := newFaultHoldDiscovery()
	clock := &testenv.Clock{Base: time.Now()}
	v := newVerifierFor(o, func(c *VerifierConfig) {
		c.Provider = NewProvider(ProviderConfig{Issuer: o.Issuer, HTTPClient: &http.Client{Transport: fault}})
		c.ColdVerifyRate, c.Now = 1, clock.Now // frozen: no bucket refills during the test
	})
	const spent, other = "198.51.100.7", "203.0.113.9"
	if err := v.budget.admit(spent, clock.Now()); err != nil {
		t.Fatal(err)
	}

	release := fault.hold()
	defer release()
	leader := make(chan error, 1)
	go func() {
		_, err := v.Verify(withClientIP(t.Context(), spent), raw)
		leader <- err
	}()
	<-fault.arrived // the leader's verification waits for discovery
	waiter := make(chan error, 1)
	go func() {
		_, err := v.Verify(withClientIP(t.Context(), other), raw)
		waiter <- err
	}()
	time.Sleep(50 * time.Millisecond) // let the waiter join the leader's flight
	release()

	if later := AsRetryLater(<-leader); later == nil || later.Status != http.StatusTooManyRequests {
		t.Errorf("the spent address: %v, want 429 retry later", later)
	}
	if err := <-waiter; err != nil {
		t.Errorf("the other address: %v, want the token verified on its own budget", err)
	}
}
