package flows

import (
	"encoding/json"
	"net/http"
	"net/url"
)

// oauthError is the RFC 6749 §5.2 error body. Descriptions are fixed, documented texts:
// never an exception message, an IdP's own description, or anything a client sent.
type oauthError struct {
	Error       string `json:"error"`
	Description string `json:"error_description,omitempty"`
}

// writeError answers with an OAuth JSON error. Every handler goes through it.
func writeError(w http.ResponseWriter, status int, code, description string) {
	writeJSON(w, status, oauthError{Error: code, Description: description})
}

// writeJSON answers with v as JSON, never cached: OAuth responses carry tokens or state.
func writeJSON(w http.ResponseWriter, status int, v any) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// redirectWithQuery adds q to target's query and answers 302.
func redirectWithQuery(w http.ResponseWriter, r *http.Request, target string, q url.Values) {
	u, err := url.Parse(target)
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request", "redirect_uri is not a valid URI")
		return
	}
	merged := u.Query()
	for k, vs := range q {
		merged[k] = vs
	}
	u.RawQuery = merged.Encode()
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, u.String(), http.StatusFound)
}
