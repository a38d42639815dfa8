package flows

import (
	"net/http"
	"testing"
	"time"

	"github.com/caddy-mcp/oauth-broker/safehttp"
)

// A client_id URL whose document cannot be had is fetched once per 30 s, however often a
// stranger names it at /oauth/token or /oauth/revoke (SECURITY.md: strangers can make
// the broker call out).
func TestMetadataDocumentFailureCached(t *testing.T) {
	for _, tc := range []struct {
		name  string
		serve func(*documentServer, http.ResponseWriter, *http.Request)
	}{
		{"a missing document", func(_ *documentServer, w http.ResponseWriter, _ *http.Request) {
			http.NotFound(w, nil)
		}},
		{"a document carrying a secret", serveDocument(map[string]any{
			"redirect_uris": []string{"http://127.0.0.1/callback"}, "client_secret": "s3cret",
		}, "max-age=300")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startDocumentServer(t, tc.serve)
			b := newDocumentBroker(t, srv, true)
			clock := newRegistrationClock()
			b.now = clock.Now
			id := srv.URL + "/client.json"
			for range 5 {
				if _, err := b.findClient(t.Context(), id); err == nil {
					t.Fatal("a bad document was accepted")
				}
				clock.Advance(5 * time.Second)
			}
			if n := srv.hits.Load(); n != 1 {
				t.Errorf("5 lookups within 30 s: %d fetches, want 1", n)
			}
			clock.Advance(documentFailureTTL)
			if _, err := b.findClient(t.Context(), id); err == nil {
				t.Fatal("a bad document was accepted")
			}
			if n := srv.hits.Load(); n != 2 {
				t.Errorf("after 30 s more: %d fetches, want 2", n)
			}
		})
	}
}

func TestMetadataDocumentFailureCacheIsBounded(t *testing.T) {
	d := newMetadataDocuments(2)
	now := newRegistrationClock().Now()
	for i := range maxCachedFailures + 10 {
		d.fail(string(rune(i)), safehttp.ErrNonPublicAddress, now)
	}
	if len(d.failures.entries) != maxCachedFailures {
		t.Errorf("%d failures remembered, want %d", len(d.failures.entries), maxCachedFailures)
	}
}
