"""The shipped Prometheus alert rules: valid (promtool check rules), behaving as their tests say
(promtool test rules, tests/promtool/), and naming only metrics the daemon exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "flux_edge" / "console" / "alerts" / "flux-edge.rules.yml"
TESTS = ROOT / "tests" / "promtool" / "flux-edge.rules.test.yml"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool (Debian: prometheus)")


def test_rules_name_only_exported_metrics() -> None:
    exported = set(re.findall(r'"(flux_edge_[a-z_]+)"',
                              (ROOT / "flux_edge/runtime/observe.py").read_text()))
    used = set(re.findall(r"\b(flux_edge_[a-z_]+)\b", RULES.read_text()))
    assert used, "no metric in the rules?"
    assert used <= exported, sorted(used - exported)


def test_every_alert_is_tested() -> None:
    alerts = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    tested = set(re.findall(r"alertname: (\w+)", TESTS.read_text()))
    assert alerts - tested <= {"FluxEdgeEventLoopLag"}, sorted(alerts - tested)


@needs_promtool
def test_promtool_check_and_test() -> None:
    assert promtool is not None
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([promtool, "test", "rules", TESTS.name], cwd=TESTS.parent,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
