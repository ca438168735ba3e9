"""Rules in simulated time: dry runs over recorded measurements, and the rules' own test cases.

Nothing here touches a device or writes state: the engine gets no store, and its clock is
simulated. The clock stands at the current measurement's ``ts``; before each measurement the
``for`` periods and cooldowns that end in between are fired by ``tick`` at their exact deadlines
(``next_deadline`` in a loop), and after the last one up to its ``ts`` (or ``until``). What the
rules asked for is returned (``ReplayResult``), never executed.

* ``replay(config, measurements, until=None) -> ReplayResult``
* ``read_replay_file(path) -> list[Measurement]``: JSON Lines, one measurement a line:
  ``{"device": "boiler", "name": "temperature", "value": 81.2, "ts": 1764331200.5,
  "unit": "°C", "quality": "good"}``; ``ts`` is unix seconds or ISO 8601 (without an offset:
  UTC); ``unit``, ``quality`` (good, stale, bad) and ``source`` are optional. Blank lines and
  lines starting with ``#`` are skipped. Every bad line is reported (``ReplayFileError``).
* ``run_rule_tests(config) -> list[RuleTestResult]``: each rule's ``tests`` cases, each rule
  run alone from a fresh state; ``check_rule_tests`` is the same for the config loader
  (check-config).
* the command line, ``flux-edge rules test --config PATH [--replay FILE.jsonl] [--json]``, is
  ``replay_cli.py`` (``cmd_rules_test``; ``python -m flux_edge.rules.replay_cli`` runs it too).

Times in reports are UTC. Measurements are replayed in ``ts`` order (a stable sort: equal times
keep the file's order), so the simulated clock never goes back.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

import msgspec

from flux_edge.config import Config
from flux_edge.errors import FluxError, Problem, RuleError
from flux_edge.model import Command, Measurement, Value
from flux_edge.rules.engine import RuleEngine

__all__ = [
    "EX_CONFIG",
    "EX_FAILED",
    "EX_OK",
    "EX_UNREADABLE",
    "Firing",
    "ReplayFileError",
    "ReplayResult",
    "RuleSummary",
    "RuleTestResult",
    "SimClock",
    "check_rule_tests",
    "format_report",
    "parse_replay",
    "read_replay_file",
    "replay",
    "replay_engine",
    "run_rule_test",
    "run_rule_tests",
]

EX_OK = 0
EX_FAILED = 1  # a rule test case failed
EX_UNREADABLE = 2  # the replay file cannot be read or has bad lines
EX_CONFIG = 78  # the configuration is invalid

#: simulated wall-clock time of a rule test case's t = 0 (reports show offsets from it)
CASE_EPOCH = 1_700_000_000.0

_MAX_TS = 253_402_300_799.0  # 9999-12-31T23:59:59Z: later times cannot be shown
_KEYS = ("device", "name", "value", "ts", "unit", "quality", "source")
_QUALITIES = ("good", "stale", "bad")
_MAX_SHOWN_PROBLEMS = 20

_rules_log = logging.getLogger("flux_edge.rules")


class SimClock:
    """A clock that moves only when told (set ``now``)."""

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Firing:
    """A rule asked for its actions (``state`` "on") or its off_actions (``state`` "off")."""

    ts: float  # simulated time
    rule: str
    device: str
    state: str  # "on" | "off"
    severity: str  # the rule's severity when it fired; "info" when it went off
    actions: tuple[str, ...]  # what WOULD run, in order
    cause: Measurement | None  # what made the condition true (off: false) - may be earlier


@dataclass(frozen=True, slots=True)
class RuleSummary:
    """What one rule did during a replay."""

    rule: str
    fired: int  # times it asked for its actions
    went_off: int  # times it asked for its off_actions
    evaluations: int
    errors: int  # evaluation errors (treated as unknown: the rule did not fire)
    skipped: int  # triggered while a measurement it reads had no value yet
    suppressed: int  # would have fired within its cooldown
    last_error: str


@dataclass(frozen=True, slots=True)
class ReplayResult:
    firings: tuple[Firing, ...]  # in simulated-time order
    rules: dict[str, RuleSummary]  # every rule of the config, in config order
    measurements: int
    start: float | None  # ts of the first measurement
    end: float | None  # the simulated time the replay ran to

    @property
    def errors(self) -> int:
        """Evaluation errors, all rules together."""
        return sum(s.errors for s in self.rules.values())


class ReplayFileError(FluxError):
    """A replay file could not be read, or some of its lines are not measurements: ``problems``
    holds one ``Problem`` per bad line (``line`` is 1-based)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        shown = [str(p) for p in problems[:_MAX_SHOWN_PROBLEMS]]
        if len(problems) > _MAX_SHOWN_PROBLEMS:
            shown.append(f"... and {len(problems) - _MAX_SHOWN_PROBLEMS} more bad line(s)")
        super().__init__("\n".join(shown) or "unreadable replay file")


# --- replay ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_rules_log() -> Iterator[None]:
    """The engine logs each firing at the rule's severity: in a simulation those are results,
    not events (check-config would otherwise print "rule fired" errors)."""
    was = _rules_log.disabled
    _rules_log.disabled = True
    try:
        yield
    finally:
        _rules_log.disabled = was


def _group(ts: float, commands: list[Command], severity: dict[str, str], out: list[Firing]) -> None:
    """Commands of one engine call -> firings: consecutive commands of one rule, device and
    state are one firing (the engine emits a rule's actions together, in config order)."""
    current: list[Command] = []

    def flush() -> None:
        if not current:
            return
        first = current[0]
        state = str(first.params.get("rule_state", "on"))
        out.append(
            Firing(
                ts=ts,
                rule=first.rule,
                device=str(first.params.get("device", "")),
                state=state,
                severity=severity.get(first.rule, "info") if state == "on" else "info",
                actions=tuple(c.action for c in current),
                cause=first.cause,
            )
        )
        current.clear()

    for c in commands:
        if current and (
            c.rule != current[0].rule
            or c.params.get("device") != current[0].params.get("device")
            or c.params.get("rule_state") != current[0].params.get("rule_state")
        ):
            flush()
        current.append(c)
    flush()


def _tick_until(engine: RuleEngine, clock: SimClock, t: float, out: list[list[Command]]) -> None:
    """Fire every timer due up to ``t``, each at its own deadline."""
    last = None
    while True:
        deadline = engine.next_deadline()
        if deadline is None or deadline > t or deadline == last:
            return  # (a deadline that survives its tick is left to the next measurement)
        last = deadline
        clock.now = max(clock.now, deadline)
        commands = engine.tick(clock.now)
        if commands:
            out.append(commands)


def replay_engine(
    engine: RuleEngine,
    clock: SimClock,
    measurements: Iterable[Measurement],
    *,
    until: float = -1.0,
) -> Iterator[tuple[float, list[Command]]]:
    """The lower level of ``replay``: feed ``measurements`` (in the given order; the clock never
    goes back) to ``engine``, whose clock is ``clock``; yield ``(time, commands)`` at every
    moment something fired, at measurements and at the timers due between them (and up to
    ``until`` when it is later than the last measurement)."""
    batches: list[list[Command]] = []
    for m in measurements:
        _tick_until(engine, clock, m.ts, batches)
        for batch in batches:
            yield batch[0].ts, batch
        batches.clear()
        clock.now = max(clock.now, m.ts)
        commands = engine.on_measurement(m)
        if commands:
            yield clock.now, commands
    _tick_until(engine, clock, until, batches)
    for batch in batches:
        yield batch[0].ts, batch
    clock.now = max(clock.now, until)


@overload
def replay(
    config: Config, measurements: Iterable[Measurement], *, until: float | None = None
) -> ReplayResult: ...


@overload
def replay(
    config: RuleEngine,
    measurements: SimClock,
    clock_measurements: Iterable[Measurement],
    *,
    until: float = -1.0,
) -> Iterator[tuple[float, list[Command]]]: ...


def replay(
    config: Config | RuleEngine,
    measurements: Iterable[Measurement] | SimClock,
    clock_measurements: Iterable[Measurement] = (),
    *,
    until: float | None = None,
) -> ReplayResult | Iterator[tuple[float, list[Command]]]:
    """Feed ``measurements`` through a fresh ``RuleEngine`` (no store) in simulated time and
    return what fired. Timers are run up to the last measurement's ``ts``, or to ``until`` when
    given. Raises ``RuleError`` if a rule does not compile (a loaded config's rules do).

    (``replay(engine, clock, measurements, until=...)`` is ``replay_engine``, kept for callers
    of the first version of this module.)"""
    if isinstance(config, RuleEngine):
        if not isinstance(measurements, SimClock):
            raise TypeError("replay(engine, clock, measurements): clock must be a SimClock")
        return replay_engine(
            config, measurements, clock_measurements, until=-1.0 if until is None else until
        )
    if isinstance(measurements, SimClock):
        raise TypeError("replay(config, measurements): measurements, not a clock")
    return _replay(config, measurements, until)


def _replay(
    config: Config, measurements: Iterable[Measurement], until: float | None
) -> ReplayResult:
    ordered = sorted(measurements, key=lambda m: m.ts)
    clock = SimClock(ordered[0].ts if ordered else (until or 0.0))
    engine = RuleEngine(config, clock=clock, store=None)
    severity: dict[str, str] = {name: rule.severity for name, rule in config.rules.items()}
    end = until if until is not None else (ordered[-1].ts if ordered else -1.0)
    firings: list[Firing] = []
    with _quiet_rules_log():
        for ts, commands in replay_engine(engine, clock, ordered, until=end):
            _group(ts, commands, severity, firings)
    counts: dict[str, list[int]] = {name: [0, 0] for name in config.rules}
    for f in firings:
        counts[f.rule][0 if f.state == "on" else 1] += 1
    rules = {
        name: RuleSummary(
            rule=name,
            fired=counts[name][0],
            went_off=counts[name][1],
            evaluations=stats.evaluations,
            errors=stats.errors,
            skipped=stats.skipped,
            suppressed=stats.suppressed,
            last_error=stats.last_error,
        )
        for name, stats in engine.stats.items()
    }
    return ReplayResult(
        firings=tuple(firings),
        rules=rules,
        measurements=len(ordered),
        start=ordered[0].ts if ordered else None,
        end=clock.now if (ordered or until is not None) else None,
    )


# --- replay files ---------------------------------------------------------------------------------


def _parse_ts(value: Any) -> float | str:
    """unix seconds or ISO 8601 -> float seconds; or a message saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return f"ts must be unix seconds or an ISO 8601 time, got {_json(value)}"
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return (
                f'ts {_json(value)} is not an ISO 8601 time (like "2026-11-28T12:00:30Z") '
                "nor a number of unix seconds"
            )
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ts = when.timestamp()
    else:
        ts = float(value)
    if not math.isfinite(ts) or not 0 <= ts <= _MAX_TS:
        return f"ts {_json(value)} is out of range (1970 to 9999)"
    return ts


def _json(value: Any) -> str:
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _measurement(record: Any) -> Measurement | str:
    if not isinstance(record, dict):
        return f"expected a JSON object (one measurement), got {_json(record)}"
    unknown = [k for k in record if k not in _KEYS]
    if unknown:
        return f"unknown key {_json(unknown[0])}; the keys are: {', '.join(_KEYS)}"
    missing = [k for k in ("device", "name", "value", "ts") if k not in record]
    if missing:
        return f"missing {', '.join(missing)} (each line needs device, name, value and ts)"
    for key in ("device", "name"):
        if not isinstance(record[key], str) or not record[key]:
            return f"{key} must be a non-empty string, got {_json(record[key])}"
    value = record["value"]
    if not isinstance(value, bool | int | float | str):
        return f"value must be a number, true/false or a string, got {_json(value)}"
    ts = _parse_ts(record["ts"])
    if isinstance(ts, str):
        return ts
    unit = record.get("unit", "")
    source = record.get("source", "")
    if not isinstance(unit, str):
        return f"unit must be a string, got {_json(unit)}"
    if not isinstance(source, str):
        return f"source must be a string, got {_json(source)}"
    quality = record.get("quality", "good")
    if quality not in _QUALITIES:
        return f"quality must be one of {', '.join(_QUALITIES)}, got {_json(quality)}"
    return Measurement(
        device=record["device"],
        name=record["name"],
        value=value,
        ts=ts,
        unit=unit,
        quality=quality,
        source=source,
    )


def read_replay_file(path: str | Path) -> list[Measurement]:
    """The measurements of a JSON Lines replay file, in file order. Raises ``ReplayFileError``
    when it cannot be read or any line is bad (every bad line is reported, with its number)."""
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ReplayFileError(
            [Problem(file, "", f"cannot read the replay file: {exc.strerror or exc}")]
        ) from None
    return parse_replay(data, file)


def parse_replay(data: bytes, file: str = "<replay>") -> list[Measurement]:
    """``read_replay_file`` for bytes in memory; ``file`` names them in problems."""
    out: list[Measurement] = []
    problems: list[Problem] = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(file, "", "not UTF-8 text", number, exc.start + 1))
            continue
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            record = msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            problems.append(Problem(file, "", f"not a JSON object: {exc}", number))
            continue
        m = _measurement(record)
        if isinstance(m, str):
            problems.append(Problem(file, "", m, number))
        else:
            out.append(m)
    if problems:
        raise ReplayFileError(problems)
    return out


# --- rule test cases ------------------------------------------------------------------------------


def _secs(t: float) -> str:
    return f"{t:g}s"


@dataclass(frozen=True, slots=True)
class RuleTestResult:
    """The outcome of one test case of one rule."""

    rule: str
    index: int  # position in the rule's ``tests`` (the config key rules.NAME.tests[index])
    name: str  # the case's name, "" if it has none
    expected: tuple[str, ...]
    got: tuple[str, ...]  # the actions the rule asked for, in order
    happened: tuple[str, ...] = ()  # the same with their times: "burner_off at 30s"
    note: str = ""  # evaluation errors, a condition never evaluated, a case that cannot run

    @property
    def ok(self) -> bool:
        return not self.note.startswith("cannot run") and self.expected == self.got

    @property
    def label(self) -> str:
        """How reports name the case: its name, else its position."""
        return repr(self.name) if self.name else f"tests[{self.index}]"

    def __str__(self) -> str:
        head = f"rule {self.rule!r} test {self.label}"
        if self.ok:
            return f"{head}: ok"
        if self.note.startswith("cannot run"):
            return f"{head}: {self.note}"
        text = (
            f"{head} failed: expected [{', '.join(self.expected)}], "
            f"the rule asked for [{', '.join(self.happened)}]"
        )
        return f"{text} ({self.note})" if self.note else text


def run_rule_test(config: Config, rule_name: str, index: int) -> RuleTestResult:
    """Run test case ``index`` of rule ``rule_name``: the rule alone (no other rule, no stored
    state), its ``given`` steps at CASE_EPOCH + t, timers run up to ``at`` (default: the last
    step's t). Raises ``RuleError`` if the rule does not compile."""
    rule = config.rules[rule_name]
    case = rule.tests[index]
    expected = tuple(case.expect)
    steps = sorted(case.given, key=lambda s: s.t)
    for position, step in enumerate(case.given):
        if not (step.device or rule.device):
            note = (
                f"cannot run: given[{position}] names no device and the rule watches every "
                'device (set device = "...")'
            )
            return RuleTestResult(rule_name, index, case.name, expected, (), note=note)
    alone = msgspec.structs.replace(config, rules={rule_name: rule})
    ms = [
        Measurement(
            device=s.device or rule.device,
            name=s.name,
            value=s.value,
            ts=CASE_EPOCH + s.t,
            quality=s.quality,
        )
        for s in steps
    ]
    end = case.at if case.at >= 0 else (steps[-1].t if steps else 0.0)
    result = replay(alone, ms, until=CASE_EPOCH + end)
    got: list[str] = []
    happened: list[str] = []
    for f in result.firings:
        for action in f.actions:
            got.append(action)
            happened.append(f"{action} at {_secs(f.ts - CASE_EPOCH)}")
    summary = result.rules[rule_name]
    note = ""
    if summary.errors:
        last = summary.last_error.removeprefix(f"rule {rule_name!r}: ")
        note = f"{summary.errors} evaluation error(s), the last: {last}"
    elif summary.evaluations == 0 and ms:
        note = (
            "its condition was never evaluated: a measurement it reads never had a good value "
            "(or none of the given names triggers it)"
        )
    return RuleTestResult(rule_name, index, case.name, expected, tuple(got), tuple(happened), note)


def run_rule_tests(config: Config) -> list[RuleTestResult]:
    """Run every test case of every rule, in config order. A rule that does not compile gives
    one failed result per case, saying so."""
    results: list[RuleTestResult] = []
    for name, rule in config.rules.items():
        for index, case in enumerate(rule.tests):
            try:
                results.append(run_rule_test(config, name, index))
            except RuleError as exc:
                results.append(
                    RuleTestResult(
                        name, index, case.name, tuple(case.expect), (), note=f"cannot run: {exc}"
                    )
                )
    return results


#: set while cmd_rules_test loads the config: it runs and reports the tests itself
_tests_deferred: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flux_edge_rule_tests_deferred", default=False
)


def check_rule_tests(config: Config) -> list[RuleTestResult]:
    """``run_rule_tests`` for the config loader (check-config reports failed cases as problems
    at rules.NAME.tests[i]). Returns nothing while ``cmd_rules_test`` loads a config, which
    reports them as test results instead."""
    if _tests_deferred.get():
        return []
    return run_rule_tests(config)


# --- the report -----------------------------------------------------------------------------------


def _show(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _json(value)
    return repr(value)


class _Times:
    """UTC times for a report: HH:MM:SS when the replay stays within one day, else with the
    date; with milliseconds (all of them, to keep the columns) when a time has a fraction."""

    def __init__(self, start: float | None, end: float | None, times: Iterable[float]) -> None:
        one_day = True
        if start is not None and end is not None:
            one_day = _utc(start).date() == _utc(end).date()
        self._fmt = "%H:%M:%S" if one_day else "%Y-%m-%d %H:%M:%S"
        self._millis = any(round(t * 1000) % 1000 for t in times)

    def __call__(self, ts: float) -> str:
        if not self._millis:
            return _utc(ts).strftime(self._fmt)
        ms = round(ts * 1000)
        return f"{_utc(ms // 1000).strftime(self._fmt)}.{ms % 1000:03d}"


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _describe(f: Firing, show: _Times) -> str:
    c = f.cause
    if c is None:
        why = f"device {f.device}"
    else:
        unit = f" {c.unit}" if c.unit else ""
        quality = "" if c.quality == "good" else f" ({c.quality})"
        why = f"{c.device}.{c.name}={_show(c.value)}{unit}{quality}"
        if c.ts < f.ts:
            why += f" since {show(c.ts)}"
    verb = "fired" if f.state == "on" else "off"
    return (
        f"{show(f.ts)}  {f.severity:<7}  {f.rule} {verb} ({why}) -> "
        f"{', '.join(f.actions)} [would run]"
    )


def format_report(
    result: ReplayResult | None, tests: Sequence[RuleTestResult], replay_name: str = ""
) -> str:
    """The text ``flux-edge rules test`` prints."""
    lines: list[str] = []
    if result is not None:
        times = [f.ts for f in result.firings]
        times += [f.cause.ts for f in result.firings if f.cause is not None]
        show = _Times(result.start, result.end, times)
        if result.start is not None and result.end is not None:
            first, last = _utc(result.start), _utc(result.end)
            to = f"{last:%H:%M:%S}" if first.date() == last.date() else f"{last:%Y-%m-%d %H:%M:%S}"
            span = f", {first:%Y-%m-%d %H:%M:%S} to {to} UTC"
        else:
            span = ""
        lines.append(f"replay of {replay_name}: {result.measurements} measurement(s){span}")
        lines.extend(_describe(f, show) for f in result.firings)
        if not result.firings:
            lines.append("no rule fired")
        lines.append("rules:")
        quiet = 0
        width = max((len(n) for n in result.rules), default=0)
        for s in result.rules.values():
            if not (s.fired or s.went_off or s.errors):
                quiet += 1
                continue
            parts = [f"fired {s.fired}"]
            if s.went_off:
                parts.append(f"off {s.went_off}")
            if s.suppressed:
                parts.append(f"{s.suppressed} suppressed by cooldown")
            if s.errors:
                error = s.last_error.removeprefix(f"rule {s.rule!r}: ")
                parts.append(f"{s.errors} evaluation error(s), the last: {error}")
            lines.append(f"  {s.rule:<{width}}  {', '.join(parts)}")
        if quiet:
            lines.append(f"  ({quiet} other rule(s) never fired)")
    if tests:
        lines.append("rule tests:")
        for t in tests:
            text = f"rule {t.rule!r} test {t.label}" if t.ok else str(t)
            lines.append(f"  {'ok' if t.ok else 'FAILED':<6}  {text}")
        failed = sum(1 for t in tests if not t.ok)
        lines.append(f"{len(tests)} rule test(s): {len(tests) - failed} passed, {failed} failed")
    elif result is not None:
        lines.append("no rule test cases")
    if not lines:
        lines.append("no replay file and no rule test cases: nothing to run")
    return "\n".join(lines) + "\n"


def _firing_json(f: Firing) -> dict[str, Any]:
    return {
        "ts": f.ts,
        "time": _utc(f.ts).isoformat().replace("+00:00", "Z"),
        "rule": f.rule,
        "device": f.device,
        "state": f.state,
        "severity": f.severity,
        "actions": list(f.actions),
        "cause": f.cause,
    }


def _report_json(
    result: ReplayResult | None, tests: Sequence[RuleTestResult], replay_name: str
) -> bytes:
    doc: dict[str, Any] = {"replay": None}
    if result is not None:
        doc["replay"] = {
            "file": replay_name,
            "measurements": result.measurements,
            "start": result.start,
            "end": result.end,
            "firings": [_firing_json(f) for f in result.firings],
            "rules": {
                name: {
                    "fired": s.fired,
                    "off": s.went_off,
                    "evaluations": s.evaluations,
                    "errors": s.errors,
                    "skipped": s.skipped,
                    "suppressed": s.suppressed,
                    "last_error": s.last_error,
                }
                for name, s in result.rules.items()
            },
        }
    doc["tests"] = [
        {
            "rule": t.rule,
            "index": t.index,
            "name": t.name,
            "ok": t.ok,
            "expected": list(t.expected),
            "got": list(t.got),
            "message": str(t),
        }
        for t in tests
    ]
    doc["ok"] = all(t.ok for t in tests)
    return msgspec.json.encode(doc)
