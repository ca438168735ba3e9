"""Per-measurement cost of the rule engine with 10 and 1,000 rules.

Each rule watches its own device (dev0..devN-1, 4 registers each) with a condition on two of its
registers. A measurement reaches the rules of its device only (the index), so the cost per
measurement should stay flat as rules are added. Also measured: a measurement no rule reads, a
bare ``Condition.evaluate``, and the time to build the engine (compile every rule).

Rule kinds (``--kinds``): ``plain`` (edge/level, no time), ``timed`` (``for``, ``cooldown``,
``max_age``, hysteresis with ``off_when``), ``delta`` (reads ``delta.temperature`` and
``age.pressure``), ``stored`` (``timed`` with the SQLite rule-state store: it writes only when
a rule's state changes, which this steady stream rarely does). The engine reads the real clock
(``time.time``), as in production.

Also (``guard``) the per-evaluation overhead of the budget guards in ``Condition.evaluate``
(input caps on strings and maps, every library exception caught): the same compiled program
evaluated by a copy of the evaluate of before the guards and by the current one, alternately in
the same run, and their ratio.

    .venv/bin/python bench/rules_eval.py [--seconds 1.0] [--kinds plain,timed,delta,stored]
        [--guard-only]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flux_edge.config import Config, RuleConfig
from flux_edge.errors import RuleError
from flux_edge.model import Measurement
from flux_edge.rules import RuleEngine, compile_condition
from flux_edge.rules.state import RuleStore
from flux_edge.sources.modbus.spec import ModbusTcpSource, RegisterConfig


def make_rule(i: int, kind: str) -> RuleConfig:
    when = f"temperature > {50 + i % 40} && !pump"
    mode = "level" if i % 2 else "edge"
    device = f"dev{i}"
    if kind in ("timed", "stored"):
        return RuleConfig(
            when=when,
            actions=("alarm",),
            device=device,
            mode=mode,
            for_=30.0,
            cooldown=60.0,
            max_age=600.0,
            off_when="temperature < 40.0",
            off_actions=("alarm",),
        )
    if kind == "delta":
        when = f"delta.temperature > {i % 5}.0 && age.pressure < 60.0 && !pump"
    return RuleConfig(when=when, actions=("alarm",), device=device, mode=mode)


def make_config(n_rules: int, kind: str = "plain") -> Config:
    sources = {
        f"dev{i}": ModbusTcpSource(
            host="127.0.0.1",
            registers=(
                RegisterConfig(name="temperature", address=0),
                RegisterConfig(name="pressure", address=1),
                RegisterConfig(name="flow", address=2),
                RegisterConfig(name="pump", address=3, function="coil"),
            ),
        )
        for i in range(n_rules)
    }
    rules = {f"rule{i}": make_rule(i, kind) for i in range(n_rules)}
    return Config(sources=sources, rules=rules)


def per_call(fn: Callable[[], object], seconds: float) -> float:
    """Best-of-5 mean seconds per call."""
    n = 1000
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t > seconds / 5:
            break
        n *= 2
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def bench_engine(n_rules: int, seconds: float, kind: str, state_dir: Path) -> None:
    cfg = make_config(n_rules, kind)
    store = RuleStore(state_dir / f"{kind}-{n_rules}.sqlite") if kind == "stored" else None
    t = time.perf_counter()
    engine = RuleEngine(cfg, clock=time.time, store=store)
    build = time.perf_counter() - t

    # prime every device's pump (and pressure) so the rules evaluate
    now = time.time()
    for i in range(n_rules):
        engine.on_measurement(Measurement(device=f"dev{i}", name="pump", value=False, ts=now))
        engine.on_measurement(Measurement(device=f"dev{i}", name="pressure", value=1.0, ts=now))
    ms = [
        Measurement(device=f"dev{i % n_rules}", name="temperature", value=float(v), ts=now)
        for i, v in enumerate(range(1000))
    ]
    it = iter(ms * 10_000)

    def step() -> None:
        engine.on_measurement(next(it))

    evaluated = per_call(step, seconds)
    other = Measurement(device="dev0", name="flow", value=1.0, ts=now)
    unread = per_call(lambda: engine.on_measurement(other), seconds)
    print(
        f"{kind:>6} {n_rules:>5} rules: build {build * 1e3:7.1f} ms "
        f"({build / n_rules * 1e6:5.0f} µs/rule); "
        f"measurement that evaluates 1 rule {evaluated * 1e6:5.2f} µs; "
        f"measurement no rule reads {unread * 1e6:5.2f} µs"
    )


_MISSING = object()


def legacy_evaluate(cond: Any, values: Mapping[str, Any]) -> bool:
    """``Condition.evaluate`` as it was before the budget guards (type checks, one eval)."""
    data = values
    converted: dict[str, Any] | None = None
    for name, want in cond._checks:
        v = values.get(name, _MISSING)
        got = type(v)
        if got is want:
            continue
        if want is float and (got is int or got is bool):
            if converted is None:
                data = converted = dict(values)
            converted[name] = float(v)
        elif v is _MISSING:
            raise RuleError(cond.rule, f"evaluation failed: no value for {name!r}")
        else:
            raise RuleError(cond.rule, f"evaluation failed: {name!r} is {got.__name__}")
    try:
        result = cond._program.eval(data=data).value()
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise RuleError(cond.rule, f"evaluation failed: {exc}") from exc
    if result is True or result is False:
        return bool(result)
    raise RuleError(cond.rule, f"evaluation failed: {result}")


def bench_guard(seconds: float) -> None:
    """Old and new evaluate, alternately (best of 9 rounds each), on three conditions."""
    cases: list[tuple[str, str, dict[str, str], dict[str, Any]]] = [
        ("scalars", "temperature > 80 && !pump", {"temperature": "double", "pump": "bool"},
         {"temperature": 81.0, "pump": False}),
        ("a string", 'mode == "auto" && temperature > 80.0',
         {"mode": "string", "temperature": "double"}, {"mode": "auto", "temperature": 81.0}),
        ("a map of 8", "delta.exists(k, delta[k] > 5.0) && temperature > 80.0",
         {"delta": "map(double)", "temperature": "double"},
         {"delta": {f"m{i}": float(i) for i in range(8)}, "temperature": 81.0}),
    ]  # fmt: skip
    for label, expr, variables, data in cases:
        cond = compile_condition("r", expr, variables)
        old = new = float("inf")

        def before(c: Any = cond, d: dict[str, Any] = data) -> object:
            return legacy_evaluate(c, d)

        def now(c: Any = cond, d: dict[str, Any] = data) -> object:
            return c.evaluate(d)

        for _ in range(9):
            old = min(old, per_call(before, seconds / 9))
            new = min(new, per_call(now, seconds / 9))
        print(
            f"guard, {label:>10}: evaluate before {old * 1e6:5.2f} µs, now {new * 1e6:5.2f} µs, "
            f"ratio {new / old:.3f} (estimated worst case {cond.cost:,} units)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per figure")
    parser.add_argument("--kinds", default="plain,timed,delta,stored", help="rule kinds")
    parser.add_argument("--guard-only", action="store_true", help="only the guard overhead")
    args = parser.parse_args()

    bench_guard(args.seconds)
    if args.guard_only:
        return

    cond = compile_condition(
        "r", "temperature > 80 && !pump", {"temperature": "double", "pump": "bool"}
    )
    data: dict[str, bool | int | float | str] = {"temperature": 81.0, "pump": False}
    data_int: dict[str, bool | int | float | str] = {"temperature": 81, "pump": False}
    print(
        f"Condition.evaluate: {per_call(lambda: cond.evaluate(data), args.seconds) * 1e6:.2f} µs "
        f"(int for a double, converted: "
        f"{per_call(lambda: cond.evaluate(data_int), args.seconds) * 1e6:.2f} µs)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            for n in (10, 1000):
                bench_engine(n, args.seconds, kind, Path(tmp))


if __name__ == "__main__":
    main()
