package flows

import (
	"context"
	"net"
	"net/http"
)

type clientIPKey struct{}

// WithClientIP records the client's IP as the server in front resolved it (Caddy applies
// its trusted-proxy rules), for per-client rate limits.
func WithClientIP(ctx context.Context, ip string) context.Context {
	return context.WithValue(ctx, clientIPKey{}, ip)
}

// clientIP is the IP recorded by WithClientIP, else the connection's peer address.
func clientIP(r *http.Request) string {
	if ip, ok := r.Context().Value(clientIPKey{}).(string); ok && ip != "" {
		return ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// ClientIPFunc resolves the client's IP from a request's context, as the server in front
// resolved it (Caddy: its client_ip, per trusted_proxies); "" when unknown.
type ClientIPFunc func(ctx context.Context) string

// contextClientIP is the IP recorded by WithClientIP, else "".
func contextClientIP(ctx context.Context) string {
	ip, _ := ctx.Value(clientIPKey{}).(string)
	return ip
}
