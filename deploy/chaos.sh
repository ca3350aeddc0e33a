#!/usr/bin/env bash
# The chaos runner: `jetsaga chaos` on this tree's binaries.
#
# Installs the pinned nats-server if missing, builds the workspace's binaries (debug), and runs
# `jetsaga chaos ARGS`: its own nats-server on a free loopback port with a temporary store, two
# orchestrators and the reference participants, order sagas under kill -9, SIGSTOP, nats-server
# restarts, journal outages, a payment stopped past its step timeout and duplicated replies, then
# the checks of the journal, the listing and the participants' state.
# Exits non-zero if any check fails or the run cannot be carried out.
#
#   deploy/chaos.sh                     the short profile (~1-2 minutes, 2,400 sagas)
#   deploy/chaos.sh --profile long      10,500 sagas (~8 minutes)
#   deploy/chaos.sh --profile overload  5x the measured saturation for 30 s, no faults
#   deploy/chaos.sh --journal-outage 30s   the short profile with a 30 s journal outage
#   deploy/chaos.sh --seed 42 --logs DIR   replay a fault schedule, keep every log in DIR
#   deploy/chaos.sh --cluster           a 3-node NATS cluster (R3, sync_interval: always): node
#                                       kills every ~10 s and leader step-downs (~2-3 minutes)
#   deploy/chaos.sh --help              every option
#   JETSAGA_BIN_DIR=DIR deploy/chaos.sh  run the binaries in DIR (no build)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

NATS_SERVER_BIN="$(bash "$root/deploy/install-nats-server.sh" | tail -n 1)"
export NATS_SERVER_BIN
if [[ -n "${JETSAGA_BIN_DIR:-}" ]]; then
  bin="$(cd "$JETSAGA_BIN_DIR" && pwd)"
else
  cargo build --bins --quiet
  bin="$root/target/debug"
fi
exec "$bin/jetsaga" chaos "$@"
