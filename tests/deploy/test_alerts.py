"""The Prometheus alert rules in deploy/prometheus are valid, fire when they should (promtool's rule
unit tests beside them), and query only metrics fhir-edge exports."""

import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus"


def test_the_alert_rules_pass_promtool_and_their_unit_tests():
    subprocess.run(["promtool", "check", "rules", "alerts.yaml"], cwd=RULES, check=True)
    subprocess.run(["promtool", "test", "rules", "alerts.test.yaml"], cwd=RULES, check=True)


def test_the_alert_rules_query_only_exported_metrics():
    src = (REPO / "src" / "ops" / "metrics.rs").read_text()
    exported = set(re.findall(r'"(fhir_edge_[a-z_]+)"', src))
    rules = yaml.safe_load((RULES / "alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs
    for expr in exprs:
        for name in re.findall(r"fhir_edge_[a-z_]+", expr):
            assert name in exported, f"{name} is not exported"
