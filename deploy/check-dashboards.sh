#!/usr/bin/env bash
# Proves the Grafana dashboards' queries work against what the services really export.
#
# Starts, on free loopback ports and in a temporary directory: nats-server (JetStream), the
# orchestrator, the three reference participants (from target/debug) and a real Prometheus
# (Debian's package, deploy/install-prometheus.sh) scraping them every second with the
# shipped alert rules. Then it runs order sagas (`jetsaga bench`, payment failing 30 % of
# charges transiently so steps retry), two `probe` sagas whose step never gets an answer
# (timeouts, compensation, a failed saga waiting for an operator) and a few undecodable
# messages (dead letters at the orchestrator, a participant and the notification service).
# Finally every panel query of deploy/grafana/dashboards/*.json is evaluated through
# Prometheus' HTTP API: the check fails on any query that errors or returns no series.
# Exception, said out loud: queries on gnatsd_* metrics come from prometheus-nats-exporter,
# which runs in compose but is not installable here; they must evaluate without error, and
# are reported as not verified for data.
#
# Stops exactly the processes it started (by PID) and removes the directory.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

nats_bin="${NATS_SERVER_BIN:-$(bash deploy/install-nats-server.sh | tail -n 1)}"
prom_dir="$(bash deploy/install-prometheus.sh | tail -n 1)"
prometheus="$prom_dir/prometheus"
bin="${JETSAGA_BIN_DIR:-$root/target/debug}"
for b in jetsaga jetsaga-inventory jetsaga-payment jetsaga-notification; do
  if [[ ! -x "$bin/$b" ]]; then
    echo "== building the binaries (cargo build --bins --workspace)"
    cargo build --bins --workspace --quiet
    break
  fi
done

tool=check-dashboards
# shellcheck source=deploy/lib.sh
source "$root/deploy/lib.sh"

work="$(mktemp -d -t jetsaga-dashboards-XXXXXX)"
pids=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop_children
  if (( status != 0 )); then
    echo "check-dashboards: FAILED; last log lines:" >&2
    tail -n 5 "$work"/*.log >&2 2>/dev/null || true
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT INT TERM

nats_port=$(free_port); mon_port=$(free_port); http_port=$(free_port); prom_port=$(free_port)
inv_port=$(free_port); pay_port=$(free_port); note_port=$(free_port)
nats_url="nats://127.0.0.1:$nats_port"

"$nats_bin" -c "$(nats_conf "$work" "$nats_port" "$mon_port")" >"$work/nats.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$mon_port/healthz" nats-server

# A saga type only this check uses: its second step goes to a participant nobody runs, so it
# times out, is retried, compensates, and the compensation (an action inventory does not
# have) fails for good: a failed saga waiting for an operator.
mkdir -p "$work/definitions"
cp sagas/definitions/order-creation.input.schema.json "$work/definitions/"
cat >"$work/definitions/probe.toml" <<'TOML'
name = "probe"
version = 1
description = "check-dashboards: times out, retries, compensates and ends failed"
input-schema = "order-creation.input.schema.json"
deadline = "5m"

[compensation-retry]
max-attempts = 2
initial-backoff = "100ms"
max-backoff = "200ms"
multiplier = 2.0
jitter = 0.0

[[steps]]
name = "hold"
participant = "inventory"
action = "reserve"
compensation = "no-such-undo"
kind = "compensatable"
timeout = "10s"

[[steps]]
name = "vanish"
participant = "nobody"
action = "wait"
compensation = "undo"
kind = "compensatable"
timeout = "1s"
retry = { max-attempts = 2, initial-backoff = "100ms", max-backoff = "200ms", multiplier = 2.0, jitter = 0.0 }
TOML

JETSAGA_NATS__URL="$nats_url" JETSAGA_HTTP__LISTEN="127.0.0.1:$http_port" \
  JETSAGA_ENGINE__DEFINITIONS="$work/definitions" \
  "$bin/jetsaga" serve >"$work/orchestrator.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$http_port/readyz" orchestrator

JETSAGA_NATS__URL="$nats_url" JETSAGA_METRICS__LISTEN="127.0.0.1:$inv_port" \
  "$bin/jetsaga-inventory" >"$work/inventory.log" 2>&1 &
pids+=($!)
JETSAGA_NATS__URL="$nats_url" JETSAGA_METRICS__LISTEN="127.0.0.1:$pay_port" \
  JETSAGA_FAULTS__FAIL_RATE=0.3 JETSAGA_CONSUMER__MAX_DELIVER=1 \
  "$bin/jetsaga-payment" >"$work/payment.log" 2>&1 &
pids+=($!)
JETSAGA_NATS__URL="$nats_url" JETSAGA_METRICS__LISTEN="127.0.0.1:$note_port" \
  "$bin/jetsaga-notification" >"$work/notification.log" 2>&1 &
pids+=($!)
for port in "$inv_port" "$pay_port" "$note_port"; do
  wait_http "http://127.0.0.1:$port/healthz" "participant on :$port"
done

# The shipped local scrape config and rules, on this run's ports, scraped every second.
cp deploy/prometheus/alerts.yml "$work/alerts.yml"
sed -e "s/127.0.0.1:8080/127.0.0.1:$http_port/" -e "s/127.0.0.1:9101/127.0.0.1:$inv_port/" \
  -e "s/127.0.0.1:9102/127.0.0.1:$pay_port/" -e "s/127.0.0.1:9103/127.0.0.1:$note_port/" \
  -e "s/scrape_interval: 5s/scrape_interval: 1s/" -e "s/evaluation_interval: 5s/evaluation_interval: 1s/" \
  deploy/prometheus/prometheus.local.yml >"$work/prometheus.yml"
"$prom_dir/promtool" check config "$work/prometheus.yml" >/dev/null
"$prometheus" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$prom_port/-/ready" prometheus

echo "== load: order sagas (payment fails 30 % of charges once), probe sagas, undecodable messages"
"$bin/jetsaga" bench --nats "$nats_url" --sagas 60 --concurrency 10 --timeout 120s >"$work/bench.log" 2>&1 || true
tail -n 8 "$work/bench.log"
for i in 1 2; do
  curl -fsS -X POST -H 'content-type: application/json' "http://127.0.0.1:$http_port/v1/sagas/probe" \
    -d "{\"key\":\"probe-$i\",\"input\":{\"customer_id\":\"c-1\",\"email\":\"c1@example.com\",\"items\":[{\"sku\":\"sku-1\",\"quantity\":1}],\"amount_cents\":100,\"currency\":\"EUR\",\"card_token\":\"tok_ok\"}}" >/dev/null
done
# Plain NATS publishes (JetStream captures them): not JSON, so each is dead-lettered.
{
  printf 'CONNECT {"verbose":false,"pedantic":false}\r\n'
  for subject in saga.reply.inventory.garbage saga.cmd.payment.charge saga.event.order.garbage; do
    printf 'PUB %s 8\r\nnot json\r\n' "$subject"
  done
  printf 'PING\r\n'
  sleep 1
} | python3 -c '
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(sys.stdin.buffer.read())
data = b""
while b"PONG" not in data:
    chunk = s.recv(4096)
    if not chunk: sys.exit("nats-server closed the connection: %r" % data)
    data += chunk
' "$nats_port"

echo "== waiting for Prometheus to see the failed probe sagas and the dead letters"
query() {
  curl -fsS -G "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(len(r))'
}
ready=false
for _ in $(seq 1 240); do
  if [[ "$(query 'jetsaga_sagas_finished_total{outcome="failed"}')" != 0 ]] &&
     [[ "$(query 'jetsaga_step_timeouts_total')" != 0 ]] &&
     [[ "$(query 'jetsaga_dead_letters_total')" != 0 ]] &&
     [[ "$(query 'jetsaga_participant_dead_letters_total')" != 0 ]] &&
     [[ "$(query 'jetsaga_notification_dead_letters_total > 0')" != 0 ]]; then
    ready=true; break
  fi
  sleep 0.5
done
if ! $ready; then
  echo "check-dashboards: the run did not produce failed sagas, timeouts and dead letters in time" >&2
  exit 1
fi
# A few more scrapes so rates over [1m] have two samples after the last event.
sleep 3

echo "== evaluating every dashboard panel query"
python3 - "$prom_port" deploy/grafana/dashboards/*.json <<'PY'
import json, sys, urllib.parse, urllib.request

port, files = sys.argv[1], sys.argv[2:]
failed, checked, unverified = [], 0, []
for path in files:
    with open(path) as f:
        dashboard = json.load(f)
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            checked += 1
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            name = f'{path.rsplit("/", 1)[-1]}: "{panel["title"]}" [{target["refId"]}]'
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    body = json.load(response)
            except urllib.error.HTTPError as e:
                failed.append(f"{name}: HTTP {e.code}: {e.read().decode(errors='replace')}")
                continue
            if body.get("status") != "success":
                failed.append(f"{name}: {body.get('error')}")
                continue
            series = len(body["data"]["result"])
            if "gnatsd_" in expr:
                unverified.append(name)
                print(f"  ok (no exporter here, data not verified)  {name}")
            elif series == 0:
                failed.append(f"{name}: no series for {expr}")
            else:
                print(f"  ok ({series} series)  {name}")
print(f"{checked} queries evaluated, {len(failed)} failed, {len(unverified)} exporter queries not verified for data")
for line in failed:
    print("FAILED " + line)
sys.exit(1 if failed else 0)
PY
echo "check-dashboards: OK"
