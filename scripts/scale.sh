#!/usr/bin/env bash
# The scale figures of BENCHMARKS.md, through the real caddy binary (e2e/long_scale_test.go,
# build tag long):
#   (a) the warm path: reverse_proxy alone, mcp_oauth hybrid and progressive, and
#       oauth2-proxy v7.15.6 when installed (OAUTH2_PROXY, default $GOPATH/bin), interleaved in
#       ROUNDS rounds (default 7), each warmed up (WARMUP requests, default 2000) before it is
#       measured (REQUESTS, default 20000, CONCURRENCY goroutines, default 8); medians,
#       ranges, throughput ratios and caddy's added CPU per request; with BASE_CADDY, a
#       second caddy binary's hybrid and progressive join the same rounds (before and after
#       in one run); with TOGETHER=1, each round loads every configuration at once;
#   (b) the login path: LOGINS full hybrid logins (default 300) on a shared folder and on
#       Redis; caddy's CPU per login, the broker's own part;
#   (c) the heap of one caddy process after 5000, 10000 and 20000 distinct valid JWTs seen
#       (progressive mode, delegation none): bytes per cached verdict, and the cache's bound;
#       and in hybrid mode on Redis with SESSIONS users logged in (default 100000), then one
#       MCP request each: bytes per active session, and the bound (TestScaleSessions);
#   (d) how long a revocation on one node takes to reach the others
#       (TestThreeInstancesOneUser's log, on a shared folder and on Redis).
#
#   scripts/scale.sh
#
# The redis-server is the script's own, as in scripts/soak.sh. MCP_OAUTH_CADDY names a caddy
# binary to use instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."

long_run=scale
# shellcheck source=scripts/long-run-setup.sh
. scripts/long-run-setup.sh

# oauth2-proxy joins (a) when installed: go install github.com/oauth2-proxy/oauth2-proxy/v7@v7.15.6
oauth2_proxy=${OAUTH2_PROXY:-$(go env GOPATH)/bin/oauth2-proxy}
if [ ! -x "$oauth2_proxy" ]; then
  echo "oauth2-proxy not found at $oauth2_proxy: (a) runs without it"
  oauth2_proxy=""
fi

echo "scale: $(nproc) cores; $(date -u +'%Y-%m-%d %H:%M UTC'); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
status=0
SOAK_REDIS="127.0.0.1:$port" SCALE_ROUNDS="${ROUNDS:-7}" SCALE_WARMUP="${WARMUP:-2000}" \
  SCALE_REQUESTS="${REQUESTS:-20000}" SCALE_CONCURRENCY="${CONCURRENCY:-8}" SCALE_LOGINS="${LOGINS:-300}" \
  SCALE_SESSIONS="${SESSIONS:-100000}" \
  SCALE_OAUTH2_PROXY="$oauth2_proxy" MCP_OAUTH_CADDY="$caddy" SCALE_BASE_CADDY="${BASE_CADDY:-}" \
  SCALE_TOGETHER="${TOGETHER:-}" \
  go test -tags long -run '^(TestScaleWarmPath|TestScaleLogins|TestScaleHeap|TestScaleSessions)$' -count=1 -timeout 3h -v ./e2e/ >"$work/out.txt" 2>&1 || status=$?
grep -E '^\s+long_scale_test\.go:[0-9]+:' "$work/out.txt" | sed -E 's/^\s+long_scale_test\.go:[0-9]+: /  /' || true
echo "load after (a), (b), (c): $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$status" != 0 ]; then
  tail -40 "$work/out.txt"
  echo "FAIL: scale (go test exit $status)"
  exit "$status"
fi

echo "(d) revocation on A, refused by B and C after:"
MCP_OAUTH_CADDY="$caddy" go test -run '^TestThreeInstancesOneUser$' -count=1 -v ./e2e/ 2>&1 |
  awk '/^=== (RUN|NAME|CONT)/ { name = $3 }
       /refused the revoked token after/ { sub(/^ +cluster_three_test\.go:[0-9]+: /, ""); print "  " name ": " $0 }
       /^(ok|FAIL)/ { print }'
