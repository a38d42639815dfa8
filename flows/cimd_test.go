package flows

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
	"github.com/caddy-mcp/oauth-broker/safehttp"
)

// documentServer serves client metadata documents over TLS on 127.0.0.1 and counts
// the requests it gets.
type documentServer struct {
	*httptest.Server
	hits atomic.Int64
}

func startDocumentServer(t *testing.T, handler func(srv *documentServer, w http.ResponseWriter, r *http.Request)) *documentServer {
	t.Helper()
	ds := &documentServer{}
	ds.Server = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ds.hits.Add(1)
		handler(ds, w, r)
	}))
	t.Cleanup(ds.Close)
	return ds
}

// serveDocument answers with the JSON document of doc, with its client_id set to the
// request's own URL unless doc names one, and cacheControl.
func serveDocument(doc map[string]any, cacheControl string) func(*documentServer, http.ResponseWriter, *http.Request) {
	return func(srv *documentServer, w http.ResponseWriter, r *http.Request) {
		d := map[string]any{"client_id": srv.URL + r.URL.Path}
		for k, v := range doc {
			d[k] = v
		}
		if cacheControl != "" {
			w.Header().Set("Cache-Control", cacheControl)
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(d)
	}
}

var claudeCodeDocument = map[string]any{
	"client_name":                "Claude Code",
	"redirect_uris":              []string{"http://localhost/callback", "http://127.0.0.1/callback"},
	"grant_types":                []string{"authorization_code", "refresh_token"},
	"response_types":             []string{"code"},
	"token_endpoint_auth_method": "none",
}

// newDocumentBroker is a hybrid broker whose document fetches trust srv's certificate.
func newDocumentBroker(t *testing.T, srv *documentServer, allowPrivate bool) *Broker {
	t.Helper()
	b := newRegistrationBroker(t, func(c *Config) { c.CIMDAllowPrivate = allowPrivate })
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	b.clients.documents.rootCAs = roots
	return b
}

func TestMetadataDocumentClient(t *testing.T) {
	srv := startDocumentServer(t, serveDocument(claudeCodeDocument, "max-age=3600"))
	b := newDocumentBroker(t, srv, true)
	id := srv.URL + "/oauth/claude-code-client-metadata"

	c, err := b.findClient(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	if c.ID != id || c.Name != "Claude Code" || c.Source != ClientSourceMetadataDocument || c.AuthMethod != AuthMethodNone ||
		strings.Join(c.RedirectURIs, " ") != "http://localhost/callback http://127.0.0.1/callback" ||
		!c.allowsGrantType(grantRefreshToken) || strings.Join(c.Scopes, " ") != strings.Join(b.cfg.Scopes, " ") {
		t.Errorf("client %+v", c)
	}
	if !MatchRedirectURI(c.RedirectURIs, "http://127.0.0.1:51234/callback") || MatchRedirectURI(c.RedirectURIs, "https://evil.example/callback") {
		t.Error("redirect URIs do not match as registered ones")
	}

	t.Run("a public client by its URL at the token endpoint", func(t *testing.T) {
		req := httptest.NewRequest(http.MethodPost, "https://mcp.example.test/oauth/token", nil)
		got, err := b.authenticateClient(req, map[string][]string{"client_id": {id}})
		if err != nil || got.ID != id {
			t.Fatalf("%v %v", got, err)
		}
	})
}

func TestMetadataDocumentRefusals(t *testing.T) {
	doc := func(change map[string]any) func(*documentServer, http.ResponseWriter, *http.Request) {
		d := map[string]any{}
		for k, v := range claudeCodeDocument {
			d[k] = v
		}
		for k, v := range change {
			if v == nil {
				delete(d, k)
			} else {
				d[k] = v
			}
		}
		return serveDocument(d, "")
	}
	for _, tc := range []struct {
		name    string
		handler func(*documentServer, http.ResponseWriter, *http.Request)
		path    string
	}{
		{"client_id differs from the URL", doc(map[string]any{"client_id": "https://other.example/client.json"}), "/client.json"},
		{"client_id differs by a trailing slash", func(s *documentServer, w http.ResponseWriter, r *http.Request) {
			serveDocument(map[string]any{"client_id": s.URL + "/client.json/", "redirect_uris": []string{"https://app.example.com/cb"}}, "")(s, w, r)
		}, "/client.json"},
		{"a redirect is not followed", func(s *documentServer, w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/moved.json" {
				http.Redirect(w, r, "/client.json", http.StatusFound)
				return
			}
			serveDocument(claudeCodeDocument, "")(s, w, r)
		}, "/moved.json"},
		{"a document over 5 KiB (the draft's recommended maximum)", func(s *documentServer, w http.ResponseWriter, r *http.Request) {
			doc := `{"client_id":"` + s.URL + r.URL.Path + `","redirect_uris":["https://app.example.com/cb"]`
			w.Write([]byte(doc + strings.Repeat(" ", 5<<10-len(doc)) + `}`))
		}, "/client.json"},
		{"not found", func(_ *documentServer, w http.ResponseWriter, _ *http.Request) { http.NotFound(w, nil) }, "/client.json"},
		{"not JSON", func(_ *documentServer, w http.ResponseWriter, _ *http.Request) { w.Write([]byte("<html>")) }, "/client.json"},
		{"no redirect_uris", doc(map[string]any{"redirect_uris": nil}), "/client.json"},
		{"userinfo redirect URI (W1)", doc(map[string]any{"redirect_uris": []string{"http://localhost:@evil.com/cb"}}), "/client.json"},
		{"http redirect URI on a public host", doc(map[string]any{"redirect_uris": []string{"http://evil.com/cb"}}), "/client.json"},
		{"client_secret_basic auth method", doc(map[string]any{"token_endpoint_auth_method": "client_secret_basic"}), "/client.json"},
		{"private_key_jwt auth method without keys", doc(map[string]any{"token_endpoint_auth_method": "private_key_jwt"}), "/client.json"},
		{"a client_secret in the document", doc(map[string]any{"client_secret": "s3cret"}), "/client.json"},
		{"grant types without authorization_code", doc(map[string]any{"grant_types": []string{"client_credentials"}}), "/client.json"},
		{"response types without code", doc(map[string]any{"response_types": []string{"token"}}), "/client.json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startDocumentServer(t, tc.handler)
			b := newDocumentBroker(t, srv, true)
			c, err := b.findClient(t.Context(), srv.URL+tc.path)
			if !errors.Is(err, ErrUnknownClient) {
				t.Fatalf("client %+v, err %v", c, err)
			}
			if tc.name == "a redirect is not followed" && srv.hits.Load() != 1 {
				t.Errorf("%d requests: the redirect was followed", srv.hits.Load())
			}
		})
	}

	t.Run("malformed client_id URLs are not fetched", func(t *testing.T) {
		srv := startDocumentServer(t, serveDocument(claudeCodeDocument, ""))
		b := newDocumentBroker(t, srv, true)
		for _, id := range []string{
			srv.URL,
			srv.URL + "/",
			srv.URL + "/a/../client.json",
			srv.URL + "/./client.json",
			srv.URL + "/client.json#frag",
			strings.Replace(srv.URL, "https://", "https://user:pw@", 1) + "/client.json",
		} {
			if _, err := b.findClient(t.Context(), id); !errors.Is(err, ErrUnknownClient) {
				t.Errorf("%s: %v", id, err)
			}
		}
		if n := srv.hits.Load(); n != 0 {
			t.Errorf("%d fetches", n)
		}
	})
}

// Without CIMDAllowPrivate the dialer refuses loopback, whatever name led there: the
// name "localhost" passes any check on the URL, the address it resolves to does not.
func TestMetadataDocumentPrivateAddressRefusedAtDial(t *testing.T) {
	srv := startDocumentServer(t, serveDocument(claudeCodeDocument, ""))
	b := newDocumentBroker(t, srv, false)
	port := srv.Listener.Addr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port()
	for _, host := range []string{"127.0.0.1", "localhost", "[::ffff:127.0.0.1]"} {
		id := "https://" + host + ":" + strconv.Itoa(int(port)) + "/client.json"
		_, err := b.findClient(t.Context(), id)
		if !errors.Is(err, ErrUnknownClient) || !errors.Is(err, safehttp.ErrNonPublicAddress) {
			t.Errorf("%s: %v, want a refusal at dial time", host, err)
		}
	}
	if n := srv.hits.Load(); n != 0 {
		t.Errorf("the server got %d requests", n)
	}
}

func TestMetadataDocumentCache(t *testing.T) {
	for _, tc := range []struct {
		name         string
		cacheControl string
		after        time.Duration // time between the first and the second lookup
		wantHits     int64
	}{
		{"within max-age is cached", "public, max-age=300", 299 * time.Second, 1},
		{"past max-age is fetched again", "public, max-age=300", 300 * time.Second, 2},
		{"a short max-age is raised to a minute", "max-age=5", 59 * time.Second, 1},
		{"a long max-age is cut to a day", "max-age=604800", 24 * time.Hour, 2},
		{"no Cache-Control is cached a minute", "", 59 * time.Second, 1},
		{"no-store is not cached", "no-store", 0, 2},
		{"no-cache is not cached", "max-age=300, no-cache", 0, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startDocumentServer(t, serveDocument(claudeCodeDocument, tc.cacheControl))
			b := newDocumentBroker(t, srv, true)
			clock := newRegistrationClock()
			b.now = clock.Now
			id := srv.URL + "/client.json"
			for i := range 2 {
				if _, err := b.findClient(t.Context(), id); err != nil {
					t.Fatal(err)
				}
				if i == 0 {
					clock.Advance(tc.after)
				}
			}
			if n := srv.hits.Load(); n != tc.wantHits {
				t.Errorf("%d fetches, want %d", n, tc.wantHits)
			}
		})
	}
}

// Concurrent first lookups of one document fetch it once.
func TestMetadataDocumentFetchedOnceConcurrently(t *testing.T) {
	release := make(chan struct{})
	srv := startDocumentServer(t, func(s *documentServer, w http.ResponseWriter, r *http.Request) {
		<-release
		serveDocument(claudeCodeDocument, "max-age=300")(s, w, r)
	})
	b := newDocumentBroker(t, srv, true)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			_, err := b.findClient(t.Context(), srv.URL+"/client.json")
			errs <- err
		})
	}
	for srv.hits.Load() == 0 {
		runtime.Gosched()
	}
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := srv.hits.Load(); n != 1 {
		t.Errorf("%d fetches, want 1", n)
	}
}

func TestMetadataDocumentCacheIsBounded(t *testing.T) {
	d := newMetadataDocuments(2)
	now := newRegistrationClock().Now()
	d.put("a", &Client{ID: "a"}, now.Add(time.Hour), now)
	d.put("b", &Client{ID: "b"}, now.Add(time.Minute), now)
	d.put("c", &Client{ID: "c"}, now.Add(2*time.Hour), now) // evicts b, the soonest to expire
	if len(d.entries.entries) != 2 || d.get("b", now) != nil || d.get("a", now) == nil || d.get("c", now) == nil {
		t.Errorf("entries %v", d.entries.entries)
	}
	// Each newcomer outlives the one before it and "c" outlives them all, so every put
	// must evict the previous newcomer; ten in a row leave a random choice no chance.
	d.put("n0", &Client{ID: "n0"}, now.Add(time.Second), now) // evicts a
	for i := 1; i <= 10; i++ {
		d.put(fmt.Sprint("n", i), &Client{ID: "n"}, now.Add(time.Duration(i+1)*time.Second), now)
		if len(d.entries.entries) != 2 || d.get("c", now) == nil || d.get(fmt.Sprint("n", i-1), now) != nil {
			t.Fatalf("put %d: entries %v", i, d.entries.entries)
		}
	}
}

// With client metadata documents turned off, the broker neither advertises nor fetches
// them: an https client_id gets a clear invalid_client, and no request leaves.
func TestClientMetadataDocumentsOff(t *testing.T) {
	srv := startDocumentServer(t, serveDocument(claudeCodeDocument, "max-age=3600"))
	o := testenv.SharedOP(t)
	_, front := startHybridFront(t, o, "", func(c *Config) {
		c.CIMDAllowPrivate = true
		c.DisableClientMetadataDocuments = true
	})

	resp := get(t, front.URL+"/.well-known/oauth-authorization-server", nil)
	var md map[string]any
	decodeJSON(t, resp, &md)
	if md["client_id_metadata_document_supported"] != false {
		t.Errorf("client_id_metadata_document_supported = %v", md["client_id_metadata_document_supported"])
	}
	// Only document clients authenticate with private_key_jwt.
	if methods := fmt.Sprint(md["token_endpoint_auth_methods_supported"]); strings.Contains(methods, "private_key_jwt") || md["token_endpoint_auth_signing_alg_values_supported"] != nil {
		t.Errorf("private_key_jwt advertised with documents off: %s", methods)
	}

	q := hybridAuthorizeQuery(srv.URL+"/oauth/claude-code-client-metadata", "http://127.0.0.1:49152/callback", hybridVerifier, "s", nil)
	resp = get(t, front.URL+pathAuthorize+"?"+q.Encode(), nil)
	var e oauthError
	decodeJSON(t, resp, &e)
	if resp.StatusCode != http.StatusBadRequest || e.Error != "invalid_client" || !strings.Contains(e.Description, "metadata documents") {
		t.Errorf("%s %+v", resp.Status, e)
	}
	if srv.hits.Load() != 0 {
		t.Errorf("%d document fetches with documents off", srv.hits.Load())
	}
}

// The client ID metadata document draft: a client_id URL "MUST NOT contain single-dot or
// double-dot path segments". Percent-encoded dots are the same segments (RFC 3986 §2.3,
// §6.2.2.2): servers that normalize them serve another path than the one the consent page
// shows, e.g. https://host/official/%2e%2e/users/mallory/client.json.
func TestMetadataDocumentEncodedDotSegments(t *testing.T) {
	srv := startDocumentServer(t, func(s *documentServer, w http.ResponseWriter, r *http.Request) {
		d := map[string]any{}
		for k, v := range claudeCodeDocument {
			d[k] = v
		}
		d["client_id"] = s.URL + r.RequestURI // whatever was asked for
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(d)
	})
	b := newDocumentBroker(t, srv, true)
	for _, p := range []string{"/official/%2e%2e/users/mallory/client.json", "/a/%2E./client.json", "/a/.%2e/client.json", "/%2e/client.json"} {
		if c, err := b.findClient(t.Context(), srv.URL+p); !errors.Is(err, ErrUnknownClient) {
			t.Errorf("%s: client %v, err %v: want refused", p, c != nil, err)
		}
	}
	if n := srv.hits.Load(); n != 0 {
		t.Errorf("%d fetches", n)
	}
}

// A document of exactly 5 KiB is read; one byte more is refused (the draft's §"Maximum
// Response Size" recommends 5 kilobytes).
func TestMetadataDocumentSizeCap(t *testing.T) {
	for _, tc := range []struct {
		size int
		ok   bool
	}{{5 << 10, true}, {5<<10 + 1, false}} {
		srv := startDocumentServer(t, func(s *documentServer, w http.ResponseWriter, r *http.Request) {
			doc := `{"client_id":"` + s.URL + r.URL.Path + `","redirect_uris":["https://app.example.com/cb"]`
			w.Write([]byte(doc + strings.Repeat(" ", tc.size-len(doc)-1) + `}`))
		})
		b := newDocumentBroker(t, srv, true)
		_, err := b.findClient(t.Context(), srv.URL+"/client.json")
		if (err == nil) != tc.ok {
			t.Errorf("%d bytes: %v", tc.size, err)
		}
	}
}
