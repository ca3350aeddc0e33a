# Shell helpers shared by the deploy scripts that start their own system: source it after
# setting `tool` (the name errors are prefixed with).

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits up to 60 s until URL answers with a success status; WHAT names it in the error.
wait_http() { # url what
  for _ in $(seq 1 600); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "${tool}: $2 did not come up ($1)" >&2
  return 1
}

# Writes DIR/nats.conf for a JetStream server on loopback PORT (monitoring on MON_PORT, store in
# DIR/nats) and prints its path. JetStream storage is set to 20GB, as in deploy/nats/nats.conf:
# every jetsaga stream reserves its byte bound (streams.max-bytes, 2 GiB by default), and the
# server's own default (75% of the disk free when it starts) may not hold them all.
nats_conf() { # dir port mon_port
  cat >"$1/nats.conf" <<CONF
listen: 127.0.0.1:$2
http: 127.0.0.1:$3
jetstream {
  store_dir: "$1/nats"
  max_file_store: 20GB
}
CONF
  echo "$1/nats.conf"
}

# Stops the processes this script started (their PIDs in the array `pids`), newest first:
# SIGTERM to each, then waits for each.
stop_children() {
  for (( i=${#pids[@]}-1; i>=0; i-- )); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
  done
  for (( i=${#pids[@]}-1; i>=0; i-- )); do
    wait "${pids[$i]}" 2>/dev/null || true
  done
}
