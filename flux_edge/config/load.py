"""Loading: text -> Config or a list of Problems, in passes (see the package docstring)."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import tomlkit
import tomlkit.exceptions

from flux_edge.config.budget import _check_budgets
from flux_edge.config.positions import _Positions, _scan, _syntax_problem
from flux_edge.config.profiles import _normalize
from flux_edge.config.references import _check_actuators, _cross_check, _names
from flux_edge.config.schema import Config
from flux_edge.config.validate import _BAD, _Validator
from flux_edge.config.values import Key, _fmt_path
from flux_edge.errors import ConfigError, FluxError, Problem

_log = logging.getLogger("flux_edge.config")
def _check_conditions(v: _Validator, data: dict[str, Any]) -> None:
    """Type-check every rule condition with the rules engine (CEL), if it is importable."""
    if not v.clean(("sources",)) or not data.get("rules"):
        return  # a broken source would make every rule using its registers look wrong
    try:
        engine = importlib.import_module("flux_edge.rules.engine")
    except ModuleNotFoundError as exc:
        if exc.name in ("flux_edge.rules", "flux_edge.rules.engine"):
            return  # not part of this build yet
        v.report((), f"rule conditions were not checked: {exc}", warning=True)
        return
    except ImportError as exc:
        v.report((), f"rule conditions were not checked: {exc}", warning=True)
        return
    check_rules: Callable[[Config], list[Any]] = engine.check_rules
    salvage: dict[str, Any] = {}
    for section in ("plugins", "sources", "rules", "actions", "actuators"):
        entries = data.get(section, {})
        salvage[section] = {k: e for k, e in entries.items() if v.clean((section, k))}
    if v.clean(("daemon",)) and "daemon" in data:
        salvage["daemon"] = data["daemon"]
    try:
        config = msgspec.convert(salvage, Config)
    except msgspec.ValidationError:
        return
    try:
        errors = check_rules(config)
    except FluxError as exc:
        errors = [exc]
    for err in errors:
        rule = getattr(err, "rule", "")
        column = int(getattr(err, "column", 0) or 0)
        # a condition other than a rule's `when` (off_when, an actuator's interlock) says which
        key = getattr(err, "key", None)
        path: Key = tuple(key) if key else ("rules", rule, "when")
        line, col = v.pos.value(path)
        if column > 0:
            line, col = v.pos.in_string(path, column - 1) or (line, col)
        v.problems.append(Problem(v.file, _fmt_path(path), str(err), line, col))
        v.dirty.add(path)
    _check_rule_tests_run(v, config)


def _check_rule_tests_run(v: _Validator, config: Config) -> None:
    """Run the rules' own test cases (in simulated time; no device is touched)."""
    tested = {
        name: rule for name, rule in config.rules.items() if rule.tests and v.clean(("rules", name))
    }
    if not tested:
        return
    try:
        replay = importlib.import_module("flux_edge.rules.replay")
    except ImportError as exc:
        v.report((), f"rule test cases were not run: {exc}", warning=True)
        return
    run: Callable[[Config], list[Any]] = replay.check_rule_tests
    for result in run(msgspec.structs.replace(config, rules=tested)):
        if not result.ok:
            v.report(("rules", result.rule, "tests", result.index), str(result), at="key")


# --- entry points -------------------------------------------------------------------------------

def _check(text: str, file: str, config_path: str) -> tuple[Config | None, list[Problem]]:
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        raw = tomlkit.parse(text).unwrap()
    except (tomlkit.exceptions.TOMLKitError, ValueError, OverflowError) as exc:
        return None, [_syntax_problem(file, exc, _Positions(text))]
    except RecursionError:
        return None, [Problem(file, "", "invalid TOML: values are nested too deeply")]
    positions = _scan(text)
    v = _Validator(file, positions)
    base_dir = Path(config_path).parent if config_path else Path.cwd()
    try:
        data = v.check(raw, Config, ())
        if data is not _BAD:
            _cross_check(v, raw, data, base_dir)
            _normalize(v, data, base_dir)
            _check_actuators(v, data, _names(raw, "actions"))
            _check_conditions(v, data)
    except RecursionError:
        v.report((), "values are nested too deeply")
    config = None
    if v.errors == 0:
        data["path"] = config_path
        try:
            config = msgspec.convert(data, Config)
        except msgspec.ValidationError as exc:  # a gap between this validator and the schema
            v.report((), f"internal error: the checked configuration was refused: {exc}")
        if config is not None:
            _check_budgets(v, config)
            if v.errors:
                config = None
    # this file's problems first, by position; then those of profile files it uses
    problems = sorted(
        v.problems, key=lambda p: (p.file != file, p.file, p.line == 0, p.line, p.column)
    )
    return config, problems


def _split(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    errors = [p for p in problems if p.severity == "error"]
    return errors, [p for p in problems if p.severity != "error"]


def check_config_text(text: str, path: str = "<string>") -> tuple[Config | None, list[Problem]]:
    """Like ``check_config`` for text in memory. ``path`` names it in problems; unless it is
    ``"<...>"`` it also sets ``Config.path`` (so relative plugin paths resolve next to it)."""
    config_path = "" if path.startswith("<") else str(Path(path).resolve())
    return _check(text, path, config_path)


def check_config(path: str | Path) -> tuple[Config | None, list[Problem]]:
    """Load and check a configuration file; never raises for a bad file.

    Returns ``(config, problems)``: every problem found, errors and warnings (``Problem.severity``),
    sorted by position. ``config`` is ``None`` when there is any error. ``flux-edge check-config``
    prints the problems and exits 0 without errors, 78 with.
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, [Problem(file, "", f"cannot read the configuration: {exc.strerror or exc}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded"
        return None, [Problem(file, "", message, line, column)]
    return _check(text, file, str(Path(path).resolve()))


def _finish(config: Config | None, problems: list[Problem]) -> Config:
    errors, warnings = _split(problems)
    if errors or config is None:
        raise ConfigError(errors or problems)
    for warning in warnings:
        _log.warning("%s", warning)
    return config


def load_config(path: str | Path) -> Config:
    """Load a configuration file. Raises ``ConfigError`` holding every error; warnings are logged
    (use ``check_config`` to get them)."""
    return _finish(*check_config(path))


def load_config_text(text: str, path: str = "<string>") -> Config:
    """Load configuration text (``path`` as in ``check_config_text``). Raises ``ConfigError``."""
    return _finish(*check_config_text(text, path))
