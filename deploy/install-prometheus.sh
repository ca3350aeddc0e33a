#!/usr/bin/env bash
# Installs Prometheus (the server and promtool) from Debian's `prometheus` package.
#
# Used by deploy/check-deploy.sh (promtool check / test), deploy/check-dashboards.sh
# (a real Prometheus scraping a local system) and deploy/run-local.sh (optional).
# Idempotent: does nothing when promtool is already on PATH. Needs root (or sudo)
# for apt-get. Prints the directory holding `prometheus` and `promtool` last.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "prometheus already installed ($(promtool --version 2>&1 | head -n 1))" >&2
    dirname "$(command -v promtool)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install Prometheus (prometheus + promtool) by other means" >&2
    exit 1
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "error: installing the prometheus package needs root" >&2
        exit 1
    fi
    sudo=(sudo)
fi

echo "installing Debian's prometheus package" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >&2
# The package's post-install tries to start the service; without systemd (containers,
# CI) that is harmless: we only need the binaries and run them ourselves on loopback.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >&2

if ! command -v promtool >/dev/null 2>&1; then
    echo "error: the prometheus package is installed but promtool is not on PATH" >&2
    exit 1
fi
# Debian's package may have started a server on :9090 where systemd/policy-rc.d allowed
# it; we never rely on (or stop) that one: our scripts start their own on a free port.
echo "installed $(promtool --version 2>&1 | head -n 1)" >&2
dirname "$(command -v promtool)"
