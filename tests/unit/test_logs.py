"""The rate-limited logger (flux_edge/logs.py): one line per key per interval, counts carried."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from flux_edge.logs import RateLimitedLog


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in self.records]


@pytest.fixture
def target() -> Iterator[tuple[logging.Logger, _Capture]]:
    logger = logging.getLogger("flux_edge.test.ratelog")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    cap = _Capture()
    logger.addHandler(cap)
    yield logger, cap
    logger.removeHandler(cap)
    logger.propagate = True


def test_one_line_per_key_per_interval_with_the_count_on_the_next(
    target: tuple[logging.Logger, _Capture],
) -> None:
    logger, cap = target
    clock = _Clock()
    rl = RateLimitedLog(logger, 10.0, clock=clock)
    assert rl.log("a", "first %d", 1)
    for i in range(3):
        clock.now += 1
        assert not rl.log("a", "again %d", i)
    assert rl.suppressed("a") == 3
    assert rl.log("b", "other key")  # keys are independent
    clock.now += 6.9  # 9.9 s after the first line: still held
    assert not rl.log("a", "held")
    clock.now += 0.1  # 10 s after the first line
    assert rl.log("a", "later %s", "x")
    assert rl.suppressed("a") == 0
    clock.now += 10
    assert rl.log("a", "quiet")  # nothing held back: no suffix
    assert cap.lines == [
        (logging.WARNING, "first 1"),
        (logging.WARNING, "other key"),
        (logging.WARNING, "later x (4 similar message(s) suppressed)"),
        (logging.WARNING, "quiet"),
    ]


def test_level_per_logger_and_per_call(target: tuple[logging.Logger, _Capture]) -> None:
    logger, cap = target
    clock = _Clock()
    rl = RateLimitedLog(logger, 5.0, level=logging.INFO, clock=clock)
    rl.log("a", "info")
    rl.log("b", "error", level=logging.ERROR)
    rl.warning("c", "warning")
    assert cap.lines == [(logging.INFO, "info"), (logging.ERROR, "error"),
                         (logging.WARNING, "warning")]


def test_percent_signs_without_args_are_kept(target: tuple[logging.Logger, _Capture]) -> None:
    logger, cap = target
    clock = _Clock()
    rl = RateLimitedLog(logger, 5.0, clock=clock)
    rl.log("k", "100% full")
    rl.log("k", "100% full")
    clock.now += 5
    rl.log("k", "100% full")
    assert cap.lines[-1] == (logging.WARNING, "100% full (1 similar message(s) suppressed)")


def test_reset_logs_the_next_at_once_and_drops_the_count(
    target: tuple[logging.Logger, _Capture],
) -> None:
    logger, cap = target
    clock = _Clock()
    rl = RateLimitedLog(logger, 60.0, clock=clock)
    rl.warning("down", "down")
    rl.warning("down", "down")
    rl.reset("down")
    assert rl.warning("down", "down again")
    assert cap.lines[-1] == (logging.WARNING, "down again")


def test_the_record_names_the_caller(target: tuple[logging.Logger, _Capture]) -> None:
    logger, cap = target
    rl = RateLimitedLog(logger, 1.0, clock=_Clock())
    rl.log("a", "via log")
    rl.warning("b", "via warning")
    assert [r.funcName for r in cap.records] == ["test_the_record_names_the_caller"] * 2
    assert all(r.pathname == __file__ for r in cap.records)
