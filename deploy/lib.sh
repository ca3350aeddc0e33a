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
