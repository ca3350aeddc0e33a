#!/usr/bin/env bash
# The one test command of jetsaga (CI runs it through .ci/run).
#
# Checks formatting (`cargo fmt --all --check`) and lints (`cargo clippy --all-targets -- -D
# warnings`), installs the pinned nats-server, points NATS_SERVER_BIN at it, installs Debian's
# chromium for the web page's browser test (CHROME), builds the
# workspace's binaries (crash tests spawn them), runs every test with cargo-nextest (or `cargo
# test` without it), then the doc tests, which nextest does not run, then the API fuzz run
# (deploy/api-fuzz.sh, schemathesis), the chaos runner's short profile (deploy/chaos.sh), each
# cargo-fuzz target for a short time (deploy/fuzz.sh) and the deployment checks.
# Extra arguments go to the test runner, e.g.
#   deploy/test.sh -p jetsaga-testkit
# Exits non-zero if anything failed; a failing step does not skip the ones after it.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
cd "$repo_root"

NATS_SERVER_BIN="$(bash "${script_dir}/install-nats-server.sh" | tail -n 1)"
export NATS_SERVER_BIN
echo "using ${NATS_SERVER_BIN} ($("$NATS_SERVER_BIN" --version))"

# The operator web page's browser test (orchestrator/tests/page.rs) drives Debian's chromium.
CHROME="$(bash "${script_dir}/install-chromium.sh" | tail -n 1)"
export CHROME
echo "using ${CHROME}"

# Package selection (-p/--package) is honoured by every step; other arguments go to the runner only.
packages=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        -p | --package) packages+=("${args[i]}" "${args[i + 1]:-}"); i=$((i + 1)) ;;
        -p* | --package=*) packages+=("${args[i]}") ;;
    esac
done
if ((${#packages[@]} == 0)); then
    selection=(--workspace)
else
    selection=("${packages[@]}")
fi
runner_args=("$@")
if ((${#packages[@]} == 0)); then
    runner_args=(--workspace "$@")
fi

status=0
echo "== cargo fmt --all --check"
cargo fmt --all --check || status=$?
echo "== cargo clippy ${selection[*]} --all-targets -- -D warnings"
cargo clippy "${selection[@]}" --all-targets -- -D warnings || status=$?

echo "== cargo build --bins ${selection[*]}"
cargo build --bins "${selection[@]}" || status=$?

if cargo nextest --version >/dev/null 2>&1; then
    echo "== cargo nextest run --no-fail-fast ${runner_args[*]}"
    cargo nextest run --no-fail-fast "${runner_args[@]}" || status=$?
    echo "== cargo test --doc ${selection[*]}"
    cargo test --doc "${selection[@]}" || status=$?
else
    # `cargo test` runs the doc tests itself.
    echo "== cargo test --no-fail-fast ${runner_args[*]} (cargo-nextest not installed)"
    cargo test --no-fail-fast "${runner_args[@]}" || status=$?
fi

# The operator API fuzzed from its OpenAPI document (deploy/api-fuzz.sh: schemathesis against a
# running `jetsaga serve`, ~1 minute). Skipped with a package selection (-p) other than the
# orchestrator's, or with JETSAGA_SKIP_API_FUZZ=1.
if [[ "${JETSAGA_SKIP_API_FUZZ:-}" != 1 ]] && { ((${#packages[@]} == 0)) || [[ " ${packages[*]} " == *" jetsaga-orchestrator "* ]]; }; then
    echo "== deploy/api-fuzz.sh"
    bash "${script_dir}/api-fuzz.sh" || status=$?
fi

# The chaos runner's short profile (deploy/chaos.sh): a whole system under kill -9, SIGSTOP,
# nats-server restarts, an 8 s journal outage, a payment stopped past its step timeout and
# duplicated replies, then checks of every participant's state. Skipped when a package
# selection (-p) is given; JETSAGA_SKIP_CHAOS=1 skips it.
if ((${#packages[@]} == 0)) && [[ "${JETSAGA_SKIP_CHAOS:-}" != 1 ]]; then
    echo "== deploy/chaos.sh --profile short"
    JETSAGA_BIN_DIR="$repo_root/target/debug" bash "${script_dir}/chaos.sh" --profile short || status=$?
fi

# The fuzz targets (deploy/fuzz.sh: nightly and cargo-fuzz, installed if missing), each for
# JETSAGA_FUZZ_SECONDS (default 20). Skipped when a package selection (-p) is given;
# JETSAGA_SKIP_FUZZ=1 skips them.
if ((${#packages[@]} == 0)) && [[ "${JETSAGA_SKIP_FUZZ:-}" != 1 ]]; then
    echo "== deploy/fuzz.sh ${JETSAGA_FUZZ_SECONDS:-20}"
    bash "${script_dir}/fuzz.sh" "${JETSAGA_FUZZ_SECONDS:-20}" || status=$?
fi

# The heap-profile tool's tests (deploy/test_nats_heap.py), the deployment files
# (deploy/check-deploy.sh) and the Grafana dashboards' queries against a real
# Prometheus scraping a running system (deploy/check-dashboards.sh). Skipped when a package
# selection (-p) is given. JETSAGA_SKIP_DEPLOY_CHECKS=1 skips them.
if ((${#packages[@]} == 0)) && [[ "${JETSAGA_SKIP_DEPLOY_CHECKS:-}" != 1 ]]; then
    echo "== python3 deploy/test_nats_heap.py"
    python3 "${script_dir}/test_nats_heap.py" || status=$?
    echo "== deploy/check-deploy.sh"
    bash "${script_dir}/check-deploy.sh" || status=$?
    echo "== deploy/check-dashboards.sh"
    bash "${script_dir}/check-dashboards.sh" || status=$?
fi

if ((status != 0)); then
    echo "FAILED (exit ${status})" >&2
fi
exit "$status"
