package idp

import "github.com/caddy-mcp/oauth-broker/internal/tokencache"

// Methods only tests call, kept out of the production files.

// cached tells whether v holds a verdict on raw that is still good.
func (v *Verifier) cached(raw string) bool {
	_, ok := v.lookup(tokencache.Key(raw), v.cfg.Now().UnixNano())
	return ok
}
