package flows

import (
	"net/http"
	"net/url"
	"testing"

	"github.com/caddy-mcp/oauth-broker/internal/testenv"
)

// Background tokens go only to the background clients the user granted, at a bounded
// rate per client (SECURITY.md, offline access).

// backgroundAs asks f's broker for a background token for subject as worker id.
func (f *offlineAccessTest) backgroundAs(t *testing.T, id, secret, subject string) (*http.Response, oauthError) {
	t.Helper()
	resp := f.backgroundRequest(t, basicCredentials(id, secret), url.Values{"subject": {subject}})
	var e oauthError
	if resp.StatusCode != http.StatusOK {
		decodeJSON(t, resp, &e)
	} else {
		resp.Body.Close()
	}
	return resp, e
}

func TestBackgroundClientNeedsTheUsersGrant(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, nil)
	f.grantOfflineAccess(t, f.userToken(t, o.User))
	// The same site later gets a second worker: the user granted it nothing.
	later := startOfflineAccess(t, o, func(c *Config) {
		c.Resource = f.resource
		c.Records = f.b.cfg.Records
		c.BackgroundClients = append(c.BackgroundClients, BackgroundClient{ID: "worker-2", Secret: "worker-2-secret"})
	})
	if resp, e := later.backgroundAs(t, "worker-2", "worker-2-secret", o.User.Subject); resp.StatusCode != http.StatusForbidden || e.Error != "access_denied" {
		t.Errorf("a worker the user did not grant: %s %+v, want 403 access_denied", resp.Status, e)
	}
	if resp, e := later.backgroundAs(t, testWorkerID, testWorkerSecret, o.User.Subject); resp.StatusCode != http.StatusOK {
		t.Errorf("the worker the user granted: %s %+v", resp.Status, e)
	}
}

func TestBackgroundTokenRateLimit(t *testing.T) {
	o := testenv.StartOP(t)
	f := startOfflineAccess(t, o, func(c *Config) {
		c.BackgroundTokenRate = 2
		c.BackgroundClients = append(c.BackgroundClients, BackgroundClient{ID: "worker-2", Secret: "worker-2-secret"})
	})
	for i := range 2 {
		if resp, e := f.backgroundAs(t, testWorkerID, testWorkerSecret, "nobody"); resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("request %d: %s %+v", i+1, resp.Status, e)
		}
	}
	resp, e := f.backgroundAs(t, testWorkerID, testWorkerSecret, "nobody")
	if resp.StatusCode != http.StatusTooManyRequests || e.Error != "temporarily_unavailable" || resp.Header.Get("Retry-After") == "" {
		t.Errorf("past the rate: %s %+v Retry-After %q, want 429 temporarily_unavailable with Retry-After", resp.Status, e, resp.Header.Get("Retry-After"))
	}
	// The bucket is the worker's: another worker is not slowed down.
	if resp, e := f.backgroundAs(t, "worker-2", "worker-2-secret", "nobody"); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("another worker: %s %+v", resp.Status, e)
	}
}
