#!/usr/bin/env bash
# Installs Debian's `chromium` package for the operator web page's browser test
# (orchestrator/tests/page.rs, run headless, no sandbox, loopback only).
#
# Used by deploy/test.sh. Idempotent: does nothing when chromium is already on PATH.
# Needs root (or sudo) for apt-get. Prints the path of the chromium binary last.
set -euo pipefail

for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "chromium already installed ($("$name" --version 2>/dev/null | head -n 1))" >&2
        command -v "$name"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install Chromium by other means and set CHROME" >&2
    exit 1
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "error: installing the chromium package needs root" >&2
        exit 1
    fi
    sudo=(sudo)
fi

echo "installing Debian's chromium package" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >&2
"${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2

if ! command -v chromium >/dev/null 2>&1; then
    echo "error: the chromium package is installed but chromium is not on PATH" >&2
    exit 1
fi
echo "installed $(chromium --version 2>/dev/null | head -n 1)" >&2
command -v chromium
