package flows

import (
	"encoding/json"
	"errors"
	"net/http"
	"testing"
)

// The client ID metadata document draft: a client_id URL "MUST NOT contain single-dot or
// double-dot path segments". Percent-encoded dots are the same segments (RFC 3986 §2.3,
// §6.2.2.2): servers that normalize them serve another path than the one the consent page
// shows, e.g. https://host/official/%2e%2e/users/mallory/client.json.
func TestAuditAMetadataDocumentEncodedDotSegments(t *testing.T) {
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
