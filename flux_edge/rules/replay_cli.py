"""``flux-edge rules test``: load a config, replay a recording through its rules in simulated
time and run the rules' own test cases (``flux_edge.rules.replay`` does the work; this module is
its command line, apart so that the replayer does not import the config loader that calls it)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from flux_edge.kinds import check_config
from flux_edge.rules.replay import (
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_UNREADABLE,
    ReplayFileError,
    _report_json,
    _tests_deferred,
    format_report,
    read_replay_file,
    replay,
    run_rule_tests,
)


def cmd_rules_test(
    config_path: str | Path,
    replay_path: str | Path | None,
    out: TextIO,
    err: TextIO,
    json: bool = False,
) -> int:
    """``flux-edge rules test``: replay a file (if given) and run the rules' test cases; print
    the report on ``out`` (problems on ``err``). Exit status: 0 every rule test passed (or there
    are none), 1 one failed, 78 the config is invalid, 2 the replay file is unreadable."""
    token = _tests_deferred.set(True)
    try:
        config, problems = check_config(config_path)
    finally:
        _tests_deferred.reset(token)
    for p in problems:
        err.write(f"{p}\n")
    if config is None or any(p.severity == "error" for p in problems):
        errors = sum(1 for p in problems if p.severity == "error")
        err.write(f"{config_path}: invalid configuration ({errors} error(s))\n")
        return EX_CONFIG
    result = None
    name = str(replay_path) if replay_path is not None else ""
    if replay_path is not None:
        try:
            measurements = read_replay_file(replay_path)
        except ReplayFileError as exc:
            err.write(f"{exc}\n")
            return EX_UNREADABLE
        result = replay(config, measurements)
    tests = run_rule_tests(config)
    if json:
        out.write(_report_json(result, tests, name).decode() + "\n")
    else:
        out.write(format_report(result, tests, name))
    return EX_OK if all(t.ok for t in tests) else EX_FAILED


# --- command line ---------------------------------------------------------------------------------


def _cmd(args: argparse.Namespace) -> int:
    config = args.config or args.config_file or os.environ.get("FLUX_EDGE_CONFIG")
    if not config:  # a dry run names the file it tries (the daemon's is not assumed)
        sys.stderr.write("flux-edge rules test: error: give the config: FILE, -c FILE or "
                         "--config FILE (or set $FLUX_EDGE_CONFIG)\n")
        return 2
    return cmd_rules_test(config, args.replay, sys.stdout, sys.stderr, json=args.json)


def _add_test_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="the config to test (TOML; default $FLUX_EDGE_CONFIG)")
    parser.add_argument("config_file", nargs="?", metavar="FILE", help="the same as --config")
    parser.add_argument(
        "--replay", metavar="FILE.jsonl", help="recorded measurements to replay (JSON Lines)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_cmd)


def add_rules_parser(sub: Any) -> None:
    """Add ``rules test`` to the CLI's subparsers (``sub`` from ``add_subparsers``); the parsed
    namespace's ``func(args)`` returns the exit status."""
    rules = sub.add_parser("rules", help="dry-run the rules: replay recordings, run rule tests")
    rsub = rules.add_subparsers(dest="rules_command", required=True, metavar="SUBCOMMAND")
    test = rsub.add_parser(
        "test",
        help="replay recorded measurements in simulated time and run the rules' test cases; "
        "no device is touched",
    )
    _add_test_arguments(test)


def main(argv: list[str] | None = None) -> int:
    """``python -m flux_edge.rules.replay_cli --config PATH [--replay FILE.jsonl] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="python -m flux_edge.rules.replay_cli",
        description="Replay recorded measurements through the rules in simulated time and run "
        "the rules' test cases; no device is touched.",
    )
    _add_test_arguments(parser)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
