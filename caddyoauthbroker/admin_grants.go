package caddyoauthbroker

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-mcp/oauth-broker/flows"
)

// The grant routes of the admin API (see AdminAPI): each addresses one site and calls
// the broker's admin methods; storage failures are 500 with the error, which names no
// secret.

// apiError is an admin API error with status, as Caddy's admin endpoint answers it.
func apiError(status int, format string, args ...any) error {
	return caddy.APIError{HTTPStatus: status, Err: fmt.Errorf(format, args...)}
}

// allowMethods refuses any method of r but those given.
func allowMethods(r *http.Request, methods ...string) error {
	for _, m := range methods {
		if r.Method == m {
			return nil
		}
	}
	return apiError(http.StatusMethodNotAllowed, "method not allowed; use %s", strings.Join(methods, " or "))
}

// siteOf is the handler of the site r names by `?site=` (a handler's `resource`), or the
// only site when r names none and there is one.
func siteOf(r *http.Request) (*Handler, error) {
	name := r.URL.Query().Get("site")
	current := liveSites.current()
	if name == "" {
		if len(current) == 1 {
			return current[0], nil
		}
		names := make([]string, len(current))
		for i, h := range current {
			names[i] = h.Resource
		}
		return nil, apiError(http.StatusBadRequest, "name the site with ?site= (one of %q)", names)
	}
	for _, h := range current {
		if h.Resource == name {
			return h, nil
		}
	}
	return nil, apiError(http.StatusNotFound, "no mcp_oauth site %q", name)
}

// required is the query parameter name of r, which must be set.
func required(r *http.Request, name string) (string, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return "", apiError(http.StatusBadRequest, "the query parameter %s is required", name)
	}
	return v, nil
}

// writeAdminJSON answers v as JSON.
func writeAdminJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// siteAndSubject reads the site and `subject` of r, for the routes about one user.
func siteAndSubject(r *http.Request) (*Handler, string, error) {
	h, err := siteOf(r)
	if err != nil {
		return nil, "", err
	}
	subject, err := required(r, "subject")
	return h, subject, err
}

// serveSessions is /mcp_oauth/sessions: GET lists a user's sessions and offline access
// grant, DELETE ends one (`session=`) or all of them.
func (a *AdminAPI) serveSessions(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet, http.MethodDelete); err != nil {
		return err
	}
	h, subject, err := siteAndSubject(r)
	if err != nil {
		return err
	}
	if r.Method == http.MethodGet {
		user, err := h.broker.Sessions(r.Context(), subject)
		if err != nil {
			return apiError(http.StatusInternalServerError, "%w", err)
		}
		return writeAdminJSON(w, user)
	}
	session := r.URL.Query().Get("session")
	n, truncated, err := h.broker.EndSessions(r.Context(), subject, session)
	if err != nil {
		return apiError(http.StatusInternalServerError, "%w", err)
	}
	if n == 0 && session != "" && !truncated {
		return apiError(http.StatusNotFound, "subject %q has no session %q on this site", subject, session)
	}
	return writeAdminJSON(w, struct {
		Ended int `json:"ended"`
		// Truncated: the scan stopped at its limit; sessions it did not reach live on.
		Truncated bool `json:"truncated,omitempty"`
	}{n, truncated})
}

// serveOfflineAccess is /mcp_oauth/offline-access: GET is a user's offline access grant,
// DELETE revokes it here and at the IdP.
func (a *AdminAPI) serveOfflineAccess(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet, http.MethodDelete); err != nil {
		return err
	}
	h, subject, err := siteAndSubject(r)
	if err != nil {
		return err
	}
	var st flows.OfflineAccessStatus
	if r.Method == http.MethodGet {
		st, err = h.broker.OfflineAccess(r.Context(), subject)
	} else {
		st, err = h.broker.RevokeOfflineAccess(r.Context(), subject)
	}
	if err != nil {
		return apiError(http.StatusInternalServerError, "%w", err)
	}
	return writeAdminJSON(w, st)
}

// serveClients is /mcp_oauth/clients: GET lists the registered clients, DELETE deletes
// the one `client_id=` names.
func (a *AdminAPI) serveClients(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet, http.MethodDelete); err != nil {
		return err
	}
	h, err := siteOf(r)
	if err != nil {
		return err
	}
	if r.Method == http.MethodGet {
		clients, truncated, err := h.broker.RegisteredClients(r.Context())
		if err != nil {
			return apiError(http.StatusInternalServerError, "%w", err)
		}
		return writeAdminJSON(w, struct {
			Clients   []flows.AdminClient `json:"clients"`
			Truncated bool                `json:"truncated,omitempty"`
		}{clients, truncated})
	}
	id, err := required(r, "client_id")
	if err != nil {
		return err
	}
	ok, err := h.broker.DeleteClient(r.Context(), id)
	if err != nil {
		return apiError(http.StatusInternalServerError, "%w", err)
	}
	// Sites of this process that share the storage keep the registration in memory too.
	liveSites.forgetClient(id)
	if !ok {
		return apiError(http.StatusNotFound, "no registered client %q", id)
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// serveKeys is GET /mcp_oauth/keys: the key ring's key ids and what each still seals.
func (a *AdminAPI) serveKeys(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(r, http.MethodGet); err != nil {
		return err
	}
	h, err := siteOf(r)
	if err != nil {
		return err
	}
	usage, err := h.broker.KeyUsage(r.Context())
	if err != nil {
		return apiError(http.StatusInternalServerError, "%w", err)
	}
	return writeAdminJSON(w, usage)
}
