package flows

import (
	"net/http"
	"strconv"
	"time"

	"github.com/caddy-mcp/oauth-broker/internal/ratelimit"
)

// setRetryAfter sets Retry-After to wait in whole seconds, rounded up, at least one.
func setRetryAfter(w http.ResponseWriter, wait time.Duration) {
	w.Header().Set("Retry-After", strconv.Itoa(max(1, int((wait+time.Second-1)/time.Second))))
}

// tooManyRequests answers 429 temporarily_unavailable with Retry-After.
func tooManyRequests(w http.ResponseWriter, wait time.Duration, description string) {
	setRetryAfter(w, wait)
	writeError(w, http.StatusTooManyRequests, "temporarily_unavailable", description)
}

// oneTimeValueRate is how many login states and provisioning links one client address may
// present per minute. A user presents one per login; a stranger presents made-up ones,
// each costing a storage read.
const oneTimeValueRate = 60

// allowOneTimeValue takes a token of the client address's oneTimeValues bucket. When there
// is none it sets Retry-After and returns false: the caller answers 429 with its page.
func (b *Broker) allowOneTimeValue(w http.ResponseWriter, r *http.Request) bool {
	ok, wait := b.oneTimeValues.Allow(ratelimit.Key(clientIP(r)), oneTimeValueRate, b.now())
	if !ok {
		setRetryAfter(w, wait)
	}
	return ok
}
