package caddyoauthbroker

import (
	"encoding/json"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-mcp/oauth-broker/flows"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI is the `admin.api.mcp_oauth` module: the routes of mcp_oauth on Caddy's admin
// endpoint, under `/mcp_oauth/`, which report on every mcp_oauth handler of the running
// configuration. Caddy adds it to the admin endpoint by itself; it has no configuration.
//
// `GET /mcp_oauth/health` is the detail behind each site's public readiness probe
// (`/oauth/health`, which tells strangers only ready or not): per site, whether its storage
// and key ring work and, if not, the error; and what its cached OIDC discovery knows of
// the IdP. It answers 200 whatever the sites' state; `ready` says it per site.
//
// The grant routes address one site by `?site=` (its `resource`, as the health route
// names it), which may be left out when the configuration has one mcp_oauth site:
//
//   - `GET /mcp_oauth/sessions?subject=` lists a user's sessions (session ids as
//     fingerprints, client, scopes, created, last confirmed at the IdP, expiry) and the
//     user's offline access grant; `DELETE` ends them all, or with `&session=` (a listed
//     id) one: their token families revoked, this node's cached tokens evicted, the IdP
//     grant revoked at the IdP and deleted.
//   - `GET /mcp_oauth/offline-access?subject=` is the user's offline access grant;
//     `DELETE` revokes it, here and at the IdP.
//   - `GET /mcp_oauth/clients` lists the dynamically registered clients; `DELETE` with
//     `?client_id=` deletes one.
//   - `GET /mcp_oauth/keys` lists the key ring's key ids and how many sealed values in
//     storage each still seals.
//
// Listings read at most flows.AdminScanLimit records and say `truncated` when they stop
// there. No answer holds a token, secret, code or sealed value (SECURITY.md W13).
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.mcp_oauth",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes returns the admin API's routes.
func (a *AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/mcp_oauth/health", Handler: caddy.AdminHandlerFunc(a.serveHealth)},
		{Pattern: "/mcp_oauth/sessions", Handler: caddy.AdminHandlerFunc(a.serveSessions)},
		{Pattern: "/mcp_oauth/offline-access", Handler: caddy.AdminHandlerFunc(a.serveOfflineAccess)},
		{Pattern: "/mcp_oauth/clients", Handler: caddy.AdminHandlerFunc(a.serveClients)},
		{Pattern: "/mcp_oauth/keys", Handler: caddy.AdminHandlerFunc(a.serveKeys)},
	}
}

// siteHealth is one site's entry in `GET /mcp_oauth/health`.
type siteHealth struct {
	// Site is the handler's `resource`, which names the site.
	Site  string `json:"site"`
	Ready bool   `json:"ready"`
	// CheckedAt is when the storage and key ring were last probed (at most every 5s).
	CheckedAt time.Time   `json:"checked_at"`
	Storage   healthCheck `json:"storage"`
	KeyRing   healthCheck `json:"key_ring"`
	IdP       idpHealth   `json:"idp"`
}

// healthCheck is the outcome of one readiness check.
type healthCheck struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// idpHealth is what the site's cached OIDC discovery knows of the IdP; it never fails
// readiness.
type idpHealth struct {
	Issuer string `json:"issuer"`
	// Discovery is `fetched` (a document is cached and the last fetch succeeded),
	// `failing` (the last fetch failed; a document fetched earlier, if any, stays in use)
	// or `not_fetched` (no request has needed the IdP yet: discovery is lazy).
	Discovery string    `json:"discovery"`
	Cached    bool      `json:"document_cached"`
	FetchedAt time.Time `json:"fetched_at,omitzero"`
	FailedAt  time.Time `json:"failed_at,omitzero"`
	Error     string    `json:"error,omitempty"`
}

func (a *AdminAPI) serveHealth(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed; use GET")}
	}
	out := struct {
		Sites []siteHealth `json:"sites"`
	}{Sites: []siteHealth{}}
	for _, h := range liveSites.current() {
		out.Sites = append(out.Sites, newSiteHealth(h.Resource, h.Issuer, h.broker.Readiness(r.Context())))
	}
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(out)
}

// newSiteHealth is the JSON form of a broker's health.
func newSiteHealth(site, issuer string, f flows.Health) siteHealth {
	s := siteHealth{
		Site: site, Ready: f.Ready, CheckedAt: f.CheckedAt,
		Storage: check(f.Storage), KeyRing: check(f.KeyRing),
		IdP: idpHealth{Issuer: issuer, Cached: f.IdP.Known, FetchedAt: f.IdP.FetchedAt, FailedAt: f.IdP.FailedAt},
	}
	switch {
	case f.IdP.Err != nil:
		s.IdP.Discovery, s.IdP.Error = "failing", f.IdP.Err.Error()
	case f.IdP.Known:
		s.IdP.Discovery = "fetched"
	default:
		s.IdP.Discovery = "not_fetched"
	}
	return s
}

// check is err as a healthCheck.
func check(err error) healthCheck {
	if err != nil {
		return healthCheck{Error: err.Error()}
	}
	return healthCheck{OK: true}
}

// liveSites are the provisioned handlers, in the order they were provisioned, which the
// admin API reports on; Caddy's own `admin.api.reverse_proxy` reads its upstreams from a
// package-level pool the same way. Provision adds a handler, Cleanup removes it.
var liveSites sites

type sites struct {
	mu       sync.Mutex
	handlers []*Handler
}

func (s *sites) add(h *Handler) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers = append(s.handlers, h)
}

func (s *sites) remove(h *Handler) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, e := range s.handlers {
		if e == h {
			s.handlers = append(s.handlers[:i], s.handlers[i+1:]...)
			return
		}
	}
}

// forgetClient drops the registered client id from every handler's memory, the old
// configuration's during a reload included.
func (s *sites) forgetClient(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, h := range s.handlers {
		if h.broker != nil {
			h.broker.ForgetClient(id)
		}
	}
}

// current is the newest handler of each site. During a config reload the new
// configuration's handlers are provisioned before the old one's are cleaned up, so a
// site may briefly have two; the new one is the one that will serve.
func (s *sites) current() []*Handler {
	s.mu.Lock()
	defer s.mu.Unlock()
	newest := make(map[string]int, len(s.handlers))
	for i, h := range s.handlers {
		newest[h.Resource] = i
	}
	out := make([]*Handler, 0, len(newest))
	for i, h := range s.handlers {
		if newest[h.Resource] == i {
			out = append(out, h)
		}
	}
	return out
}

// Interface guards
var _ caddy.AdminRouter = (*AdminAPI)(nil)
