#!/usr/bin/env bash
# Throughput of Caddy with mcp_oauth against Caddy's reverse_proxy alone, through the real
# caddy binary in the same run (warm token, delegated token cached), then the per-request
# cost of the broker's own code. The budget: a ratio of at least 0.90, the broker costing
# less than a tenth of the proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(go test -run '^$' -bench 'BenchmarkProxy' -benchtime "${BENCHTIME:-3s}" -count "${COUNT:-3}" ./e2e)
echo "$out" | grep Benchmark
echo "$out" | awk '
	/BenchmarkProxy\/reverse_proxy/ { base += $3; cb += $5; nb++ }
	/BenchmarkProxy\/mcp_oauth/     { with += $3; cw += $5; nw++ }
	END {
		if (nb == 0 || nw == 0) { print "no results"; exit 1 }
		b = base / nb; w = with / nw
		printf "wall time:  reverse_proxy alone %.1f µs/request; with mcp_oauth %.1f µs/request\n", b / 1000, w / 1000
		printf "caddy CPU:  reverse_proxy alone %.1f µs/request; with mcp_oauth %.1f µs/request (+%.1f)\n", cb / nb, cw / nw, cw / nw - cb / nb
		printf "throughput ratio by wall time: %.3f; by caddy CPU: %.3f  (budget: >= 0.90)\n", b / w, (cb / nb) / (cw / nw)
	}'
go test -run '^$' -bench 'BenchmarkHandleWarm' -benchmem ./flows | grep Benchmark
