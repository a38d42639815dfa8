// Package oauthbroker is what `xcaddy build --with github.com/caddy-mcp/oauth-broker`
// imports: it registers the mcp_oauth module and its Caddyfile directive.
package oauthbroker

import (
	_ "github.com/caddy-mcp/oauth-broker/caddyoauthbroker"
)
