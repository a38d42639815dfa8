#!/usr/bin/env bash
# Runs every fuzz target of the module for SECONDS each (default 10), one after another:
#   scripts/fuzz.sh 600        # a long run; record its result in RELIABILITY.md
# A failure leaves the input under the package's testdata/fuzz/<target>/; `go test` then
# replays it on every run until it is fixed. scripts/test.sh runs this with a few seconds;
# RELIABILITY.md records the long runs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
targets=$(grep -rl --include='*_test.go' '^func Fuzz' . | sort | while read -r f; do
  dir=$(dirname "$f")
  grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | sed "s#^func #$dir #"
done)
[ -n "$targets" ] || { echo "fuzz: no targets found"; exit 1; }
while read -r dir target; do
  printf '=== %s %s (%ss)\n' "$dir" "$target" "$seconds"
  go test -run '^$' -fuzz "^${target}\$" -fuzztime "${seconds}s" "$dir"
done <<<"$targets"
