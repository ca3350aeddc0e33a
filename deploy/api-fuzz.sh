#!/usr/bin/env bash
# Fuzzes the operator HTTP API from its own OpenAPI document with schemathesis (PyPI).
#
# Installs the pinned schemathesis into <repo>/.tools/schemathesis (a venv, git-ignored), starts
# on free loopback ports and in a temporary directory nats-server (JetStream) and `jetsaga serve`
# (target/debug, or JETSAGA_BIN_DIR) with API tokens configured and the order definition loaded,
# starts one saga and leaves one dead letter so that reads find something, then runs
# `schemathesis run` against /openapi.json with the operate token: every operation, a bounded
# number of generated requests each (valid and invalid), fixed seed. Checks: no 5xx
# (not_a_server_error), every status code documented (status_code_conformance), every body
# matching its documented schema (response_schema_conformance) and content type
# (content_type_conformance), and routes that declare a token refusing requests without one
# (ignored_auth). Exits non-zero on any finding.
#
# Environment: API_FUZZ_EXAMPLES (default 25) requests per operation and phase; API_FUZZ_SEED.
# Stops exactly the processes it started (by PID) and removes the directory.
set -euo pipefail

SCHEMATHESIS_VERSION="4.32.5"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

venv="$root/.tools/schemathesis"
st="$venv/bin/st"
if [[ ! -x "$st" ]] || [[ "$("$st" --version 2>/dev/null)" != *"version ${SCHEMATHESIS_VERSION}" ]]; then
  echo "== installing schemathesis ${SCHEMATHESIS_VERSION} into .tools/schemathesis" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==${SCHEMATHESIS_VERSION}"
fi

nats_bin="${NATS_SERVER_BIN:-$(bash deploy/install-nats-server.sh | tail -n 1)}"
bin="${JETSAGA_BIN_DIR:-$root/target/debug}"
if [[ ! -x "$bin/jetsaga" ]]; then
  echo "== building jetsaga (cargo build -p jetsaga-cli)" >&2
  cargo build --quiet -p jetsaga-cli
fi

tool=api-fuzz
# shellcheck source=deploy/lib.sh
source "$root/deploy/lib.sh"

work="$(mktemp -d -t jetsaga-api-fuzz-XXXXXX)"
pids=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop_children
  if (( status != 0 )); then
    echo "api-fuzz: FAILED; last orchestrator log lines:" >&2
    tail -n 20 "$work/orchestrator.log" >&2 2>/dev/null || true
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT INT TERM

nats_port=$(free_port); mon_port=$(free_port); http_port=$(free_port)
nats_url="nats://127.0.0.1:$nats_port"
api="http://127.0.0.1:$http_port"
operate_token="api-fuzz-operate-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
read_token="api-fuzz-read-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"

"$nats_bin" -c "$(nats_conf "$work" "$nats_port" "$mon_port")" >"$work/nats.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$mon_port/healthz" nats-server

mkdir -p "$work/definitions"
cp sagas/definitions/order-creation.toml sagas/definitions/order-creation.input.schema.json "$work/definitions/"
cat >"$work/jetsaga.toml" <<TOML
[nats]
url = "$nats_url"
[http]
listen = "127.0.0.1:$http_port"
tokens = [
  { name = "fuzz-operator", role = "operate", token = "$operate_token" },
  { name = "fuzz-reader", role = "read", token = "$read_token" },
]
[engine]
definitions = "$work/definitions"
[telemetry]
log-filter = "warn"
TOML
"$bin/jetsaga" serve --config "$work/jetsaga.toml" >"$work/orchestrator.log" 2>&1 &
pids+=($!)
wait_http "$api/readyz" orchestrator

# Something to find: a saga (no participants run, so it waits on its first step) and a dead
# letter (a start the orchestrator cannot decode).
curl -fsS -o /dev/null -X POST "$api/v1/sagas/order-creation" \
  -H "Authorization: Bearer $operate_token" -H 'Content-Type: application/json' \
  -d '{"key": "fuzz-order-1", "input": {"customer_id": "c-1", "email": "ana@example.com",
       "items": [{"sku": "sku-1", "quantity": 1}], "amount_cents": 1000, "currency": "EUR",
       "card_token": "tok_ok"}}'

echo "== schemathesis ${SCHEMATHESIS_VERSION} against $api/openapi.json"
# From the temporary directory: schemathesis keeps its replay data in the working directory.
# One worker: with two, hypothesis parsed lambda sources in two threads at once and Python 3.11's
# ast raised "AST constructor recursion depth mismatch" in one CI run (a tool error, not a finding).
cd "$work"
"$st" run "$api/openapi.json" \
  --url "$api" \
  --header "Authorization: Bearer $operate_token" \
  --checks not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance,ignored_auth \
  --phases examples,coverage,fuzzing \
  --max-examples "${API_FUZZ_EXAMPLES:-25}" \
  --seed "${API_FUZZ_SEED:-20261202}" \
  --workers 1 \
  --request-timeout 10 \
  --generation-database none \
  --no-color
