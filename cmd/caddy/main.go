// Command caddy is a development build of Caddy with the standard modules and mcp_oauth.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-mcp/oauth-broker/caddyoauthbroker"
)

func main() {
	caddycmd.Main()
}
