"""Rules in simulated time: a rule's own test cases, and replays of recorded measurements.

Nothing here touches a device: the engine runs on a clock that jumps from one measurement's time
to the next, and its ``tick`` fires the ``for`` periods and cooldowns that end in between, at
their exact times.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgspec

from flux_edge.config import Config, RuleTest
from flux_edge.errors import RuleError
from flux_edge.model import Command, Measurement
from flux_edge.rules.engine import RuleEngine

__all__ = ["RuleTestResult", "SimClock", "check_rule_tests", "replay", "run_rule_test"]

#: simulated wall-clock time of a test case's t = 0 (any fixed value would do)
CASE_EPOCH = 1_700_000_000.0


class SimClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True, slots=True)
class RuleTestResult:
    rule: str
    index: int  # position in the rule's ``tests``
    name: str
    expected: tuple[str, ...]
    got: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.expected == self.got

    def __str__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        if self.ok:
            return f"rule {self.rule!r} test{label}: ok"
        return (
            f"rule {self.rule!r} test{label} failed: expected "
            f"[{', '.join(self.expected)}], the rule asked for [{', '.join(self.got)}]"
        )


def replay(
    engine: RuleEngine, clock: SimClock, measurements: Iterable[Measurement], *, until: float = -1
) -> Iterator[tuple[float, list[Command]]]:
    """Feed ``measurements`` (in time order, by ``ts``) to ``engine`` in simulated time; yield
    ``(time, commands)`` for every moment something fired: at measurements, and at the timers
    that end between them (and up to ``until``, when it is later than the last measurement)."""
    for m in measurements:
        yield from _tick_until(engine, clock, m.ts)
        clock.now = max(clock.now, m.ts)
        commands = engine.on_measurement(m)
        if commands:
            yield clock.now, commands
    yield from _tick_until(engine, clock, until)


def _tick_until(
    engine: RuleEngine, clock: SimClock, t: float
) -> Iterator[tuple[float, list[Command]]]:
    while True:
        deadline = engine.next_deadline()
        if deadline is None or deadline > t:
            return
        clock.now = max(clock.now, deadline)
        commands = engine.tick(clock.now)
        if commands:
            yield clock.now, commands


def run_rule_test(config: Config, rule_name: str, index: int) -> RuleTestResult:
    """Run test case ``index`` of rule ``rule_name`` alone (no other rule, no stored state).
    Raises ``RuleError`` if the rule does not compile."""
    rule = config.rules[rule_name]
    case: RuleTest = rule.tests[index]
    alone = msgspec.structs.replace(config, rules={rule_name: rule})
    clock = SimClock(CASE_EPOCH)
    engine = RuleEngine(alone, clock=clock, log_firings=False)
    steps = sorted(case.given, key=lambda s: s.t)
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
    got: list[str] = []
    for _, commands in replay(engine, clock, ms, until=CASE_EPOCH + end):
        got.extend(c.action for c in commands)
    return RuleTestResult(rule_name, index, case.name, tuple(case.expect), tuple(got))


def check_rule_tests(config: Config) -> list[RuleTestResult]:
    """Run every rule's test cases; return every result (failed ones have ``ok`` False). Rules
    that do not compile are skipped (their errors are reported by ``check_rules``)."""
    results: list[RuleTestResult] = []
    for name, rule in config.rules.items():
        for index in range(len(rule.tests)):
            try:
                results.append(run_rule_test(config, name, index))
            except RuleError:
                break
    return results
