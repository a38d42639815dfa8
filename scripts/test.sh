#!/usr/bin/env bash
# The whole test suite: formatting, vet, staticcheck, the race-enabled tests, the dev build,
# the xcaddy build and the example configuration. Run from anywhere: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$(go env GOPATH)/bin"
step() { printf '\n=== %s\n' "$*"; }

# Set up what the tests need when it is missing, so this one command passes on a fresh machine
# that has Go, Node 20 and gcc: Go tools at pinned versions, the interop npm packages (Node 22
# among them), Debian's chromium and Debian's redis-server (installed when running as root,
# else named). The tests start redis-server processes of their own; no service is started.
step "setup"
command -v staticcheck >/dev/null || go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
command -v xcaddy >/dev/null || go install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
  else
    echo "${missing[*]} missing: run 'sudo apt-get install -y ${missing[*]}' (Debian), then this script again"
    exit 1
  fi
fi
# Debian's package starts a system service; the tests never use it, so stop it if it runs.
if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
  systemctl stop redis-server || true
fi
redis-server --version
if [ ! -e interop/node_modules/.package-lock.json ] || [ interop/package-lock.json -nt interop/node_modules/.package-lock.json ]; then
  (cd interop && npm ci --no-audit --no-fund)
fi
interop/node_modules/.bin/node --version | grep -q '^v22\.' || { echo "interop: Node 22 missing after npm ci"; exit 1; }
echo "staticcheck, xcaddy, chromium, redis-server and the interop packages are there"

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
./caddy list-modules | grep -x caddy.storage.mcp_oauth_redis
# The examples: each adapts, is formatted as `caddy fmt` writes it, and validates (which
# provisions the module) with the secrets it names, and no IdP reachable.
example=$(mktemp -d)
head -c 32 /dev/urandom | base64 >"$example/key"
secrets=(MCP_BROKER_CLIENT_ID=mcp-broker MCP_BROKER_CLIENT_SECRET=secret MCP_BACKGROUND_SECRET=secret
  XDG_DATA_HOME="$example" XDG_CONFIG_HOME="$example")
for f in docs/examples/*.Caddyfile Caddyfile.example; do
  ./caddy adapt --config "$f" >/dev/null
  ./caddy fmt --diff "$f" >"$example/out" 2>&1 || { cat "$example/out"; echo "$f: not as caddy fmt writes it"; exit 1; }
  sed "s#/etc/caddy/mcp_oauth.key#$example/key#" "$f" >"$example/Caddyfile"
  env "${secrets[@]}" ./caddy validate --config "$example/Caddyfile" --adapter caddyfile 2>/dev/null | grep -x "Valid configuration"
  echo "$f adapts, is formatted and validates"
done
sed "s#/etc/caddy/mcp_oauth.key#$example/key#; s#/var/lib/caddy#$example/storage#" docs/examples/config.json >"$example/config.json"
env "${secrets[@]}" ./caddy validate --config "$example/config.json" 2>/dev/null | grep -x "Valid configuration"
echo "docs/examples/config.json validates"
sed "s#/etc/caddy/mcp_oauth.key#$example/key#" Caddyfile.example >"$example/Caddyfile"
echo "c2hvcnQ=" >"$example/key" # 5 bytes: refused at load, naming the field
if MCP_BROKER_CLIENT_ID=mcp-broker XDG_DATA_HOME="$example" XDG_CONFIG_HOME="$example" \
  ./caddy validate --config "$example/Caddyfile" --adapter caddyfile >"$example/out" 2>&1; then
  echo "caddy validate accepted a 5-byte key"; exit 1
fi
grep -q "encryption_keys\[0\]: want 32 bytes of base64, got 5" "$example/out" || { cat "$example/out"; exit 1; }
echo "a short key is refused naming encryption_keys[0]"
rm -rf "$example"

step "demo (the README's run command) answers with the discovery challenge"
scripts/demo-smoke.sh

step "xcaddy build (offline form from xcaddy.md)"
scripts/xcaddy-build.sh

step "go test -race"
export MCP_OAUTH_CADDY="$PWD/caddy"  # the e2e tests run this binary
go test -race -count=1 -timeout 20m ./...

step "fuzz: every target for a few seconds (scripts/fuzz.sh SECONDS runs them longer)"
scripts/fuzz.sh 3
