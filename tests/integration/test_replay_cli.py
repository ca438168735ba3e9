"""`rules test` as a process: `python -m flux_edge.rules.replay_cli --config PATH [--replay FILE]
[--json]` (what `flux-edge rules test` runs): report on stdout, problems on stderr, exit codes
0 / 1 (a rule test failed) / 78 (invalid config) / 2 (unreadable replay file or usage)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON

pytestmark = pytest.mark.integration

CASES = Path(__file__).resolve().parent.parent / "cases" / "replay"


def rules_test(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "flux_edge.rules.replay_cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def copy_case(tmp_path: Path, name: str) -> Path:
    for file in (CASES / name).iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def test_golden_case_as_a_process(cli_env: dict[str, str]) -> None:
    here = CASES / "for_30s"
    proc = subprocess.run(
        [
            PYTHON, "-m", "flux_edge.rules.replay_cli",
            "-c", "config.toml", "--replay", "input.jsonl",
        ],
        cwd=here,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (here / "expected.txt").read_text(encoding="utf-8")
    assert "12:00:30  warning  hot_for_30s fired" in proc.stdout


def test_failing_rule_test_exits_1(cli_env: dict[str, str], tmp_path: Path) -> None:
    case = copy_case(tmp_path, "for_30s")
    config = case / "config.toml"
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('{ t = "40s"', '{ t = "20s"'), encoding="utf-8")
    proc = rules_test(cli_env, "--config", config)
    assert proc.returncode == 1, proc.stderr
    assert (
        "FAILED  rule 'hot_for_30s' test 'fires at 30 s, between the readings' failed: "
        "expected [warning_lamp], the rule asked for []"
    ) in proc.stdout
    assert proc.stdout.endswith("3 rule test(s): 2 passed, 1 failed\n")


def test_invalid_config_exits_78(cli_env: dict[str, str], tmp_path: Path) -> None:
    case = copy_case(tmp_path, "high_temperature")
    config = case / "config.toml"
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('when = "temperature > 80.0"', 'when = "temperature >"'))
    proc = rules_test(cli_env, "--config", config, "--replay", case / "input.jsonl")
    assert proc.returncode == 78
    assert proc.stdout == ""
    assert "rules.high_temperature.when" in proc.stderr


def test_bad_replay_lines_exit_2(cli_env: dict[str, str], tmp_path: Path) -> None:
    case = copy_case(tmp_path, "high_temperature")
    lines = (case / "input.jsonl").read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace('"ts"', '"time"')
    lines[3] = lines[3][:-1]
    (case / "input.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = rules_test(cli_env, "-c", case / "config.toml", "--replay", case / "input.jsonl")
    assert proc.returncode == 2
    assert proc.stdout == ""
    problems = proc.stderr.splitlines()
    assert problems[0].startswith(f'{case / "input.jsonl"}:2: error: unknown key "time"')
    assert problems[1].startswith(f"{case / 'input.jsonl'}:4: error: not a JSON object")
    assert len(problems) == 2


def test_missing_replay_file_exits_2(cli_env: dict[str, str], tmp_path: Path) -> None:
    case = copy_case(tmp_path, "high_temperature")
    proc = rules_test(cli_env, "-c", case / "config.toml", "--replay", case / "nope.jsonl")
    assert proc.returncode == 2
    assert "cannot read the replay file" in proc.stderr


def test_json_report(cli_env: dict[str, str], tmp_path: Path) -> None:
    case = copy_case(tmp_path, "critical_temperature")
    proc = rules_test(
        cli_env, "-c", case / "config.toml", "--replay", case / "input.jsonl", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [(f["time"], f["rule"], f["severity"]) for f in doc["replay"]["firings"]] == [
        ("2026-11-28T12:00:00Z", "high_temperature", "warning"),
        ("2026-11-28T12:00:10Z", "critical_temperature", "error"),
        ("2026-11-28T12:00:30Z", "high_temperature", "warning"),
    ]
    assert doc["ok"] is True and len(doc["tests"]) == 2


def test_usage_error_exits_2(cli_env: dict[str, str]) -> None:
    proc = rules_test(cli_env, "--replay", "x.jsonl")
    assert proc.returncode == 2
    assert "--config" in proc.stderr
