#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for a short time and fails on a crash.
#
#   deploy/fuzz.sh [seconds-per-target]     # default 20
#
# Installs what it needs: the nightly toolchain (rustup, if it is missing) and the pinned
# cargo-fuzz into <repo>/.tools/cargo-fuzz (git-ignored). Builds the targets once (release,
# debug assertions on so an overflow panics; no sanitizer: the code is safe Rust), then runs
# each one from its seed corpus (fuzz/corpus/<target>, committed, never written to) plus a
# working corpus in fuzz/target/corpus/<target> that grows across runs. A crash leaves its
# input in fuzz/artifacts/<target>/ and the reproduce command in the output; every target runs
# even after one failed. Exits non-zero if any target crashed or could not run.
set -euo pipefail

CARGO_FUZZ_VERSION="0.13.2"
seconds="${1:-20}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: deploy/fuzz.sh [seconds-per-target]   (a whole number of seconds, got '${seconds}')" >&2
    exit 64
fi

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
cd "$repo_root"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "installing the nightly toolchain (cargo-fuzz needs it)" >&2
    rustup toolchain install nightly --profile minimal
fi

tools="${repo_root}/.tools/cargo-fuzz"
export PATH="${tools}/bin:${PATH}"
if [[ "$(cargo-fuzz --version 2>/dev/null || true)" != "cargo-fuzz ${CARGO_FUZZ_VERSION}" ]]; then
    echo "installing cargo-fuzz ${CARGO_FUZZ_VERSION} into ${tools}" >&2
    cargo install --locked --root "$tools" --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi

flags=(--sanitizer none --debug-assertions)
echo "== cargo +nightly fuzz build ${flags[*]}"
cargo +nightly fuzz build "${flags[@]}"

status=0
for target in $(cargo +nightly fuzz list); do
    corpus="fuzz/target/corpus/${target}"
    mkdir -p "$corpus"
    echo "== fuzz ${target} for ${seconds}s (seeds: fuzz/corpus/${target})"
    # -timeout: an input that takes over 10 s counts as a hang (a crash). -seed: the same
    # mutations on every run (JETSAGA_FUZZ_SEED=0 lets libFuzzer pick one), so the test
    # command does not fail at random; longer or other-seed runs are for finding new bugs.
    if ! cargo +nightly fuzz run "${flags[@]}" "$target" "$corpus" "fuzz/corpus/${target}" -- \
        -seed="${JETSAGA_FUZZ_SEED:-1}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1; then
        echo "FAILED: fuzz target ${target}; its input is in fuzz/artifacts/${target}/, reproduce with" >&2
        echo "  cargo +nightly fuzz run ${flags[*]} ${target} fuzz/artifacts/${target}/<file>" >&2
        status=1
    fi
done
exit "$status"
