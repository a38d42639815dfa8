package idp

import (
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// warmVerifier returns a verifier for the shared OP and a JWT access token of that OP,
// signed with its real key, verified once so that it is cached.
func warmVerifier(b *testing.B) (*Verifier, string) {
	b.Helper()
	o := testenv.SharedOP(b)
	v := newVerifierFor(o, nil)
	raw := o.MintJWT(o.AccessTokenClaims(o.User.Subject, verifierResource))
	if _, err := v.Verify(b.Context(), raw); err != nil {
		b.Fatalf("Verify: %v", err)
	}
	return v, raw
}

// BenchmarkVerifyWarm is the hot path of every request after the first: a cached valid
// JWT. It must stay free of signature checks, network and allocation.
func BenchmarkVerifyWarm(b *testing.B) {
	v, raw := warmVerifier(b)
	ctx := b.Context()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Verify(ctx, raw); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyWarmParallel is the hot path under concurrent requests.
func BenchmarkVerifyWarmParallel(b *testing.B) {
	v, raw := warmVerifier(b)
	ctx := b.Context()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := v.Verify(ctx, raw); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkVerifyCold is the first request of a token: go-oidc's RS256 verification and
// claim decoding, with the JWKS already cached. The cache is emptied every time.
func BenchmarkVerifyCold(b *testing.B) {
	v, raw := warmVerifier(b)
	ctx := b.Context()
	b.ReportAllocs()
	for b.Loop() {
		v.cache.Clear()
		if _, err := v.Verify(ctx, raw); err != nil {
			b.Fatal(err)
		}
	}
}
