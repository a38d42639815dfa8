package flows

import (
	"context"
	"fmt"

	"github.com/caddy-mcp/oauth-broker/idp"
)

// checkIdPResponseIssuer applies RFC 9207 §2.4 to an authorization response of the IdP
// (iss "" when absent) before the broker acts on it, an error response included: a
// response that may come from another authorization server is neither redeemed nor
// reported (SECURITY.md S1.25). Errors wrap idp.ErrUnavailable when the IdP's discovery
// document cannot be had.
func (b *Broker) checkIdPResponseIssuer(ctx context.Context, iss string) error {
	d, err := b.idp.Discovery(ctx)
	if err != nil {
		return fmt.Errorf("%w: %w", idp.ErrUnavailable, err)
	}
	return d.CheckAuthorizationResponseIssuer(iss)
}
