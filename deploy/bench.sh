#!/usr/bin/env bash
# Measures jetsaga with its own load generator: starts the whole system from an
# empty store (deploy/run-local.sh --fresh), runs `jetsaga bench` with the given
# arguments three times, prints each result and the medians, then stops
# everything it started.
#
#   deploy/bench.sh --sagas 20000 --concurrency 512            saturation
#   deploy/bench.sh --rate 500 --duration 30s                  latency at a fixed rate
#   deploy/bench.sh --sync-always --sagas 5000 --concurrency 256
#   RUNS=5 deploy/bench.sh ...                                 more runs
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
runs="${RUNS:-3}"
system_args=(--no-demo --fresh)
bench_args=()
for arg in "$@"; do
  case "$arg" in
    --sync-always) system_args+=(--sync-always) ;;
    *) bench_args+=("$arg") ;;
  esac
done

log="$root/.tools/run/bench-system.log"
mkdir -p "$root/.tools/run"
deploy/run-local.sh "${system_args[@]}" >"$log" 2>&1 &
system=$!
stop() {
  kill -TERM "$system" 2>/dev/null || true
  wait "$system" 2>/dev/null || true
}
trap stop EXIT INT TERM

for _ in $(seq 1 3000); do
  grep -q "jetsaga is running" "$log" 2>/dev/null && break
  if ! kill -0 "$system" 2>/dev/null; then
    echo "bench: the system did not start:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.2
done

results=()
for run in $(seq 1 "$runs"); do
  echo "==> run $run/$runs: jetsaga bench ${bench_args[*]}"
  line="$("$root/target/release/jetsaga" bench "${bench_args[@]}" --json 2>/dev/null | tail -n 1)"
  echo "$line"
  results+=("$line")
done

printf '%s\n' "${results[@]}" | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.strip().startswith("{")]
if not rows:
    sys.exit("bench: no results")
med = lambda f: statistics.median(f(r) for r in rows)
print("median of %d runs: throughput %.0f sagas/s, offered %.0f/s, p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms" % (
    len(rows), med(lambda r: r["throughput_per_s"]), med(lambda r: r["offered_per_s"]),
    med(lambda r: r["latency_ms"]["p50"]), med(lambda r: r["latency_ms"]["p90"]),
    med(lambda r: r["latency_ms"]["p99"]), med(lambda r: r["latency_ms"]["max"])))
bad = [r for r in rows if r["unfinished"] or r["failed"] or r["compensated"] != r["declined"]]
if bad:
    sys.exit("bench: %d runs had unfinished, failed or mismatched sagas" % len(bad))
'
