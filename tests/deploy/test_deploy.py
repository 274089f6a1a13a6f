"""The deployment files in deploy/ are valid and agree with fhir-edge: the Kubernetes manifests hang
together and their embedded configuration passes `fhir-edge check`, the Grafana dashboard only queries
metrics fhir-edge exports, and the systemd unit has what it needs."""

import configparser
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def fhir_edge():
    return os.environ.get("FHIR_EDGE_BIN", str(REPO / "target" / "debug" / "fhir-edge"))


def manifests():
    docs = []
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_kubernetes_manifests_hang_together():
    m = manifests()
    # Several replicas share the client registry in PostgreSQL, and a Job migrates its schema.
    cfg = yaml.safe_load(m[("ConfigMap", "fhir-edge-config")]["data"]["fhir-edge.yaml"])
    assert cfg["token_endpoint"]["clients"]["store"] == "postgres"
    assert m[("Deployment", "fhir-edge")]["spec"]["replicas"] >= 2
    job = m[("Job", "fhir-edge-db-migrate")]["spec"]["template"]["spec"]
    assert job["containers"][0]["args"][:2] == ["db", "migrate"]
    secret = m[("Secret", "fhir-edge-secrets")]["stringData"]
    assert {"database-url", "database-owner-url"} <= secret.keys()
    for (kind, name), d in m.items():
        assert d.get("apiVersion"), (kind, name)
    dep = m[("Deployment", "fhir-edge")]
    spec = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    (c,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ann["prometheus.io/port"] == str(ports["admin"])
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mnt in c["volumeMounts"]:
        assert mnt["name"] in volumes, mnt
        assert "subPath" not in mnt, "a subPath mount never sees ConfigMap updates"
    assert ("ConfigMap", volumes["config"]["configMap"]["name"]) in m
    assert ("Secret", volumes["secrets"]["secret"]["secretName"]) in m
    svc = m[("Service", "fhir-edge")]
    assert svc["spec"]["selector"].items() <= labels.items()
    targets = {p["targetPort"] for p in svc["spec"]["ports"]}
    assert targets == {"http"}, "only the public port is exposed; the admin port stays private"
    cfg = yaml.safe_load(m[("ConfigMap", "fhir-edge-config")]["data"]["fhir-edge.yaml"])
    assert cfg["admin"]["listen"].endswith(f":{ports['admin']}")
    assert any(l.endswith(f":{ports['http']}") for l in cfg["listen"])
    grace = cfg["server"]["grace_period_seconds"] + cfg["server"]["graceful_shutdown_timeout_seconds"]
    # A rollout never refuses connections: the pod keeps serving while it leaves the endpoints.
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause >= 3
    assert spec["terminationGracePeriodSeconds"] > pause + grace
    # Drains leave a replica serving, and replicas spread over nodes.
    pdb = m[("PodDisruptionBudget", "fhir-edge")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["minAvailable"] < dep["spec"]["replicas"]
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()


def test_the_kubernetes_configuration_passes_fhir_edge_check(tmp_path):
    m = manifests()
    etc, secrets = tmp_path / "etc", tmp_path / "secrets"
    etc.mkdir()
    secrets.mkdir()
    hosts = re.compile(r"[a-z0-9.-]+\.(svc\.cluster\.local|example)(?=[:/\"])")
    # The registry's database is not contacted (--offline); its URL must still be there and parse.
    for name, text in m[("ConfigMap", "fhir-edge-config")]["data"].items():
        text = text.replace("/var/run/secrets/fhir-edge", str(secrets))
        # Cluster host names do not resolve here; the check is about everything else.
        text = hosts.sub("127.0.0.1", text)
        (etc / name).write_text(text)
    for name, text in m[("Secret", "fhir-edge-secrets")]["stringData"].items():
        if name != "signing.pem":
            (secrets / name).write_text(text)
    subprocess.run([fhir_edge(), "keygen", "--out", str(secrets / "signing.pem")], check=True, capture_output=True)
    out = subprocess.run([fhir_edge(), "check", "--offline", "--config", str(etc / "fhir-edge.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "clients in postgres" in out.stdout, out.stdout


def exported_metrics():
    src = (REPO / "src" / "ops" / "metrics.rs").read_text()
    names = set(re.findall(r'"(fhir_edge_[a-z_]+)"', src))
    histograms = {n for n in names if n.endswith("_seconds") and "duration" in n}
    return names | {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}


def test_the_grafana_dashboard_queries_only_exported_metrics():
    dash = json.loads((DEPLOY / "grafana" / "fhir-edge-dashboard.json").read_text())
    exported = exported_metrics()
    assert "fhir_edge_requests_total" in exported
    seen = set()
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
        for t in p["targets"]:
            for name in re.findall(r"fhir_edge_[a-z_]+", t["expr"]):
                assert name in exported, f"{p['title']}: {name} is not exported"
                seen.add(name)
    # What the issue asks the dashboard to show.
    for needed in ("fhir_edge_requests_total", "fhir_edge_request_duration_seconds_bucket",
                   "fhir_edge_auth_failures_total", "fhir_edge_reloads_total"):
        assert needed in seen, needed


def test_the_systemd_unit_runs_fhir_edge_with_reload_and_drain():
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "systemd" / "fhir-edge.service")
    s = unit["Service"]
    assert s["ExecStart"].split()[1:] == ["run", "--config", "/etc/fhir-edge/fhir-edge.yaml"]
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["KillSignal"] == "SIGTERM"
    # The binary upgrade (SIGUSR2) hands the service to a new main process, which says so itself.
    assert s["Type"] == "notify" and s["NotifyAccess"] == "all"
    assert int(s["TimeoutStopSec"]) > 10
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubelet_files(directory: Path, files: dict, mode: int, group: int):
    """Writes a volume's files the way the kubelet does: owned by root and the pod's fsGroup (root
    without one), with the volume's mode."""
    directory.mkdir(mode=0o755)
    os.chown(directory, 0, group)
    for name, text in files.items():
        p = directory / name
        p.write_text(text)
        os.chown(p, 0, group)
        p.chmod(mode)


def image_under_test(tmp: Path):
    """The image scripts/build-image makes, from the binary under test, under a test-only name; and
    the podman command with its settings (runc, rlimits this machine allows). Removed by the caller."""
    tag = "localhost/fhir-edge:deploy-test"
    subprocess.run([str(REPO / "scripts" / "build-image"), "--binary", fhir_edge(), "--tag", tag],
                   check=True, capture_output=True, text=True, timeout=300)
    import resource
    # As many descriptors as this machine lets a process have, up to the systemd unit's 65536.
    nofile = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    conf = tmp / "containers.conf"
    conf.write_text('[engine]\nruntime = "runc"\n[containers]\n'
                    f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n')
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    return tag, env


def test_the_kubernetes_manifest_names_the_image_the_build_script_makes():
    default = subprocess.run([str(REPO / "scripts" / "build-image"), "--print-tag"], check=True,
                             capture_output=True, text=True).stdout.strip()
    m = manifests()
    for kind, name in (("Deployment", "fhir-edge"), ("Job", "fhir-edge-db-migrate")):
        (c,) = m[(kind, name)]["spec"]["template"]["spec"]["containers"]
        assert c["image"] == default, (kind, c["image"], default)


@pytest.mark.parametrize("runner", ["setpriv", "podman"])
def test_the_kubernetes_pod_starts_as_its_container_would(runner):
    """The Deployment's container, reproduced with the real binary: its user and groups (runAsUser,
    runAsGroup, fsGroup), its volumes' owners and modes, its probes. A key it cannot read would make
    it exit at start, and Kubernetes would restart it forever. With `setpriv` the binary runs as the
    container's user on this machine; with `podman` the image scripts/build-image builds runs as the
    pod would run it (read-only root, no capabilities, the volumes mounted where the manifest says)."""
    import shutil
    import tempfile
    import time
    import urllib.error
    import urllib.request

    if os.geteuid() != 0:
        pytest.fail("needs root to reproduce the container's user and file owners")
    m = manifests()
    pod = m[("Deployment", "fhir-edge")]["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    (c,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    fs_group = sc.get("fsGroup")
    root = Path(tempfile.mkdtemp(prefix="fhir-edge-pod-"))
    image = None
    try:
        root.chmod(0o755)
        mounts = {mnt["mountPath"]: root / mnt["name"] for mnt in c["volumeMounts"]}
        http_port, admin_port = free_port(), free_port()

        mount_paths = re.compile("(" + "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
                                 + r")(?=[/\"'\s]|$)")

        def localise(text: str) -> str:
            # In the container the volumes are where the manifest mounts them; on this machine,
            # under the (temporary) root. One pass, so a moved path is not moved again.
            if runner == "setpriv":
                text = mount_paths.sub(lambda mt: str(mounts[mt.group(1)]), text)
            text = re.sub(r"[a-z0-9.-]+\.(svc\.cluster\.local|example)(?=[:/\"])", "127.0.0.1", text)
            text = text.replace('"0.0.0.0:8080"', f'"127.0.0.1:{http_port}"')
            return text.replace('"0.0.0.0:9089"', f'"127.0.0.1:{admin_port}"')

        config_files = {k: localise(v) for k, v in m[("ConfigMap", "fhir-edge-config")]["data"].items()}
        kubelet_files(mounts["/etc/fhir-edge"], config_files,
                      volumes["config"]["configMap"].get("defaultMode", 0o644), fs_group or 0)
        secret = dict(m[("Secret", "fhir-edge-secrets")]["stringData"])
        key = root / "key.pem"
        subprocess.run([fhir_edge(), "keygen", "--out", str(key)], check=True, capture_output=True)
        secret["signing.pem"] = key.read_text()
        kubelet_files(mounts["/var/run/secrets/fhir-edge"], secret,
                      volumes["secrets"]["secret"].get("defaultMode", 0o644), fs_group or 0)
        tmp = mounts["/tmp"]
        tmp.mkdir()
        os.chown(tmp, sc["runAsUser"], sc["runAsGroup"])
        env = None
        if runner == "setpriv":
            # The image: the binary in a directory anyone may read.
            binary = root / "fhir-edge"
            shutil.copy(fhir_edge(), binary)
            binary.chmod(0o755)
            groups = ["--groups", str(fs_group)] if fs_group is not None else ["--clear-groups"]
            as_container = ["setpriv", "--reuid", str(sc["runAsUser"]), "--regid", str(sc["runAsGroup"]),
                            *groups, "--", str(binary)]
        else:
            image, env = image_under_test(root)
            csc = c["securityContext"]
            as_container = ["podman", "run", "--rm", "--network", "host",
                            "--user", f"{sc['runAsUser']}:{sc['runAsGroup']}",
                            *(["--group-add", str(fs_group)] if fs_group is not None else []),
                            *(["--read-only"] if csc.get("readOnlyRootFilesystem") else []),
                            *(["--cap-drop", "all"] if "ALL" in csc.get("capabilities", {}).get("drop", []) else []),
                            *(["--security-opt", "no-new-privileges"]
                              if csc.get("allowPrivilegeEscalation") is False else []),
                            *[a for mnt in c["volumeMounts"] for a in
                              ("-v", f"{mounts[mnt['mountPath']]}:{mnt['mountPath']}"
                                     + (":ro" if mnt.get("readOnly") else ""))],
                            image]
        args = [localise(a) for a in c["args"]]
        log = open(root / "stderr.log", "w")
        proc = subprocess.Popen(as_container + args, stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            def probe(path):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=2) as r:
                        return r.status
                except urllib.error.HTTPError as e:
                    return e.code
                except OSError:
                    return None

            deadline = time.time() + 30
            while probe(c["livenessProbe"]["httpGet"]["path"]) != 200:
                assert proc.poll() is None, "the container exited:\n" + (root / "stderr.log").read_text()
                assert time.time() < deadline, (root / "stderr.log").read_text()
                time.sleep(0.1)
            # No database here, so not ready: the readiness probe keeps it out of the Service until
            # the registry is read, while the liveness probe keeps it running.
            assert probe(c["readinessProbe"]["httpGet"]["path"]) == 503
            time.sleep(1)
            assert proc.poll() is None, (root / "stderr.log").read_text()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
        stderr = (root / "stderr.log").read_text()
        assert "Permission denied" not in stderr, stderr
        # The migration Job, as the same user with its own mounts, reads its files too (and then
        # finds no database).
        job = m[("Job", "fhir-edge-db-migrate")]["spec"]["template"]["spec"]
        out = subprocess.run(as_container + [localise(a) for a in job["containers"][0]["args"]],
                             capture_output=True, text=True, timeout=60, env=env)
        assert "Permission denied" not in out.stderr and "cannot read" not in out.stderr, out.stderr
        assert "unavailable" in out.stderr, out.stderr
    finally:
        if image:
            subprocess.run(["podman", "rmi", "--force", image], capture_output=True, env=env)
        shutil.rmtree(root, ignore_errors=True)


def test_every_shipped_file_matches_its_json_schema():
    """conf/schema/ holds the JSON Schema of each file an operator writes (generated from the structs
    that read them; `cargo test` checks they are current). Every shipped file must match its schema,
    and the schemas must catch a misspelt key as fhir-edge does."""
    import jsonschema

    schemas = {name: json.loads((REPO / "conf" / "schema" / f"{name}.schema.json").read_text())
               for name in ("fhir-edge", "routes", "clients")}
    for s in schemas.values():
        jsonschema.Draft202012Validator.check_schema(s)
    files = [("fhir-edge", yaml.safe_load((REPO / "conf" / "fhir-edge.yaml").read_text())),
             ("routes", yaml.safe_load((REPO / "conf" / "routes.yaml").read_text())),
             ("clients", yaml.safe_load((REPO / "conf" / "clients.yaml").read_text()))]
    data = manifests()[("ConfigMap", "fhir-edge-config")]["data"]
    files += [("fhir-edge", yaml.safe_load(data["fhir-edge.yaml"])),
              ("fhir-edge", yaml.safe_load(data["migrate.yaml"])),
              ("routes", yaml.safe_load(data["routes.yaml"]))]
    for name, doc in files:
        # YAML timestamps and the like arrive as Python objects; the schema speaks JSON.
        doc = json.loads(json.dumps(doc, default=str))
        errors = sorted(jsonschema.Draft202012Validator(schemas[name]).iter_errors(doc), key=str)
        assert not errors, f"{name}: " + "; ".join(e.message for e in errors)
    bad = yaml.safe_load((REPO / "conf" / "fhir-edge.yaml").read_text())
    bad["admin"]["tenant_lable"] = "name"
    assert not jsonschema.Draft202012Validator(schemas["fhir-edge"]).is_valid(bad)
    bad_route = {"tenants": {"145f4184-1b0b-41c7-ba24-b3c1291bfda1": {"name": "x", "upstream": "http://a", "tls_verfy": False}}}
    assert not jsonschema.Draft202012Validator(schemas["routes"]).is_valid(bad_route)
