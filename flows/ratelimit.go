package flows

import (
	"net/http"

	"github.com/caddy-mcp/oauth-broker/internal/ratelimit"
)

// oneTimeValueRate is how many login states and offline access links one client address may
// present per minute. A user presents one per login; a stranger presents made-up ones,
// each costing a storage read.
const oneTimeValueRate = 60

// allowOneTimeValue takes a token of the client address's oneTimeValues bucket. When there
// is none it returns page, the caller's 429 page, to retry after the bucket refills.
func (b *Broker) allowOneTimeValue(r *http.Request, page *requestError) *requestError {
	ok, wait := b.oneTimeValues.Allow(ratelimit.Key(clientIP(r)), oneTimeValueRate, b.now())
	if ok {
		return nil
	}
	page.retryAfter = wait
	return page
}
