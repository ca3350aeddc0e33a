#!/usr/bin/env bash
# The ONE command that runs the whole jetsaga system locally, without containers:
# installs nats-server if missing, builds the release binaries, starts a
# JetStream-enabled nats-server, the orchestrator and the three reference
# participants, runs a batch of demo orders, prints where to look, and keeps
# everything running until Ctrl-C (then stops exactly the processes it started).
# When Prometheus is installed (deploy/install-prometheus.sh) it is started too, on
# 127.0.0.1:9090, with deploy/prometheus/prometheus.local.yml and the shipped alert rules.
#
#   deploy/run-local.sh                 run and keep running
#   deploy/run-local.sh --sync-always   nats-server fsyncs every write (durable; slower)
#   deploy/run-local.sh --no-demo       skip the demo orders
#   deploy/run-local.sh --demo-only     run the demo, then stop everything and exit
#   deploy/run-local.sh --fresh         start from an empty JetStream store
#   deploy/run-local.sh --no-participants   no reference participants (and no demo), e.g. for
#                                       `jetsaga bench --participants builtin`
#   JETSAGA_BIN_DIR=DIR deploy/run-local.sh   run the binaries in DIR (no build), e.g. another revision's
#   JETSAGA_LOCAL_CONFIG_DIR=DIR deploy/run-local.sh   start each service with `--config DIR/<name>.toml`
#                                       (orchestrator, inventory, payment, notification) where it exists
#   JETSAGA_LOCAL_NATS_PROF_PORT=PORT deploy/run-local.sh   nats-server serves Go's pprof on
#                                       127.0.0.1:PORT (/debug/pprof/heap?debug=1: where its memory goes)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

sync_always=false
fresh=false
demo=true
keep=true
participants=true
for arg in "$@"; do
  case "$arg" in
    --sync-always) sync_always=true ;;
    --no-demo) demo=false ;;
    --fresh) fresh=true ;;
    --demo-only) keep=false ;;
    --no-participants) participants=false; demo=false ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "run-local: unknown argument '$arg'" >&2; exit 64 ;;
  esac
done

nats_port="${JETSAGA_LOCAL_NATS_PORT:-4222}"
monitor_port="${JETSAGA_LOCAL_MONITOR_PORT:-8222}"
http="127.0.0.1:8080"
state="$root/.tools/run"
logs="$state/logs"
mkdir -p "$logs"

prom_port="${JETSAGA_LOCAL_PROMETHEUS_PORT:-9090}"
prometheus_bin="$(command -v prometheus || true)"
if [[ -n "$prometheus_bin" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$prom_port") 2>/dev/null; then
  echo "run-local: port $prom_port is taken; not starting Prometheus" >&2
  prometheus_bin=""
fi

for port in "$nats_port" "$monitor_port" 8080 9101 9102 9103; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "run-local: port $port on 127.0.0.1 is already in use; stop whatever listens there first" >&2
    exit 1
  fi
done

nats_bin="$("$root/deploy/install-nats-server.sh" | tail -n 1)"
if [[ -n "${JETSAGA_BIN_DIR:-}" ]]; then
  bin="$(cd "$JETSAGA_BIN_DIR" && pwd)"
  echo "==> using the binaries in $bin"
else
  echo "==> building release binaries"
  cargo build --release --bins --quiet
  bin="$root/target/release"
fi

# config_of NAME: the `--config FILE` arguments of a service, from JETSAGA_LOCAL_CONFIG_DIR.
config_of() {
  local file="${JETSAGA_LOCAL_CONFIG_DIR:-}/$1.toml"
  if [[ -n "${JETSAGA_LOCAL_CONFIG_DIR:-}" && -f "$file" ]]; then printf '%s\n' --config "$file"; fi
}

pids=()
cleanup() {
  trap - EXIT INT TERM
  echo
  echo "==> stopping"
  # Participants and orchestrator first (graceful: SIGTERM), nats-server last.
  for (( i=${#pids[@]}-1; i>=0; i-- )); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

if $fresh; then rm -rf "$state/nats-data"; fi
sync_line=""
if $sync_always; then sync_line="  sync_interval: always"; fi
prof_line=""
if [[ -n "${JETSAGA_LOCAL_NATS_PROF_PORT:-}" ]]; then prof_line="prof_port: $JETSAGA_LOCAL_NATS_PROF_PORT"; fi
cat > "$state/nats.conf" <<CONF
listen: 127.0.0.1:$nats_port
http: 127.0.0.1:$monitor_port
$prof_line
jetstream {
  store_dir: "$state/nats-data"
  # Room for every stream's byte bound (streams.max-bytes), whatever the disk has free.
  max_file_store: 20GB
$sync_line
}
CONF

echo "==> nats-server on 127.0.0.1:$nats_port (store $state/nats-data, monitoring http://127.0.0.1:$monitor_port)"
"$nats_bin" -c "$state/nats.conf" >"$logs/nats-server.log" 2>&1 &
pids+=($!)
echo $! > "$state/nats-server.pid"
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
  sleep 0.1
done

export JETSAGA_NATS__URL="nats://127.0.0.1:$nats_port"
echo "==> orchestrator on http://$http"
mapfile -t config_args < <(config_of orchestrator)
"$bin/jetsaga" serve "${config_args[@]}" >"$logs/orchestrator.log" 2>&1 &
pids+=($!)
echo $! > "$state/orchestrator.pid"
ready=false
for _ in $(seq 1 100); do
  if curl -fsS "http://$http/readyz" >/dev/null 2>&1; then ready=true; break; fi
  sleep 0.1
done
if ! $ready; then
  echo "run-local: the orchestrator did not become ready; see $logs/orchestrator.log" >&2
  tail -n 20 "$logs/orchestrator.log" >&2
  exit 1
fi

if $participants; then
  for p in inventory payment notification; do
    echo "==> $p participant"
    mapfile -t config_args < <(config_of "$p")
    "$bin/jetsaga-$p" "${config_args[@]}" >"$logs/$p.log" 2>&1 &
    pids+=($!)
    echo $! > "$state/$p.pid"
  done
  for port in 9101 9102 9103; do
    for _ in $(seq 1 100); do
      curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
fi

prom_line="  Prometheus      not installed (deploy/install-prometheus.sh installs it)"
if [[ -n "$prometheus_bin" ]]; then
  echo "==> prometheus on http://127.0.0.1:$prom_port"
  cp deploy/prometheus/prometheus.local.yml deploy/prometheus/alerts.yml "$state/"
  "$prometheus_bin" --config.file="$state/prometheus.local.yml" --storage.tsdb.path="$state/prometheus-data" \
    --web.listen-address="127.0.0.1:$prom_port" >"$logs/prometheus.log" 2>&1 &
  pids+=($!)
  echo $! > "$state/prometheus.pid"
  prom_line="  Prometheus      http://127.0.0.1:$prom_port (alerts: /alerts; dashboards' queries: deploy/grafana/dashboards)"
fi

participants_line="  participants    http://127.0.0.1:9101/metrics (inventory), :9102 (payment), :9103 (notification)"
if ! $participants; then participants_line="  participants    none started (--no-participants)"; fi

if $demo; then
  echo "==> demo: 100 orders, 10 % declined"
  "$bin/jetsaga" bench --nats "$JETSAGA_NATS__URL" --sagas 100 --concurrency 20 --timeout 30s
fi

cat <<INFO

jetsaga is running:
  HTTP API        http://$http/v1  (GET /v1/sagas, POST /v1/sagas/order-creation; /openapi.json, /healthz, /readyz)
  web page        http://$http/  (sagas, timelines, retry / abort, dead letters)
  metrics         http://$http/metrics
$participants_line
  NATS            nats://127.0.0.1:$nats_port (monitoring http://127.0.0.1:8222/varz, /jsz)
$prom_line
  logs            $logs (process ids in $state/*.pid)
  load test       $bin/jetsaga bench --sagas 20000 --concurrency 512
INFO

if $keep; then
  echo "Ctrl-C stops everything."
  wait "${pids[0]}"
fi
