#!/usr/bin/env bash
# Builds Caddy with this module the way xcaddy.md tells users to, and checks the module is in it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$(go env GOPATH)/bin"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
xcaddy build v2.11.9 --with github.com/caddy-mcp/oauth-broker@v0.0.0=./ --output "$out/caddy"
"$out/caddy" list-modules | grep -x http.handlers.mcp_oauth
"$out/caddy" list-modules | grep -x caddy.storage.mcp_oauth_redis
