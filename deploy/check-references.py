#!/usr/bin/env python3
"""Checks that what deploy/compose*.yaml and deploy/k8s/*.yaml name really exists.

- images: pinned tags; the jetsaga image is built by deploy/Dockerfile and tagged with the
  workspace version everywhere;
- files: every bind-mounted host path exists, and every container path a command or variable
  names (a config file, a dashboard) is inside a mount and exists on the host;
- binaries: every jetsaga binary a service runs is a workspace binary (built in target/);
- configuration: every JETSAGA_* variable and every config file a service gets is accepted by
  the real binary (run with that environment: exit 64 means the configuration was refused), and
  its sections are sections the binary has (participants ignore unknown sections);
- ports: Prometheus targets, published ports, probes and Services point at the ports the
  binaries are configured to listen on;
- NATS: service users exist in deploy/nats/users.conf, the password variables the server needs
  are set, URLs point at NATS services; the Kubernetes copy of users.conf is identical, and the
  Kubernetes nats.conf passes `nats-server -t`.

Usage: check-references.py <nats-server binary> <directory of the jetsaga binaries>
Needs PyYAML (installed by deploy/check-deploy.sh into .tools/deploy-venv).
"""

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BINARIES = {"jetsaga", "jetsaga-inventory", "jetsaga-payment", "jetsaga-notification"}
USERS_CONF = (DEPLOY / "nats/users.conf").read_text()
NATS_USERS = dict(re.findall(r"user:\s*(\S+)\s*\n\s*password:\s*\$(\w+)", USERS_CONF))
PASSWORD_VARS = set(NATS_USERS.values())
VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
JETSAGA_IMAGE = f"jetsaga:{VERSION}"
# Ports the third-party images listen on by default.
KNOWN_PORTS = {"prometheus": {9090}, "jaeger": {4317, 4318, 16686}, "grafana": {3000}}
EXPORTER_PORT = 7777

problems = []
checked = 0


def problem(where, text):
    problems.append(f"{where}: {text}")


def check(ok, where, text):
    global checked
    checked += 1
    if not ok:
        problem(where, text)


def interpolate(value):
    """Compose's ${VAR:-default} / ${VAR} with the defaults (or a placeholder)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "placeholder", str(value))


def port_of(address):
    return int(str(address).rsplit(":", 1)[1])


def sections_of(binary, bin_dir):
    """The config sections a binary has: participants print their defaults with --help."""
    if binary == "jetsaga":
        return None  # `jetsaga serve` rejects unknown sections itself.
    out = subprocess.run([str(bin_dir / binary), "--help"], capture_output=True, text=True, timeout=30)
    return set(re.findall(r"^\[([\w-]+)\]", out.stdout, re.M))


def accepted(where, binary, args, env, config_text, bin_dir):
    """Runs the binary with this configuration against an unreachable NATS: a refused
    configuration exits 64 before anything connects."""
    global checked
    checked += 1
    path = bin_dir / binary
    if not path.is_file():
        problem(where, f"binary {binary} does not exist in {bin_dir} (not a workspace binary?)")
        return
    sections = sections_of(binary, bin_dir)
    full = {k: v for k, v in os.environ.items() if not k.startswith("JETSAGA_")}
    full.update({k: interpolate(v) for k, v in env.items()})
    full["JETSAGA_NATS__URL"] = "nats://127.0.0.1:1"
    used = {k.split("__")[0][len("JETSAGA_"):].lower().replace("_", "-")
            for k in env if k.startswith("JETSAGA_") and "__" in k}
    with tempfile.TemporaryDirectory() as tmp:
        if config_text is not None:
            file = Path(tmp) / "jetsaga.toml"
            file.write_text(config_text)
            full["JETSAGA_CONFIG"] = str(file)
            used |= set(tomllib.loads(config_text))
        if sections is not None:
            for section in sorted(used - sections):
                problem(where, f"{binary} has no config section [{section}] (it has {sorted(sections)})")
        child = subprocess.Popen([str(path), *args], env=full, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        try:
            _, err = child.communicate(timeout=3)
            if child.returncode == 64:
                problem(where, f"{binary} refuses the configuration: {err.strip()}")
        except subprocess.TimeoutExpired:
            child.kill()  # our own child, by its handle
            child.communicate()


def container_paths(service, compose_dir, where):
    """Bind mounts of a compose service: container path -> host path."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            host = (compose_dir / source).resolve()
            check(host.exists(), where, f"mounted {source} does not exist")
            mounts[target] = host
    return mounts


def resolve(path, mounts):
    for target, host in mounts.items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return host / os.path.relpath(path, target)
    return None


def check_compose(file, bin_dir):
    where = file.relative_to(ROOT)
    doc = yaml.safe_load(file.read_text())
    services = doc["services"]
    listens = {}  # service -> ports it listens on
    for name, svc in services.items():
        w = f"{where} service {name}"
        image = svc.get("image", "")
        check(":" in image and not image.endswith(":latest"), w, f"image {image!r} is not pinned")
        if "build" in svc:
            context = (file.parent / svc["build"]["context"]).resolve()
            check((context / svc["build"]["dockerfile"]).is_file(), w, "Dockerfile not found")
            check(image == JETSAGA_IMAGE, w, f"the built image should be {JETSAGA_IMAGE}, not {image}")
        mounts = container_paths(svc, file.parent, w)
        command = [interpolate(c) for c in svc.get("command", [])]
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        for value in command + list(env.values()):
            for path in re.findall(r"(?:^|=)(/etc/[\w./-]+|/var/lib/[\w./-]+)", value):
                host = resolve(path, mounts)
                check(host is not None and host.exists(), w, f"{path} is not in a mount or does not exist")
        ports = set(KNOWN_PORTS.get(name.split("-")[0], set()))
        if command and command[0] in BINARIES:
            accepted(w, command[0], command[1:], env, None, bin_dir)
            for key in ("JETSAGA_HTTP__LISTEN", "JETSAGA_METRICS__LISTEN"):
                if key in env:
                    ports.add(port_of(env[key]))
            user = env.get("JETSAGA_NATS__USER")
            check(user in NATS_USERS, w, f"NATS user {user!r} is not in deploy/nats/users.conf")
            password = env.get("JETSAGA_NATS__PASSWORD", "")
            check(f"${{{NATS_USERS.get(user)}" in password, w,
                  f"JETSAGA_NATS__PASSWORD should come from {NATS_USERS.get(user)}")
            for url in env["JETSAGA_NATS__URL"].split(","):
                host, port = re.match(r"nats://([\w-]+):(\d+)", url).groups()
                check(host in services and "nats:" in services[host]["image"] and port == "4222",
                      w, f"{url} is not a NATS service's client port")
            otlp = env.get("JETSAGA_TELEMETRY__OTLP_ENDPOINT")
            if otlp:
                host = re.match(r"https?://([\w-]+):4317$", otlp)
                check(host and services.get(host.group(1), {}).get("environment", {}).get("COLLECTOR_OTLP_ENABLED") == "true",
                      w, f"{otlp} is not an OTLP-enabled Jaeger's gRPC port")
        if image.startswith("nats:"):
            missing = PASSWORD_VARS - set(env)
            check(not missing, w, f"nats-server lacks the password variables {sorted(missing)}")
            conf = resolve(command[command.index("-c") + 1], mounts)
            check(conf is not None and conf.is_file(), w, "its -c config is not mounted")
            ports |= {4222, 8222}
        if "prometheus-nats-exporter" in image:
            ports.add(EXPORTER_PORT)
            url = command[-1]
            host = re.match(r"http://([\w-]+):8222$", url)
            check(host and host.group(1) in services, w, f"{url} is not a NATS service's monitoring port")
        for mapping in svc.get("ports", []):
            inside = int(str(mapping).split(":")[-1])
            check(inside in ports, w, f"publishes {mapping} but listens on {sorted(ports)}")
        listens[name] = ports
    # Prometheus targets: the compose Prometheus mounts deploy/prometheus.
    prometheus = services["prometheus"]
    config = next(c.split("=", 1)[1] for c in prometheus["command"] if c.startswith("--config.file="))
    prom_file = resolve(config, container_paths(prometheus, file.parent, f"{where} prometheus"))
    prom = yaml.safe_load(prom_file.read_text())
    for rules in prom.get("rule_files", []):
        check((prom_file.parent / rules).is_file(), f"{prom_file.relative_to(ROOT)}", f"rule file {rules} missing")
    for job in prom["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                check(int(port) in listens.get(host, set()), f"{prom_file.relative_to(ROOT)} job {job['job_name']}",
                      f"target {target}: service {host} does not listen on {port} in {where}")
    # Grafana: provisioned datasource URL and dashboards path.
    grafana = services["grafana"]
    mounts = container_paths(grafana, file.parent, f"{where} grafana")
    for ds_file in resolve("/etc/grafana/provisioning/datasources", mounts).glob("*.yml"):
        for ds in yaml.safe_load(ds_file.read_text())["datasources"]:
            host, port = re.match(r"http://([\w-]+):(\d+)", ds["url"]).groups()
            check(int(port) in listens.get(host, set()), f"{ds_file.relative_to(ROOT)}", f"{ds['url']} is not a service port")
    for db_file in resolve("/etc/grafana/provisioning/dashboards", mounts).glob("*.yml"):
        for provider in yaml.safe_load(db_file.read_text())["providers"]:
            folder = resolve(provider["options"]["path"], mounts)
            check(folder is not None and any(folder.glob("*.json")), f"{db_file.relative_to(ROOT)}",
                  f"{provider['options']['path']} holds no dashboards")


def check_k8s(nats_bin, bin_dir):
    docs = []
    for file in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if file.name == "kustomization.yaml":
            listed = yaml.safe_load(file.read_text())["resources"]
            for resource in listed:
                check((file.parent / resource).is_file(), "deploy/k8s/kustomization.yaml", f"{resource} missing")
            others = {f.name for f in file.parent.glob("*.yaml")} - {"kustomization.yaml"}
            check(others <= set(listed), "deploy/k8s/kustomization.yaml", f"does not list {sorted(others - set(listed))}")
            continue
        docs += [(file.name, d) for d in yaml.safe_load_all(file.read_text()) if d]
    by_kind = {}
    for name, d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = (name, d)
    secrets = {n: set(d.get("stringData", {})) | set(d.get("data", {})) for n, (_, d) in by_kind.get("Secret", {}).items()}
    configmaps = {n: d["data"] for n, (_, d) in by_kind.get("ConfigMap", {}).items()}
    services = {n: d for n, (_, d) in by_kind.get("Service", {}).items()}
    nats_conf = configmaps["nats-config"]
    check(nats_conf["users.conf"] == USERS_CONF, "deploy/k8s/nats.yaml", "users.conf differs from deploy/nats/users.conf")
    with tempfile.TemporaryDirectory() as tmp:
        for key, text in nats_conf.items():
            Path(tmp, key).write_text(text)
        env = dict(os.environ, NATS_SERVER_NAME="nats-0", **{v: "x" for v in PASSWORD_VARS})
        run = subprocess.run([nats_bin, "-t", "-c", str(Path(tmp, "nats.conf"))], env=env, capture_output=True, text=True)
        check(run.returncode == 0, "deploy/k8s/nats.yaml", f"nats-server -t refuses nats.conf: {run.stderr.strip()}")
    for kind in ("Deployment", "StatefulSet"):
        for name, (file, d) in by_kind.get(kind, {}).items():
            w = f"deploy/k8s/{file} {kind} {name}"
            spec = d["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec["containers"]:
                image = c["image"]
                check(":" in image and not image.endswith(":latest"), w, f"image {image} is not pinned")
                env = {}
                for e in c.get("env", []):
                    if "value" in e:
                        env[e["name"]] = e["value"]
                    elif "secretKeyRef" in e.get("valueFrom", {}):
                        ref = e["valueFrom"]["secretKeyRef"]
                        check(ref["key"] in secrets.get(ref["name"], set()), w, f"secret key {ref['name']}/{ref['key']} missing")
                        env[e["name"]] = "placeholder"
                for e in c.get("envFrom", []):
                    check(e["secretRef"]["name"] in secrets, w, f"secret {e['secretRef']['name']} missing")
                mounts = {}
                for m in c.get("volumeMounts", []):
                    vol = volumes.get(m["name"])
                    if vol is None and kind == "StatefulSet":
                        vol = next((t for t in d["spec"].get("volumeClaimTemplates", []) if t["metadata"]["name"] == m["name"]), None)
                    check(vol is not None, w, f"volume {m['name']} is not defined")
                    if vol and "configMap" in vol:
                        mounts[m["mountPath"]] = configmaps.get(vol["configMap"]["name"])
                        check(mounts[m["mountPath"]] is not None, w, f"configmap {vol['configMap']['name']} missing")
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                command = c.get("command", []) + c.get("args", [])
                config_text = None
                if "JETSAGA_CONFIG" in env:
                    directory, key = os.path.split(env["JETSAGA_CONFIG"])
                    config_text = (mounts.get(directory) or {}).get(key)
                    check(config_text is not None, w, f"{env['JETSAGA_CONFIG']} is not in a mounted ConfigMap")
                if command and command[0] in BINARIES:
                    check(image == JETSAGA_IMAGE, w, f"image should be {JETSAGA_IMAGE}")
                    env_for_run = {k: v for k, v in env.items() if k != "JETSAGA_CONFIG"}
                    accepted(w, command[0], command[1:], env_for_run, config_text, bin_dir)
                    config = tomllib.loads(config_text or "")
                    listen = (config.get("http") or config.get("metrics") or {}).get("listen")
                    check(listen is not None and port_of(listen) == ports.get("http"), w,
                          f"container port http {ports.get('http')} is not the configured listen address {listen}")
                    user = config.get("nats", {}).get("user")
                    check(user in NATS_USERS, w, f"NATS user {user!r} is not in users.conf")
                    ref = next(e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"] if e["name"] == "JETSAGA_NATS__PASSWORD")
                    check(ref == NATS_USERS.get(user), w, f"password key {ref} is not {NATS_USERS.get(user)}")
                    for url in config["nats"]["url"].split(","):
                        host = re.match(r"nats://[\w-]+\.([\w-]+):4222$", url)
                        check(host and host.group(1) in services, w, f"{url} is not a pod of a NATS Service")
                if image.startswith("nats:"):
                    conf_dir, conf_key = os.path.split(command[command.index("-c") + 1])
                    check(conf_key in (mounts.get(conf_dir) or {}), w, "its -c config is not in a mounted ConfigMap")
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    if probe in c:
                        get = c[probe]["httpGet"]
                        check(get["port"] in ports, w, f"{probe} port {get['port']} is not a container port")
                        allowed = {"/healthz", "/readyz"} if command and command[0] == "jetsaga" else {"/healthz"}
                        if image.startswith("nats:"):
                            allowed = {"/healthz", "/healthz?js-enabled-only=true"}
                        check(get["path"] in allowed, w, f"{probe} path {get['path']} is not served ({sorted(allowed)})")
            labels = d["spec"]["template"]["metadata"]["labels"]
            matching = [s for s in services.values() if all(labels.get(k) == v for k, v in s["spec"]["selector"].items())]
            check(matching, w, "no Service selects it")
            for s in matching:
                for p in s["spec"]["ports"]:
                    target = p.get("targetPort", p["port"])
                    names = {pp.get("name"): pp["containerPort"] for cc in spec["containers"] for pp in cc.get("ports", [])}
                    check(target in names or target in names.values(), f"Service {s['metadata']['name']}",
                          f"targetPort {target} is not a port of {name}")


def main():
    nats_bin, bin_dir = sys.argv[1], Path(sys.argv[2])
    for file in sorted(DEPLOY.glob("compose*.yaml")):
        check_compose(file, bin_dir)
    check_k8s(nats_bin, bin_dir)
    for p in problems:
        print("PROBLEM " + p)
    print(f"check-references: {checked} checks, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
