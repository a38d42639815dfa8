package safehttp

import (
	"crypto/x509"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// startServer serves handler over TLS on 127.0.0.1 and counts the requests it gets.
func startServer(t *testing.T, handler http.HandlerFunc) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var hits atomic.Int64
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		handler(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv, &hits
}

func trusting(srv *httptest.Server) *x509.CertPool {
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	return roots
}

func ok(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("{}")) }

// Without AllowPrivate the dialer refuses loopback, whatever name led there: the name
// "localhost" passes any check on the URL, the address it resolves to does not.
func TestNonPublicAddressRefusedAtDial(t *testing.T) {
	srv, hits := startServer(t, ok)
	c := NewClient(Options{RootCAs: trusting(srv)})
	port := srv.Listener.Addr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port()
	for _, host := range []string{"127.0.0.1", "localhost", "[::ffff:127.0.0.1]"} {
		resp, err := c.Get("https://" + host + ":" + strconv.Itoa(int(port)) + "/client.json")
		if err == nil {
			resp.Body.Close()
		}
		if !errors.Is(err, ErrNonPublicAddress) {
			t.Errorf("%s: %v, want a refusal at dial time", host, err)
		}
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the server got %d requests", n)
	}
}

func TestClient(t *testing.T) {
	// The slow server answers only once the client has given up (or after 5s): answering
	// when it sees the client leave would race the client's timeout on a loaded machine.
	slowRelease := make(chan struct{})
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		opts    Options
		status  int           // 0: the request fails
		release chan struct{} // closed once the client returned
	}{
		{"a private address is reached when allowed", ok, Options{AllowPrivate: true}, http.StatusOK, nil},
		{"a redirect is returned, not followed", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/start" {
				http.Redirect(w, r, "/moved", http.StatusFound)
				return
			}
			ok(w, r)
		}, Options{AllowPrivate: true}, http.StatusFound, nil},
		{"a server slower than the timeout fails the request", func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-slowRelease:
			case <-time.After(5 * time.Second):
			}
		}, Options{AllowPrivate: true, Timeout: 50 * time.Millisecond}, 0, slowRelease},
		{"oversized response headers fail the request", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Filler", strings.Repeat("a", maxResponseHeaderBytes+1))
			ok(w, r)
		}, Options{AllowPrivate: true}, 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, hits := startServer(t, tc.handler)
			tc.opts.RootCAs = trusting(srv)
			resp, err := NewClient(tc.opts).Get(srv.URL + "/start")
			if tc.release != nil {
				close(tc.release)
			}
			if err == nil {
				resp.Body.Close()
			}
			switch {
			case tc.status == 0 && err == nil:
				t.Errorf("%s, want the request to fail", resp.Status)
			case tc.status != 0 && (err != nil || resp.StatusCode != tc.status):
				t.Errorf("%v %v, want %d", resp, err, tc.status)
			}
			if n := hits.Load(); n != 1 {
				t.Errorf("the server got %d requests, want 1", n)
			}
		})
	}
}

// An environment proxy is not used: it would dial in the client's place, unchecked.
func TestEnvironmentProxyIgnored(t *testing.T) {
	t.Setenv("HTTPS_PROXY", "http://127.0.0.1:1")
	srv, hits := startServer(t, ok)
	resp, err := NewClient(Options{AllowPrivate: true, RootCAs: trusting(srv)}).Get(srv.URL + "/client.json")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if hits.Load() != 1 {
		t.Error("the request did not reach the server directly")
	}
}

// An unknown certificate authority is refused unless given in RootCAs.
func TestSystemRootsByDefault(t *testing.T) {
	srv, hits := startServer(t, ok)
	resp, err := NewClient(Options{AllowPrivate: true}).Get(srv.URL + "/client.json")
	if err == nil {
		resp.Body.Close()
		t.Fatal("a server with an unknown certificate authority was trusted")
	}
	if hits.Load() != 0 {
		t.Errorf("the server got %d requests", hits.Load())
	}
}

func TestIsPublic(t *testing.T) {
	for _, tc := range []struct {
		addr   string
		public bool
	}{
		{"93.184.215.14", true},
		{"2606:4700::6810:84e5", true},
		{"127.0.0.1", false},
		{"::1", false},
		{"::ffff:127.0.0.1", false},
		{"10.1.2.3", false},
		{"172.16.0.1", false},
		{"192.168.1.1", false},
		{"169.254.169.254", false}, // cloud metadata
		{"fe80::1", false},
		{"fd00::1", false},
		{"0.0.0.0", false},
		{"::", false},
		{"100.64.0.1", false},
		{"224.0.0.1", false},
		{"255.255.255.255", false},
		{"64:ff9b::a00:1", false},  // NAT64 of 10.0.0.1
		{"2002:a00:1::1", false},   // 6to4 of 10.0.0.1
		{"2001:0:a00:1::1", false}, // Teredo
		{"192.0.2.1", false},       // documentation
		{"2001:db8::1", false},     // documentation
		{"198.18.0.1", false},      // benchmarking
		{"ff02::1", false},         // multicast
	} {
		if got := IsPublic(netip.MustParseAddr(tc.addr)); got != tc.public {
			t.Errorf("%s: public %v, want %v", tc.addr, got, tc.public)
		}
	}
}
