#!/usr/bin/env bash
# Validates everything under deploy/ without a container engine or a cluster:
#
#   promtool check config / check rules / test rules   (Debian's prometheus package)
#   nats-server -t                                     every NATS config in deploy/nats
#   compose files against the Compose specification    (check-jsonschema's vendored schema)
#   Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, offline schemas)
#   deploy/check-references.py                         images, files, ports, env vars, users
#
# Installs what it needs: prometheus via deploy/install-prometheus.sh, nats-server via
# deploy/install-nats-server.sh, the Python validators with pip into .tools/deploy-venv.
# Exits non-zero if anything failed; a failing step does not skip the ones after it.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
CHECK_JSONSCHEMA_VERSION="0.39.0"
KUBERNETES_VALIDATE_VERSION="1.37.0"
KUBERNETES_VERSION="1.33.0"

status=0
step() { echo "== $*"; }
fail() { echo "FAILED: $*" >&2; status=1; }

nats_bin="${NATS_SERVER_BIN:-$(bash deploy/install-nats-server.sh | tail -n 1)}"
prom_dir="$(bash deploy/install-prometheus.sh | tail -n 1)" || { echo "cannot install prometheus" >&2; exit 1; }
promtool="$prom_dir/promtool"

venv="$root/.tools/deploy-venv"
if [[ ! -x "$venv/bin/check-jsonschema" || ! -x "$venv/bin/kubernetes-validate" ]] ||
   ! "$venv/bin/check-jsonschema" --version 2>/dev/null | grep -q "$CHECK_JSONSCHEMA_VERSION"; then
  step "installing check-jsonschema $CHECK_JSONSCHEMA_VERSION and kubernetes-validate $KUBERNETES_VALIDATE_VERSION into .tools/deploy-venv"
  python3 -m venv "$venv" || exit 1
  PIP_ROOT_USER_ACTION=ignore "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
    "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" pyyaml || exit 1
fi

step "promtool check config"
for config in deploy/prometheus/prometheus*.yml; do
  "$promtool" check config "$config" >/dev/null || fail "promtool check config $config"
done
step "promtool check rules"
"$promtool" check rules deploy/prometheus/alerts.yml || fail "promtool check rules"
step "promtool test rules"
(cd deploy/prometheus && "$promtool" test rules alerts.test.yml) || fail "promtool test rules"

step "nats-server -t (every NATS config)"
nats_env=(NATS_SERVER_NAME=nats-1)
for user in ORCHESTRATOR INVENTORY PAYMENT NOTIFICATION CLIENT ADMIN; do
  nats_env+=("JETSAGA_${user}_PASSWORD=check")
done
for conf in deploy/nats/nats.conf deploy/nats/cluster.conf; do
  env "${nats_env[@]}" "$nats_bin" -t -c "$conf" || fail "nats-server -t -c $conf"
done

step "compose files against the Compose specification schema"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose*.yaml || fail "compose schema"

step "Kubernetes manifests against the Kubernetes $KUBERNETES_VERSION schemas (strict)"
for manifest in deploy/k8s/*.yaml; do
  [[ "$(basename "$manifest")" == kustomization.yaml ]] && continue
  "$venv/bin/kubernetes-validate" -k "$KUBERNETES_VERSION" --strict --quiet "$manifest" || fail "kubernetes-validate $manifest"
done

step "Grafana dashboards are JSON with unique uids, and queries name only jetsaga_*, up or gnatsd_* metrics"
python3 - deploy/grafana/dashboards/*.json <<'PY' || fail "dashboards"
import json, re, sys
uids, bad = set(), []
for path in sys.argv[1:]:
    d = json.load(open(path))
    if d["uid"] in uids: bad.append(f"{path}: duplicate uid {d['uid']}")
    uids.add(d["uid"])
    for p in d["panels"]:
        for t in p["targets"]:
            expr = re.sub(r'\b(by|on|without|ignoring)\s*\([^)]*\)|\{[^}]*\}|"[^"]*"|\[[^\]]*\]', " ", t["expr"])
            for name in re.findall(r"\b([a-zA-Z_][a-zA-Z0-9_]*)\b(?!\s*\()", expr):
                if name in {"or", "and", "unless"}: continue
                if not (name.startswith(("jetsaga_", "gnatsd_")) or name == "up"):
                    bad.append(f"{path}: {p['title']}: unexpected metric {name}")
for b in bad: print(b)
sys.exit(1 if bad else 0)
PY

step "images, files, ports, env vars and NATS users named by compose and the manifests"
bin_dir="${JETSAGA_BIN_DIR:-$root/target/debug}"
if [[ ! -x "$bin_dir/jetsaga" ]]; then
  cargo build --bins --workspace --quiet || fail "cargo build"
fi
"$venv/bin/python" deploy/check-references.py "$nats_bin" "$bin_dir" || fail "check-references"

if ((status != 0)); then echo "check-deploy: FAILED" >&2; else echo "check-deploy: OK"; fi
exit "$status"
