#!/usr/bin/env bash
# The hot-path gate: BenchmarkServeHTTPWarm (caddyoauthbroker) and BenchmarkHandleWarm
# (flows) on a base commit and on the working tree, compared with benchstat.
#
#   scripts/bench-compare.sh [base-ref]
#
# The base is the merge-base of HEAD and base-ref (default ac91bd4, the last commit before
# issue 11's refactoring), built in a temporary git worktree; the other side is this
# working tree, uncommitted changes included. Each side's test binaries are built once and
# run COUNT times (default 10) in turn, base then head, so that load on the machine falls on
# both alike.
#
# It fails when a benchmark of either package is more than 5% slower (median sec/op) and
# benchstat finds the difference significant (p < 0.05; "~" means it does not), or when a
# benchmark's median allocs/op is higher at all, or its median B/op more than 1% higher.
# The geomean of each package is printed too. On a busy machine the spread of sec/op
# (the ± column) can be far above 5%: then no 5% change can be shown either way, and the
# script says so; run it on an idle machine for a verdict on time. Allocations do not
# depend on load. Not part of scripts/test.sh: it takes 10 to 20 minutes on two cores.
# The raw results stay in BENCH_OUT (default: a new folder under /tmp, printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$(go env GOPATH)/bin"
command -v benchstat >/dev/null || go install golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da

count=${COUNT:-10}
base=$(git merge-base HEAD "${1:-ac91bd4}")
head=$(git rev-parse HEAD)
work=$(mktemp -d)
out=${BENCH_OUT:-$(mktemp -d /tmp/bench-compare.XXXXXX)}
mkdir -p "$out"
cleanup() {
  git worktree remove --force "$work/base" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

dirty=""
git diff --quiet HEAD -- || dirty=" with uncommitted changes"
echo "base: $(git log -1 --format='%h %s' "$base")"
echo "head: $(git log -1 --format='%h %s' "$head")$dirty"
git worktree add --detach --quiet "$work/base" "$base"

# package:benchmark pairs
benchmarks=("caddyoauthbroker:BenchmarkServeHTTPWarm" "flows:BenchmarkHandleWarm")

for side in base head; do
  tree=.
  [ "$side" = base ] && tree="$work/base"
  for pb in "${benchmarks[@]}"; do
    pkg=${pb%%:*}
    (cd "$tree" && go test -c -o "$work/$side-$pkg.test" "./$pkg")
  done
done

start=$SECONDS
for i in $(seq "$count"); do
  printf 'run %d of %d\n' "$i" "$count"
  for side in base head; do
    tree=$PWD
    [ "$side" = base ] && tree="$work/base"
    for pb in "${benchmarks[@]}"; do
      pkg=${pb%%:*} bench=${pb#*:}
      # A test binary runs in its package's directory, as go test runs it.
      (cd "$tree/$pkg" && "$work/$side-$pkg.test" -test.run '^$' -test.bench "^$bench\$" \
        -test.benchmem -test.count 1) >>"$out/$side-$pkg.txt"
    done
  done
done
echo "benchmarks took $((SECONDS - start))s"

status=0
for pb in "${benchmarks[@]}"; do
  pkg=${pb%%:*}
  printf '\n=== %s\n' "$pkg"
  benchstat base="$out/base-$pkg.txt" head="$out/head-$pkg.txt"
  # benchstat's CSV: one table per unit, a header row naming the unit, then one row per
  # benchmark (name; base median, its spread; head median, its spread; delta or "~"; p)
  # and the geomean.
  benchstat -format csv base="$out/base-$pkg.txt" head="$out/head-$pkg.txt" 2>/dev/null |
    awk -v pkg="$pkg" '
      # Names of sub-benchmarks may hold commas: such a name comes quoted.
      {
        if (substr($0, 1, 1) == "\"") {
          i = index(substr($0, 2), "\""); name = substr($0, 2, i - 1); rest = substr($0, i + 3)
        } else {
          i = index($0, ","); name = substr($0, 1, i - 1); rest = substr($0, i + 1)
        }
        if (i == 0 || split(rest, f, ",") < 3) next
      }
      name == "" && (f[1] == "sec/op" || f[1] == "B/op" || f[1] == "allocs/op") { unit = f[1]; next }
      unit == "" || name == "" { next }
      {
        b = f[1] + 0; h = f[3] + 0
        if (name == "geomean") {
          if (unit == "sec/op") printf "%s: geomean sec/op head/base %.3f\n", pkg, h / b
          next
        }
        if (unit == "sec/op") {
          r = (b > 0) ? h / b : 1
          spread = (f[2] + 0 > f[4] + 0) ? f[2] + 0 : f[4] + 0
          printf "  %-50s sec/op head/base %.3f  (%s, spread ±%d%%)\n", name, r, f[5] == "~" ? "no significant difference" : f[5], spread
          if (r > 1.05 && f[5] != "~") { printf "FAIL %s: %s %.1f%% slower (limit 5%%)\n", pkg, name, (r - 1) * 100; bad = 1 }
          if (spread > 5) noisy = 1
        } else if (unit == "allocs/op" && h > b) {
          printf "FAIL %s: %s allocs/op %g -> %g\n", pkg, name, b, h; bad = 1
        } else if (unit == "B/op" && h > b * 1.01) {
          printf "FAIL %s: %s B/op %g -> %g\n", pkg, name, b, h; bad = 1
        }
      }
      END {
        if (noisy) printf "note: %s: the spread of sec/op is above 5%%, too wide to show a 5%% change; rerun on an idle machine for a verdict on time\n", pkg
        exit bad
      }' || status=1
done
echo "raw results: $out"
if [ "$status" = 0 ]; then
  echo "PASS: no benchmark significantly more than 5% slower, no new allocations"
fi
exit "$status"
