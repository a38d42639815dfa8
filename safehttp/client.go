// Package safehttp builds the HTTP client the broker uses to fetch what a stranger names
// by URL, such as a client metadata document (SECURITY.md: strangers can make the broker
// call out). NewClient returns an *http.Client that connects only to public addresses,
// checked by the dialer on the address actually dialled so that DNS rebinding cannot get
// round it (IsPublic says which addresses are; a refused dial fails with
// ErrNonPublicAddress), and that uses no proxy, follows no redirect, requires TLS 1.2 and
// bounds every request by Options.Timeout and the response headers by size. What to
// fetch, how much of a body to read, and what to make of it are the caller's.
package safehttp

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"syscall"
	"time"
)

// ErrNonPublicAddress means a request would have connected to a loopback, private,
// link-local or otherwise non-public address.
var ErrNonPublicAddress = errors.New("address is not public")

// Options configure a client. The zero value is a client to public addresses with a
// DefaultTimeout.
type Options struct {
	// Timeout bounds each request, from dialing to the end of the body, and each of its
	// steps (TLS handshake, response headers). Default: DefaultTimeout.
	Timeout time.Duration
	// AllowPrivate lets the client connect to non-public addresses too (a deployment
	// whose clients live on its own network, tests).
	AllowPrivate bool
	// RootCAs, when set, replace the system's roots for verifying servers (tests).
	RootCAs *x509.CertPool
}

// DefaultTimeout is the Timeout of Options that set none.
const DefaultTimeout = 5 * time.Second

// maxResponseHeaderBytes bounds the response headers a server may send.
const maxResponseHeaderBytes = 16 << 10

// NewClient returns a client that fetches as an untrusted party would: see the package
// documentation. A 3xx is returned as the response, never followed: a redirect is an
// answer, and for the broker a refusal.
func NewClient(o Options) *http.Client {
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	dialer := &net.Dialer{Timeout: timeout}
	if !o.AllowPrivate {
		dialer.Control = refuseNonPublicAddress
	}
	return &http.Client{
		Transport: &http.Transport{
			Proxy:                  nil, // a proxy would dial in our place, unchecked
			DialContext:            dialer.DialContext,
			TLSClientConfig:        &tls.Config{RootCAs: o.RootCAs, MinVersion: tls.VersionTLS12},
			ForceAttemptHTTP2:      true,
			TLSHandshakeTimeout:    timeout,
			ResponseHeaderTimeout:  timeout,
			MaxResponseHeaderBytes: maxResponseHeaderBytes,
			MaxIdleConns:           16,
			IdleConnTimeout:        90 * time.Second,
		},
		Timeout: timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// refuseNonPublicAddress is the dialer's last word on every connection: it sees the
// resolved address about to be dialled.
func refuseNonPublicAddress(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil || !IsPublic(ap.Addr()) {
		return ErrNonPublicAddress
	}
	return nil
}

// nonPublicPrefixes are special-purpose ranges (RFC 6890 and successors) the netip
// predicates do not cover, or that embed an IPv4 address that might be private.
var nonPublicPrefixes = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"), // carrier-grade NAT
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.0.2.0/24"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("198.51.100.0/24"),
	netip.MustParsePrefix("203.0.113.0/24"),
	netip.MustParsePrefix("240.0.0.0/4"),    // reserved and broadcast
	netip.MustParsePrefix("64:ff9b::/96"),   // NAT64
	netip.MustParsePrefix("64:ff9b:1::/48"), // local NAT64
	netip.MustParsePrefix("2001::/32"),      // Teredo
	netip.MustParsePrefix("2001:db8::/32"),
	netip.MustParsePrefix("2002::/16"), // 6to4
}

// IsPublic tells whether a is a public unicast address: not loopback, private,
// unspecified, link-local, multicast, nor in a special-purpose range, an IPv4-mapped
// IPv6 address judged as its IPv4 address.
func IsPublic(a netip.Addr) bool {
	a = a.Unmap()
	if !a.IsValid() || a.IsLoopback() || a.IsPrivate() || a.IsUnspecified() ||
		a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() || a.IsMulticast() {
		return false
	}
	for _, p := range nonPublicPrefixes {
		if p.Contains(a) {
			return false
		}
	}
	return true
}
