#!/usr/bin/env bash
# Measures jetsaga with its own load generator (`jetsaga bench`) on a system started by
# deploy/run-local.sh, and stops everything it started (checked by process id) at the end.
# Every run reports, besides throughput and latency, the CPU time each process spent per saga
# (utime + stime from /proc/<pid>/stat of nats-server, the orchestrator and each participant).
#
#   deploy/bench.sh [BENCH ARGS]                   RUNS (default 3) runs on one fresh system, medians
#       deploy/bench.sh --sagas 20000 --concurrency 512
#       deploy/bench.sh --rate 500 --duration 30s
#   deploy/bench.sh --growth N [--step S] [--idle SECS] [BENCH ARGS]
#                                                  one store, `--sagas S` (default 100000) again and
#                                                  again until N sagas; per step: throughput, RSS,
#                                                  subjects, messages, bytes and disk; SECS idle
#                                                  before a last reading (the server frees memory
#                                                  only at its 2-minute forced GC: use >= 150)
#   deploy/bench.sh --compare REV [BENCH ARGS]     builds REV (release, in .tools/compare/<commit>),
#                                                  runs base and current alternately, RUNS each, each
#                                                  on a fresh system; medians and current/base ratios
#
# Options of every mode: --sync-always (nats-server fsyncs every write), --json (one JSON object
# with every figure on the last line), --participants builtin (the system without its reference
# participants; `jetsaga bench` answers the commands itself with trivial in-process participants,
# whose CPU then counts as the load generator's), --ttl D (every per-saga TTL set to D: a
# finished saga's journal record, replies, and the inventory, payment and notification records;
# so a growth run longer than D shows the steady state of a store that keeps D of sagas),
# --finished-retention D (a finished saga's journal record alone kept for D, whatever --ttl says:
# so a growth run with a short --ttl and a long D measures what one kept saga costs),
# --listing-max-finished N (the orchestrator's saga listing holds at most N finished sagas). Other
# arguments go to `jetsaga bench`. Exits non-zero with
# a message when the system does not start, a process dies, or a run has unfinished, failed or
# mismatched sagas.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
runs="${RUNS:-3}"
state="$root/.tools/run"
export JETSAGA_LOCAL_NATS_PORT="${JETSAGA_LOCAL_NATS_PORT:-4222}"
export JETSAGA_LOCAL_MONITOR_PORT="${JETSAGA_LOCAL_MONITOR_PORT:-8222}"
nats_url="nats://127.0.0.1:$JETSAGA_LOCAL_NATS_PORT"
monitor_url="http://127.0.0.1:$JETSAGA_LOCAL_MONITOR_PORT"
# The processes whose CPU and memory are measured, by their pid file in $state.
processes=(nats-server orchestrator inventory payment notification)
clk_tck="$(getconf CLK_TCK)"

die() {
  echo "bench: $*" >&2
  exit 1
}
whole() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 needs a whole number, not '$2'"; }

mode=runs
growth_total=0
step=100000
idle=0
compare_rev=""
ttl=""
finished_retention=""
listing_max_finished=""
json=false
system_args=(--no-demo --fresh)
bench_args=()
growth_only=()
while (($#)); do
  case "$1" in
    --growth | --step | --idle | --compare)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --growth) mode=growth; whole "$1" "$2"; growth_total="$2" ;;
        --step) whole "$1" "$2"; step="$2"; growth_only+=("$1") ;;
        --idle) whole "$1" "$2"; idle="$2"; growth_only+=("$1") ;;
        --compare) mode=compare; compare_rev="$2" ;;
      esac
      shift ;;
    --json) json=true ;;
    --sync-always) system_args+=(--sync-always) ;;
    --ttl)
      (($# >= 2)) || die "$1 needs a value"
      [[ "$2" =~ ^[0-9]+(s|m|h|d)$ ]] || die "--ttl needs a duration like 90s, 5m or 1h, not '$2'"
      ttl="$2"
      shift ;;
    --finished-retention)
      (($# >= 2)) || die "$1 needs a value"
      [[ "$2" =~ ^[0-9]+(s|m|h|d)$ ]] || die "--finished-retention needs a duration like 90s, 5m or 1h, not '$2'"
      finished_retention="$2"
      shift ;;
    --listing-max-finished)
      (($# >= 2)) || die "$1 needs a value"
      [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--listing-max-finished needs a whole number of sagas, not '$2'"
      listing_max_finished="$2"
      shift ;;
    --participants)
      (($# >= 2)) || die "$1 needs a value"
      case "$2" in
        builtin) system_args+=(--no-participants); processes=(nats-server orchestrator) ;;
        reference) ;;
        *) die "--participants is reference or builtin, not '$2'" ;;
      esac
      bench_args+=("$1" "$2")
      shift ;;
    -h | --help) sed -n '2,31p' "$0"; exit 0 ;;
    *) bench_args+=("$1") ;;
  esac
  shift
done
whole RUNS "$runs"
((runs >= 1)) || die "RUNS must be at least 1"
if [[ $mode == growth ]]; then
  ((growth_total >= 1 && step >= 1)) || die "--growth and --step need at least 1 saga"
  for arg in "${bench_args[@]}"; do
    case "$arg" in
      --sagas | --rate | --duration) die "--growth sets the sagas per step itself (--step); drop $arg" ;;
    esac
  done
fi
if [[ $compare_rev != "" && $growth_total != 0 ]]; then die "--growth and --compare do not combine"; fi
if [[ $mode != growth ]] && ((${#growth_only[@]})); then die "${growth_only[0]} only goes with --growth"; fi

work="$(mktemp -d)"
if [[ -n "$ttl$finished_retention$listing_max_finished" ]]; then
  # Config files for run-local.sh (JETSAGA_LOCAL_CONFIG_DIR): every per-saga TTL set to $ttl,
  # then the finished saga's journal record to $finished_retention.
  mkdir -p "$work/config"
  : >"$work/config/orchestrator.toml"
  if [[ -n "$ttl" ]]; then
    printf '[streams]\ncommand-ttl = "%s"\n' "$ttl" >"$work/config/orchestrator.toml"
    for p in inventory payment; do
      printf '[consumer]\nreply-ttl = "%s"\n[%s]\nrecord-ttl = "%s"\n' "$ttl" "$p" "$ttl" >"$work/config/$p.toml"
    done
    printf '[notification]\nrecord-ttl = "%s"\n' "$ttl" >"$work/config/notification.toml"
  else
    printf '[streams]\n' >"$work/config/orchestrator.toml"
  fi
  if [[ -n "$finished_retention$ttl" ]]; then
    printf 'finished-retention = "%s"\n' "${finished_retention:-$ttl}" >>"$work/config/orchestrator.toml"
  fi
  if [[ -n "$listing_max_finished" ]]; then
    printf '[engine]\nlisting-max-finished = %s\n' "$listing_max_finished" >>"$work/config/orchestrator.toml"
  fi
  export JETSAGA_LOCAL_CONFIG_DIR="$work/config"
fi
system=""
loadgen=""
finish() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n "$loadgen" ]]; then
    kill -TERM "$loadgen" 2>/dev/null || true
    wait "$loadgen" 2>/dev/null || true
  fi
  stop_system || status=1
  for port in "$JETSAGA_LOCAL_NATS_PORT" "$JETSAGA_LOCAL_MONITOR_PORT" 8080 9101 9102 9103 \
    "${JETSAGA_LOCAL_PROMETHEUS_PORT:-9090}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "bench: warning: 127.0.0.1:$port still accepts connections (not a process this run started)" >&2
    fi
  done
  rm -rf "$work"
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT TERM

# The number crunching: `py COMMAND ARGS…` (standard library only).
read -r -d '' PY <<'PY' || true
import json, os, re, statistics, sys, urllib.request

PROCESSES = os.environ["BENCH_PROCESSES"].split()
CLK_TCK = int(os.environ["BENCH_CLK_TCK"])
MB = 1024 * 1024

def fail(message):
    sys.exit("bench: " + message)

def load(path):
    with open(path) as f:
        return json.load(f)

def proc_reading(name, state):
    """CPU seconds (utime + stime) and VmRSS bytes of the process named by state/NAME.pid."""
    try:
        with open(os.path.join(state, name + ".pid")) as f:
            pid = int(f.read().strip())
        with open("/proc/%d/stat" % pid) as f:
            # The command name in field 2 may hold spaces: split after its closing parenthesis.
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/%d/status" % pid) as f:
            rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    except (OSError, ValueError, StopIteration) as e:
        fail("%s is not running (%s); see .tools/run/logs/%s.log" % (name, e, name))
    # fields[0] is field 3 of stat (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, rss

def streams(monitor):
    try:
        with urllib.request.urlopen(monitor + "/jsz?streams=true", timeout=30) as r:
            jsz = json.load(r)
    except OSError as e:
        fail("cannot read %s/jsz: %s" % (monitor, e))
    out = {}
    for account in jsz.get("account_details") or []:
        for s in account.get("stream_detail") or []:
            st = s.get("state", {})
            out[s["name"]] = {"subjects": st.get("num_subjects", 0),
                              "messages": st.get("messages", 0), "bytes": st.get("bytes", 0)}
    return dict(sorted(out.items()))

def disk_bytes(path):
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass  # a block file removed while we walk
    return total

def snapshot(state, monitor=None, store=None):
    """Usage: snapshot STATE [MONITOR_URL STORE_DIR] -> JSON of CPU, RSS (and streams, disk)."""
    cpu, rss = {}, {}
    for name in PROCESSES:
        cpu[name], rss[name] = proc_reading(name, state)
    out = {"cpu_s": cpu, "rss_bytes": rss}
    if monitor:
        out["streams"] = streams(monitor)
        out["disk_bytes"] = disk_bytes(store)
    print(json.dumps(out))

def children_cpu_s(times_output):
    """CPU seconds of the children waited for, from the second line of bash's `times`."""
    with open(times_output) as f:
        line = f.read().splitlines()[1]
    return sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", line))

def record(label, before, after, output, times_before, times_after, dest):
    """Joins the snapshots around a run with the bench's JSON line into one record."""
    before, after = load(before), load(after)
    report = None
    with open(output) as f:
        for line in f:
            if line.strip().startswith("{"):
                report = json.loads(line)
    if report is None:
        fail("%s: the bench printed no JSON report" % label)
    n = max(report["sagas"], 1)
    cpu = {p: (after["cpu_s"][p] - before["cpu_s"][p]) * 1e6 / n for p in PROCESSES}
    cpu["total"] = sum(cpu.values())
    loadgen = children_cpu_s(times_after) - children_cpu_s(times_before)
    rec = {"label": label, "report": report, "cpu_us_per_saga": cpu,
           "loadgen_cpu_us_per_saga": loadgen * 1e6 / n,
           "rss_bytes": after["rss_bytes"]}
    for key in ("streams", "disk_bytes"):
        if key in after:
            rec[key] = after[key]
    with open(dest, "w") as f:
        json.dump(rec, f)
    print(label + ": " + line_of(rec))

def cpu_text(cpu, loadgen):
    parts = ", ".join("%s %.0f" % (p, cpu[p]) for p in PROCESSES)
    return "CPU µs/saga: %s = total %.0f (load generator %.0f)" % (parts, cpu["total"], loadgen)

def line_of(r):
    rep, l = r["report"], r["report"]["latency_ms"]
    return ("%.0f sagas/s (offered %.0f/s), latency ms p50 %.1f p90 %.1f p99 %.1f max %.1f; %s"
            % (rep["throughput_per_s"], rep["offered_per_s"], l["p50"], l["p90"], l["p99"], l["max"],
               cpu_text(r["cpu_us_per_saga"], r["loadgen_cpu_us_per_saga"])))

def median_of(records):
    med = lambda f: statistics.median(f(r) for r in records)
    lat = lambda k: med(lambda r: r["report"]["latency_ms"][k])
    return {
        "runs": len(records),
        "throughput_per_s": med(lambda r: r["report"]["throughput_per_s"]),
        "offered_per_s": med(lambda r: r["report"]["offered_per_s"]),
        "latency_ms": {k: lat(k) for k in ("p50", "p90", "p99", "max")},
        "cpu_us_per_saga": {p: med(lambda r: r["cpu_us_per_saga"][p]) for p in PROCESSES + ["total"]},
        "loadgen_cpu_us_per_saga": med(lambda r: r["loadgen_cpu_us_per_saga"]),
    }

def median_line(m):
    l = m["latency_ms"]
    return ("median of %d runs: throughput %.0f sagas/s, offered %.0f/s, p50 %.1f ms, p90 %.1f ms, "
            "p99 %.1f ms, max %.1f ms; %s" % (m["runs"], m["throughput_per_s"], m["offered_per_s"],
            l["p50"], l["p90"], l["p99"], l["max"], cpu_text(m["cpu_us_per_saga"],
            m["loadgen_cpu_us_per_saga"])))

def medians(as_json, *files):
    records = [load(f) for f in files]
    m = median_of(records)
    print(median_line(m))
    if as_json == "true":
        print(json.dumps({"mode": "runs", "runs": records, "median": m}))

def growth_row(file, stored, first):
    r = load(file)
    rep, rss = r["report"], r["rss_bytes"]
    subjects = sum(s["subjects"] for s in r["streams"].values())
    if first == "true":
        print("%5s %9s %8s %8s %22s %12s %12s %10s %9s %9s %9s" % ("step", "stored", "sagas/s",
              "p99 ms", "CPU µs/saga total/nats", "nats RSS MB", "orch RSS MB", "subjects",
              "subj/saga", "disk MB", "disk/saga"))
    stored = int(stored)
    print("%5s %9d %8.0f %8.1f %16.0f/%5.0f %12.1f %12.1f %10d %9.2f %9.1f %8.0fB" % (
        r["label"], stored, rep["throughput_per_s"], rep["latency_ms"]["p99"],
        r["cpu_us_per_saga"]["total"], r["cpu_us_per_saga"]["nats-server"],
        rss["nats-server"] / MB, rss["orchestrator"] / MB, subjects,
        subjects / stored, r["disk_bytes"] / MB, r["disk_bytes"] / stored))
    for name, s in r["streams"].items():
        print("%5s   %-24s %10d subjects %10d messages %10.1f MB" % ("", name, s["subjects"],
              s["messages"], s["bytes"] / MB))
    sys.stdout.flush()

def growth_summary(as_json, idle_s, idle_file, *files):
    steps = [load(f) for f in files]
    stored, total = [], 0
    for s in steps:
        total += s["report"]["sagas"]
        stored.append(total)
        s["stored"] = total
        s["subjects_total"] = sum(x["subjects"] for x in s["streams"].values())
    first, last = steps[0], steps[-1]
    summary = {"stored": total, "steps": len(steps),
               "subjects_per_saga": last["subjects_total"] / total,
               "disk_bytes_per_saga": last["disk_bytes"] / total}
    print("summary over %d steps, %d sagas stored:" % (len(steps), total))
    if len(steps) >= 2:
        d = stored[-1] - stored[0]
        growth = {p: (last["rss_bytes"][p] - first["rss_bytes"][p]) / d for p in ("nats-server", "orchestrator")}
        share = 100 * last["report"]["throughput_per_s"] / first["report"]["throughput_per_s"]
        orch = 100 * (last["rss_bytes"]["orchestrator"] / first["rss_bytes"]["orchestrator"] - 1)
        summary.update({"rss_growth_bytes_per_saga": growth, "last_step_throughput_pct_of_first": share,
                        "orchestrator_rss_change_pct": orch})
        print("  nats-server RSS %.1f MB -> %.1f MB from %d to %d sagas stored: %+.0f bytes per saga" % (
            first["rss_bytes"]["nats-server"] / MB, last["rss_bytes"]["nats-server"] / MB, stored[0],
            stored[-1], growth["nats-server"]))
        print("  throughput of the last step: %.0f %% of the first (%.0f -> %.0f sagas/s)" % (
            share, first["report"]["throughput_per_s"], last["report"]["throughput_per_s"]))
        print("  orchestrator RSS %.1f MB -> %.1f MB (%+.1f %%)" % (
            first["rss_bytes"]["orchestrator"] / MB, last["rss_bytes"]["orchestrator"] / MB, orch))
    else:
        print("  one step only: no growth figures (use a --step below --growth)")
    print("  at the end: %.2f subjects and %.0f bytes of disk per stored saga" % (
        summary["subjects_per_saga"], summary["disk_bytes_per_saga"]))
    idle = None
    if idle_file != "-":
        idle = load(idle_file)
        idle["idle_s"] = int(idle_s)
        n, o = idle["rss_bytes"]["nats-server"], idle["rss_bytes"]["orchestrator"]
        summary["after_idle"] = {"idle_s": int(idle_s), "nats_rss_bytes": n, "orchestrator_rss_bytes": o,
                                 "nats_rss_bytes_per_saga": n / total}
        print("  after %s s idle: nats-server RSS %.1f MB (%.0f bytes per stored saga), orchestrator RSS %.1f MB"
              % (idle_s, n / MB, n / total, o / MB))
    if as_json == "true":
        print(json.dumps({"mode": "growth", "steps": steps, "idle": idle, "summary": summary}))

def compare(as_json, base_name, current_name, *files):
    split = files.index("--")
    sides = {"base": [load(f) for f in files[:split]], "current": [load(f) for f in files[split + 1:]]}
    med = {k: median_of(v) for k, v in sides.items()}
    rows = [("throughput sagas/s", lambda m: m["throughput_per_s"]),
            ("p50 ms", lambda m: m["latency_ms"]["p50"]),
            ("p99 ms", lambda m: m["latency_ms"]["p99"]),
            ("CPU µs/saga total", lambda m: m["cpu_us_per_saga"]["total"])]
    rows += [("  " + p, (lambda p: lambda m: m["cpu_us_per_saga"][p])(p)) for p in PROCESSES]
    rows += [("  (load generator)", lambda m: m["loadgen_cpu_us_per_saga"])]
    b, c = med["base"], med["current"]
    print("medians of %d runs each (throughput: higher is better; latency and CPU: lower)" % b["runs"])
    print("%-22s %20s %20s %13s" % ("", "base " + base_name, "current " + current_name, "current/base"))
    ratio = {}
    for name, f in rows:
        r = f(c) / f(b) if f(b) else float("nan")
        ratio[name.strip()] = r
        print("%-22s %20.1f %20.1f %13.3f" % (name, f(b), f(c), r))
    if as_json == "true":
        print(json.dumps({"mode": "compare", "base": {"rev": base_name, "runs": sides["base"], "median": b},
                          "current": {"rev": current_name, "runs": sides["current"], "median": c},
                          "ratio": ratio}))

commands = {"snapshot": snapshot, "record": record, "medians": medians, "growth-row": growth_row,
            "growth-summary": growth_summary, "compare": compare}
commands[sys.argv[1]](*sys.argv[2:])
PY
py() { BENCH_PROCESSES="${processes[*]}" BENCH_CLK_TCK="$clk_tck" python3 -c "$PY" "$@"; }

# start_system [BIN_DIR]: a fresh system (run-local.sh) running the binaries in BIN_DIR
# (default: run-local.sh builds and runs this tree's).
start_system() {
  local log="$state/bench-system.log"
  mkdir -p "$state"
  for name in "${processes[@]}"; do rm -f "$state/$name.pid"; done
  : >"$log" # before the start: the last system's log also says "jetsaga is running"
  touch "$work/started"
  JETSAGA_BIN_DIR="${1:-}" deploy/run-local.sh "${system_args[@]}" >"$log" 2>&1 &
  system=$!
  for _ in $(seq 1 3000); do
    grep -q "jetsaga is running" "$log" 2>/dev/null && return 0
    if ! kill -0 "$system" 2>/dev/null; then
      wait "$system" 2>/dev/null || true
      system=""
      tail -n 30 "$log" >&2
      die "the system did not start (log: .tools/run/bench-system.log)"
    fi
    sleep 0.2
  done
  die "the system was not up after 10 minutes (log: .tools/run/bench-system.log)"
}

# stop_system: stops run-local.sh (which stops its processes), then makes sure every process
# it wrote a pid file for is gone; fails if one had to be killed.
stop_system() {
  [[ -n "$system" ]] || return 0
  local pids=() pid left=() status=0
  while read -r file; do pids+=("$(cat "$file")"); done \
    < <(find "$state" -maxdepth 1 -name '*.pid' -newer "$work/started")
  kill -TERM "$system" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$system" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$system" 2>/dev/null; then
    echo "bench: run-local.sh did not stop within 30 s; killing it" >&2
    kill -KILL "$system" 2>/dev/null || true
    status=1
  fi
  wait "$system" 2>/dev/null || true
  system=""
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then left+=("$pid"); fi
  done
  if ((${#left[@]})); then
    echo "bench: still running after the system stopped: pids ${left[*]}; killing them" >&2
    kill -KILL "${left[@]}" 2>/dev/null || true
    status=1
  fi
  return "$status"
}

# run_bench LABEL BIN_DIR [EXTRA BENCH ARGS]: one `jetsaga bench` run (the load generator from
# BIN_DIR) with CPU readings around it; writes $work/LABEL.json and prints its line.
run_bench() {
  local label="$1" bin_dir="$2"
  shift 2
  local out="$work/$label.out" rc=0
  py snapshot "$state" >"$work/$label.before"
  # `times` (in this shell) sums the CPU of the children waited for: the difference is the
  # load generator's. It runs in the background so that a signal stops bench.sh at once.
  times >"$work/$label.times-before"
  "$bin_dir/jetsaga" bench --nats "$nats_url" "${bench_args[@]}" "$@" --json >"$out" 2>&1 &
  loadgen=$!
  wait "$loadgen" || rc=$?
  loadgen=""
  times >"$work/$label.times-after"
  if [[ $mode == growth ]]; then
    py snapshot "$state" "$monitor_url" "$state/nats-data" >"$work/$label.after"
  else
    py snapshot "$state" >"$work/$label.after"
  fi
  if ((rc != 0)); then
    grep -v '^{' "$out" >&2 || true
    die "$label: jetsaga bench failed (exit $rc); system log .tools/run/bench-system.log, process logs .tools/run/logs"
  fi
  py record "$label" "$work/$label.before" "$work/$label.after" "$out" \
    "$work/$label.times-before" "$work/$label.times-after" "$work/$label.json"
}

case "$mode" in
  runs)
    start_system "${JETSAGA_BIN_DIR:-}"
    bin_dir="${JETSAGA_BIN_DIR:-$root/target/release}"
    files=()
    for run in $(seq 1 "$runs"); do
      echo "==> run $run/$runs: jetsaga bench ${bench_args[*]}"
      run_bench "run-$run" "$bin_dir"
      files+=("$work/run-$run.json")
    done
    py medians "$json" "${files[@]}"
    ;;

  growth)
    start_system "${JETSAGA_BIN_DIR:-}"
    bin_dir="${JETSAGA_BIN_DIR:-$root/target/release}"
    echo "==> growth: $growth_total sagas on one store, $step per step: jetsaga bench --sagas $step ${bench_args[*]}"
    files=()
    stored=0
    first=true
    while ((stored < growth_total)); do
      n=$((growth_total - stored < step ? growth_total - stored : step))
      k=$((${#files[@]} + 1))
      run_bench "$k" "$bin_dir" --sagas "$n" >/dev/null
      stored=$((stored + n))
      files+=("$work/$k.json")
      py growth-row "$work/$k.json" "$stored" "$first"
      first=false
    done
    idle_file=-
    if ((idle > 0)); then
      echo "==> idle for $idle s before the last reading"
      for ((i = 0; i < idle; i++)); do sleep 1; done # in steps: a signal stops it at once
      idle_file="$work/idle.json"
      py snapshot "$state" "$monitor_url" "$state/nats-data" >"$idle_file"
    fi
    py growth-summary "$json" "$idle" "$idle_file" "${files[@]}"
    ;;

  compare)
    base_commit="$(git rev-parse --verify --quiet "$compare_rev^{commit}")" \
      || die "--compare: '$compare_rev' is not a revision of this repository"
    base_name="$(git rev-parse --short=10 "$base_commit")"
    current_name="$(git rev-parse --short=10 HEAD)"
    if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then current_name="$current_name+changes"; fi
    base_tree="$root/.tools/compare/$base_name"
    if [[ ! -e "$base_tree" ]]; then
      echo "==> checking out $compare_rev ($base_name) in .tools/compare/$base_name"
      git worktree add --detach "$base_tree" "$base_commit" >&2
      if [[ -d target/release/deps && ! -e "$base_tree/target" ]]; then
        # Seed its target dir with this tree's compiled dependencies (same versions rebuild
        # nothing); the workspace's own crates are rebuilt from the base sources.
        mkdir -p "$base_tree/target/release"
        cp -a target/release/deps target/release/build target/release/.fingerprint "$base_tree/target/release/"
      fi
    fi
    [[ "$(git -C "$base_tree" rev-parse HEAD)" == "$base_commit" ]] \
      || die ".tools/compare/$base_name is not a checkout of $base_commit; remove it (git worktree remove)"
    echo "==> building base $base_name (release, .tools/compare/$base_name/target)"
    (cd "$base_tree" && cargo build --release --bins)
    echo "==> building current $current_name (release)"
    cargo build --release --bins --quiet
    # One load generator for both sides (this tree's): the instrument stays the same, and the
    # base's may not know newer bench arguments.
    loadgen_dir="$root/target/release"
    base_files=()
    current_files=()
    for run in $(seq 1 "$runs"); do
      for side in base current; do
        if [[ $side == base ]]; then dir="$base_tree/target/release"; else dir="$root/target/release"; fi
        echo "==> run $run/$runs, $side: jetsaga bench ${bench_args[*]}"
        start_system "$dir"
        run_bench "$side-$run" "$loadgen_dir"
        stop_system || die "the $side system did not stop cleanly"
        if [[ $side == base ]]; then base_files+=("$work/$side-$run.json"); else current_files+=("$work/$side-$run.json"); fi
      done
    done
    py compare "$json" "$base_name" "$current_name" "${base_files[@]}" -- "${current_files[@]}"
    ;;
esac
