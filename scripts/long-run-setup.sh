# Sourced by scripts/soak.sh and scripts/scale.sh: a work folder, a caddy binary and a
# redis-server of the run's own, all gone at exit. Sets work, caddy, port and redis_pid.
# MCP_OAUTH_CADDY names a caddy binary to use instead of building one.
work=$(mktemp -d "/tmp/mcp_oauth-${long_run:-run}.XXXXXX")
redis_pid=""
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

command -v redis-server >/dev/null || { echo "redis-server is missing (apt-get install -y redis-server)" >&2; exit 1; }

caddy=${MCP_OAUTH_CADDY:-}
if [ -z "$caddy" ]; then
  caddy="$work/caddy"
  go build -o "$caddy" ./cmd/caddy
fi

# A free port: redis-server refuses one that is taken, so try a few. No persistence, no
# eviction, its data in the work folder.
for _ in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 40000))
  redis-server --bind 127.0.0.1 --port "$port" --dir "$work" --save '' --appendonly no \
    --maxmemory-policy noeviction --logfile "$work/redis.log" &
  redis_pid=$!
  for _ in $(seq 50); do
    if redis-cli -p "$port" ping >/dev/null 2>&1; then break 2; fi
    kill -0 "$redis_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
  redis_pid=""
done
[ -n "$redis_pid" ] || { echo "could not start redis-server" >&2; exit 1; }
