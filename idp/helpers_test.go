package idp

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

type clientIPKey struct{}

// withClientIP records the client's address in ctx, as the server in front would, for
// contextClientIP.
func withClientIP(ctx context.Context, ip string) context.Context {
	return context.WithValue(ctx, clientIPKey{}, ip)
}

// contextClientIP is VerifierConfig.ClientIP of the tests: the address withClientIP
// recorded, else "".
func contextClientIP(ctx context.Context) string {
	ip, _ := ctx.Value(clientIPKey{}).(string)
	return ip
}

// roundTripFunc is an http.RoundTripper made of a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// startWithKnownKey starts an OP of its own (its counts are the test's) and a verifier of
// it on a clock standing still, and has the verifier verify one of the OP's JWTs so that
// it knows the OP's signing key; claims are a valid access token's, fresh each call.
func startWithKnownKey(t *testing.T) (o *testenv.OP, clock *testenv.Clock, v *Verifier, claims func() map[string]any) {
	t.Helper()
	o = testenv.StartOP(t)
	clock = &testenv.Clock{Base: time.Now()}
	v = newVerifierFor(o, func(c *VerifierConfig) { c.Now = clock.Now })
	claims = func() map[string]any { return o.AccessTokenClaims(o.User.Subject, verifierResource) }
	if _, err := v.Verify(t.Context(), o.MintJWT(claims())); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	return o, clock, v, claims
}
