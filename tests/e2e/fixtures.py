"""Processes the end-to-end suite runs: two sekmet-fhir servers with different synthetic patients
(carebundle), and fhir-edge in front of them with its token endpoint and a registered client."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

TENANT_A = "145f4184-1b0b-41c7-ba24-b3c1291bfda1"
TENANT_B = "3c2f9d6e-8a41-4b7e-9f0d-2a6c5e1b7d34"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


class Sekmet:
    """A sekmet-fhir server on 127.0.0.1:<free port>, base URL .../fhir."""

    def __init__(self, workdir: Path, name: str, port: int | None = None):
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        (self.dir / "settings.yaml").write_text(
            f'base_url: "{self.base}"\nhost: 127.0.0.1\nport: {self.port}\ndata_dir: ./data\n'
            "simulator: {enabled: false}\nlog_inbound: false\n"
        )
        self.log = open(self.dir / "sekmet.log", "w")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "sekmet"), "serve", "-c", "settings.yaml"],
            cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_http(f"{self.base}/metadata", self.proc)

    def seed(self, seed: int, count: int):
        """Loads `count` synthetic patients (carebundle, deterministic for `seed`) plus an allergy, a
        medication request and a coverage for each. Returns the patients' server ids."""
        out = self.dir / "bundles"
        subprocess.run(
            [str(VENV_BIN / "carebundle"), "generate", "--profile", "mixed", "--count", str(count),
             "--seed", str(seed), "--sex", "mixed", "--format", "bundle", "--out", str(out)],
            check=True, capture_output=True,
        )
        ids = []
        for f in sorted(out.glob("*.json")):
            r = requests.post(self.base, data=f.read_bytes(),
                              headers={"Content-Type": "application/fhir+json"}, timeout=60)
            r.raise_for_status()
            for e in r.json()["entry"]:
                loc = e["response"].get("location", "")
                if "/Patient/" in loc:
                    ids.append(loc.split("/Patient/")[1].split("/")[0])
        for pid in ids:
            for res in extra_resources(pid):
                requests.post(f"{self.base}/{res['resourceType']}", json=res,
                              headers={"Content-Type": "application/fhir+json"}, timeout=30).raise_for_status()
        return ids

    def stop(self):
        stop_process(self.proc, self.log)


def stop_process(proc, log):
    """SIGTERM, then SIGKILL after 10 s; closes the process's log file."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def extra_resources(pid):
    ref = {"reference": f"Patient/{pid}"}
    return [
        {"resourceType": "AllergyIntolerance",
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
         "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed"}]},
         "code": {"text": "Penicillin"}, "patient": ref},
        {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
         "medicationCodeableConcept": {"text": "Metformin 500 mg tablet"}, "subject": ref},
        {"resourceType": "Coverage", "status": "active", "beneficiary": ref,
         "payor": [{"display": "Contoso Health Plan"}]},
    ]


def fhir_edge_bin():
    b = os.environ.get("FHIR_EDGE_BIN")
    if b:
        return Path(b)
    built = REPO / "target" / "debug" / "fhir-edge"
    if not built.exists():
        subprocess.run(["cargo", "build", "--locked", "--bin", "fhir-edge"], cwd=REPO, check=True)
    return built


# The registration portal's section (with the file client store its state goes in a JSON file beside it).
PORTAL_YAML = """
portal:
  path: /portal
  state_file: portal-state.json
  require_totp: false
"""


class Edge:
    """fhir-edge in front of the two servers: tenant A → `a`, tenant B → `b`, metadata from `a`.
    With `portal`, it serves the registration portal at {base}/portal as well."""

    def __init__(self, workdir: Path, a: Sekmet, b: Sekmet, name: str = "edge", portal: bool = False):
        self.bin = fhir_edge_bin()
        self.dir = workdir / name
        self.dir.mkdir()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.config = self.dir / "fhir-edge.yaml"
        self.portal = f"{self.base}/portal" if portal else None
        keys = REPO / "tests" / "fixtures" / "keys"
        (self.dir / "routes.yaml").write_text(
            f"tenants:\n  {TENANT_A}:\n    name: hospital-a\n    upstream: \"{a.base}\"\n"
            f"  {TENANT_B}:\n    name: hospital-b\n    upstream: \"{b.base}\"\n"
        )
        (self.dir / "clients.yaml").write_text("clients: {}\n")
        (self.dir / "fhir-edge.yaml").write_text(f"""
listen: ["127.0.0.1:{self.port}"]
public_base_url: "{self.base}"
routes_file: routes.yaml
metadata_upstream: "{a.base}"
auth:
  issuers:
    - issuer: "https://unused.example/"
      audience: "unused"
      tenants: any
      keys: [{{ kid: unused, alg: ES256, public_key_file: {keys}/es256.pub.pem }}]
token_endpoint:
  signing_key: {keys}/signing-es256.pem
  clients_file: clients.yaml
admin:
  listen: "127.0.0.1:{free_port()}"
log:
  access: access.log
server:
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
  reload_debounce_ms: 50
  pid_file: {self.dir}/pid
  upgrade_sock: {self.dir}/upgrade.sock
""" + (PORTAL_YAML if portal else ""))
        out = subprocess.run(
            [str(self.bin), "clients", "--config", str(self.dir / "fhir-edge.yaml"), "--json",
             "add", "--name", "teams-patients-app", "--tenant", TENANT_A, "--tenant", TENANT_B],
            check=True, capture_output=True, text=True,
        )
        client = json.loads(out.stdout)
        self.client_id, self.client_secret = client["client_id"], client["client_secret"]
        self.log = open(self.dir / "stderr.log", "w")
        self.proc = subprocess.Popen(
            [str(self.bin), "run", "--config", str(self.dir / "fhir-edge.yaml")],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )
        wait_http(f"{self.base}/metadata", self.proc)

    def logs(self):
        return (self.dir / "stderr.log").read_text()

    def stop(self):
        stop_process(self.proc, self.log)


class World:
    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="fhir-edge-e2e-"))
        self.a = Sekmet(self.tmp, "hospital-a")
        self.b = Sekmet(self.tmp, "hospital-b")
        self.a_patients = self.a.seed(seed=11, count=3)
        self.b_patients = self.b.seed(seed=22, count=3)
        self.edge = Edge(self.tmp, self.a, self.b)

    def stop(self, keep=False):
        self.edge.stop()
        self.a.stop()
        self.b.stop()
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
