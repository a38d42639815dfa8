#!/usr/bin/env bash
# Starts the demo the way the README says, checks that the MCP endpoint answers 401 with the
# discovery challenge and that the metadata names the broker as authorization server, then stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
port=$(( 20000 + RANDOM % 20000 ))
log=$(mktemp)
go build -o "$log.bin" ./cmd/demo
"$log.bin" -port "$port" -data "$(mktemp -d)" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log" "$log.bin"' EXIT
for _ in $(seq 1 50); do grep -q "MCP URL" "$log" && break; sleep 0.2; done
grep -q "MCP URL" "$log" || { cat "$log"; echo "demo did not start"; exit 1; }
headers=$(curl -s -o /dev/null -D - "http://127.0.0.1:$port/mcp")
echo "$headers" | grep -q "^HTTP/1.1 401" || { echo "$headers"; exit 1; }
echo "$headers" | grep -qi "^WWW-Authenticate: Bearer resource_metadata=\"http://127.0.0.1:$port/.well-known/oauth-protected-resource/mcp\"" || { echo "$headers"; exit 1; }
broker="http://127.0.0.1:$port"
curl -s "$broker/.well-known/oauth-protected-resource/mcp" | grep -q "\"authorization_servers\":\[\"$broker\"\]"
curl -s "$broker/.well-known/oauth-authorization-server" | grep -q "\"registration_endpoint\":\"$broker/oauth/register\""
echo "demo answers on port $port with the challenge; it is its own authorization server with registration"
