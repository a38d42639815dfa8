package idp

import (
	"context"
	"net/http"
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
