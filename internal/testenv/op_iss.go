package testenv

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"

	"github.com/zitadel/oidc/v3/pkg/oidc"
)

// WithAuthorizationResponseIssuer makes the OP implement RFC 9207, which zitadel's does
// not: its discovery document sets authorization_response_iss_parameter_supported, and
// every authorization response (a redirect to a client carrying state with a code or an
// error) carries iss, the OP's issuer. The OP itself is unchanged; a wrapper around it
// rewrites those two responses, so this is a stand-in for an OP that does it natively.
func WithAuthorizationResponseIssuer() OPOption {
	return func(c *opConfig) { c.issParameter = true }
}

// serveWithIssParameter serves r with next and adds RFC 9207's pieces to its answer.
func (o *OP) serveWithIssParameter(w http.ResponseWriter, r *http.Request, next http.Handler) {
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, r)
	body := rec.Body.Bytes()
	if r.URL.Path == oidc.DiscoveryEndpoint && rec.Code == http.StatusOK {
		var doc map[string]any
		if json.Unmarshal(body, &doc) == nil {
			doc["authorization_response_iss_parameter_supported"] = true
			body, _ = json.Marshal(doc)
			rec.Header().Set("Content-Length", strconv.Itoa(len(body)))
		}
	}
	if loc, err := url.Parse(rec.Header().Get("Location")); err == nil && rec.Code/100 == 3 && !o.serves(loc) {
		if q := loc.Query(); q.Has("state") && (q.Has("code") || q.Has("error")) {
			q.Set("iss", o.Issuer)
			loc.RawQuery = q.Encode()
			rec.Header().Set("Location", loc.String())
		}
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(body)
}
