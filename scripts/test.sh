#!/usr/bin/env bash
# The whole test suite: formatting, vet, staticcheck, the race-enabled tests, the dev build,
# the xcaddy build and the example configuration. Run from anywhere: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$(go env GOPATH)/bin"
step() { printf '\n=== %s\n' "$*"; }

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then echo "gofmt would change:"; echo "$unformatted"; exit 1; fi

step "go vet"
go vet ./...

step "staticcheck"
staticcheck ./...

step "dev build"
go build -o ./caddy ./cmd/caddy
./caddy list-modules | grep -x http.handlers.mcp_oauth
./caddy adapt --config Caddyfile.example >/dev/null
echo "Caddyfile.example adapts"

step "demo (the README's run command) answers with the discovery challenge"
scripts/demo-smoke.sh

step "xcaddy build (offline form from xcaddy.md)"
scripts/xcaddy-build.sh

step "go test -race"
export MCP_OAUTH_CADDY="$PWD/caddy"  # the e2e tests run this binary
go test -race -count=1 -timeout 20m ./...
