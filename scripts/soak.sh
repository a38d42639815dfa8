#!/usr/bin/env bash
# The soak of RELIABILITY.md: three caddy processes (cmd/caddy) on one Redis in front of one
# MCP upstream take REQUESTS proxied MCP calls on warm sessions (default 200000) while
# LOGINS full hybrid logins run beside them (default 5000); e2e/long_soak_test.go (build tag
# long) drives them. It fails on any error, on a node whose heap after GC at the end is
# above 1.1x its heap after the warm-up, on goroutines not back to their number after the
# warm-up, and on records in Redis not back to their floor once their TTLs have passed.
#
#   REQUESTS=200000 LOGINS=5000 scripts/soak.sh
#
# More knobs, passed on to the test: WORKERS (warm MCP sessions, default 8), LOGIN_WORKERS
# (login loops, default 2), TTL (sessions, tokens; default 60s). The redis-server is the
# script's own: a free loopback port, its data in a temporary folder, no persistence,
# stopped at exit. MCP_OAUTH_CADDY names a caddy binary to use instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."

long_run=soak
# shellcheck source=scripts/long-run-setup.sh
. scripts/long-run-setup.sh

echo "soak: REQUESTS=${REQUESTS:-200000} LOGINS=${LOGINS:-5000} on $(nproc) cores; $(date -u +'%Y-%m-%d %H:%M UTC'); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
status=0
SOAK_REDIS="127.0.0.1:$port" SOAK_REQUESTS="${REQUESTS:-200000}" SOAK_LOGINS="${LOGINS:-5000}" \
  SOAK_WORKERS="${WORKERS:-8}" SOAK_LOGIN_WORKERS="${LOGIN_WORKERS:-2}" SOAK_TTL="${TTL:-60s}" SOAK_PROFILES="${PROFILES:-}" \
  MCP_OAUTH_CADDY="$caddy" \
  go test -tags long -run '^TestSoak$' -count=1 -timeout 3h -v ./e2e/ >"$work/out.txt" 2>&1 || status=$?
# The test's figures (its t.Log lines), then its failures, if any.
grep -E '^\s+long_soak_test\.go:[0-9]+:' "$work/out.txt" | sed -E 's/^\s+long_soak_test\.go:[0-9]+: /  /' || true
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$status" != 0 ]; then
  grep -vE '^\s+long_soak_test\.go:[0-9]+:' "$work/out.txt" | tail -40
  echo "FAIL: soak (go test exit $status)"
  exit "$status"
fi
echo "PASS: soak"
