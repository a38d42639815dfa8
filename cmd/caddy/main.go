// Command caddy is a development build of Caddy with the standard modules, mcp_oauth and
// the mcp_oauth_redis storage.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-mcp/oauth-broker/caddyoauthbroker"
	_ "github.com/caddy-mcp/oauth-broker/redisstorage"
)

func main() {
	caddycmd.Main()
}
