// Package oauthbroker is what `xcaddy build --with github.com/caddy-mcp/oauth-broker`
// imports: it registers the mcp_oauth module and its Caddyfile directive, and the
// mcp_oauth_redis storage module.
package oauthbroker

import (
	_ "github.com/caddy-mcp/oauth-broker/caddyoauthbroker"
	_ "github.com/caddy-mcp/oauth-broker/redisstorage"
)
