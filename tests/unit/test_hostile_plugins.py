"""Hostile plugins against the plugin host (issue #12, items 2 and 3).

Every module of tests/fixtures/wat/hostile/ (see its README) breaks one budget or rule of
docs/plugin-abi.md on purpose. Each test asserts the outcome (error records, never an
exception), the counts by reason in PluginStats, and where memory is at stake the peak RSS of
a child process that runs the plugin (well under the unit's MemoryMax=256M).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flux_edge.errors import PluginLoadError
from flux_edge.model import ErrorRecord, Measurement, Reading
from flux_edge.plugins import ffi
from flux_edge.plugins import host as host_module
from flux_edge.plugins.abi import MAX_DEPTH
from flux_edge.plugins.host import (
    FAILED_CALL_REASONS,
    LOG_BURST,
    LOG_RATE,
    MAX_OUTPUT_BYTES,
    MAX_RECORDS_PER_MESSAGE,
    REASONS,
    Plugin,
    PluginHost,
    PluginLimits,
)
from flux_edge.plugins.logsink import LogSink, escape_text

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ROOT / "tests" / "fixtures" / "wat" / "hostile"
MiB = 1 << 20


def reading(k: int = 0) -> Reading:
    return Reading(source="src", device="dev", ts=1000.0 + k, kind=1, registers=(k, 0), function=3)


def batch(n: int) -> list[Reading]:
    return [reading(k) for k in range(n)]


@pytest.fixture
def host() -> Any:
    with PluginHost(None, epoch_tick=0.002) as h:
        yield h


def load(host: PluginHost, name: str, *, wasi: bool = False, **limits: Any) -> Plugin:
    cfg = {"d": limits.pop("deadline")} if "deadline" in limits else {}
    return host.load(name, HOSTILE / f"{name}.wat", PluginLimits(**limits), cfg, wasi=wasi)


def errors_of(out: list[Measurement | ErrorRecord]) -> list[str]:
    assert all(isinstance(r, ErrorRecord) for r in out), out
    return [r.error for r in out if isinstance(r, ErrorRecord)]


def counts(plugin: Plugin) -> tuple[dict[str, int], dict[str, int]]:
    """The non-zero dead letters and failed calls, by reason."""
    s = plugin.stats
    assert set(s.dead_letters) == set(REASONS)  # every reason there from the start
    assert set(s.failed_calls) == set(FAILED_CALL_REASONS)
    assert s.errors == sum(s.dead_letters.values())
    assert s.failures == sum(s.failed_calls.values())
    dead = {k: v for k, v in s.dead_letters.items() if v}
    failed = {k: v for k, v in s.failed_calls.items() if v}
    return dead, failed


# --- peak RSS, measured in a child process ----------------------------------------------------


def _child(name: str, limits: dict[str, Any], calls: int, wasi: bool) -> None:  # pragma: no cover
    """Run in a child: load echo.wat as a baseline, then ``name``; print both peak RSS (MiB)
    and the hostile plugin's counts as JSON."""
    def peak() -> float:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a
        # pytest process that has grown to 300 MB would read 300 MB before doing anything
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc/self/status")

    with PluginHost(None) as h:
        echo = h.load("echo", ROOT / "tests" / "fixtures" / "wat" / "echo.wat", PluginLimits(), {})
        echo.process(batch(64))
        base = peak()
        p = h.load(name, HOSTILE / f"{name}.wat", PluginLimits(**limits), {}, wasi=wasi)
        outs = [p.process(batch(3)) for _ in range(calls)]
        print(
            json.dumps(
                {
                    "base": base,
                    "peak": peak(),
                    "dead": p.stats.dead_letters,
                    "failed": p.stats.failed_calls,
                    "records": [len(o) for o in outs],
                    "measurements": [sum(isinstance(r, Measurement) for r in o) for o in outs],
                }
            )
        )


def run_child(name: str, calls: int = 2, wasi: bool = False, **limits: Any) -> dict[str, Any]:
    code = (
        "import sys, json; from tests.unit.test_hostile_plugins import _child; "
        f"_child({name!r}, json.loads(sys.argv[1]), {calls}, {wasi})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(limits)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- time -----------------------------------------------------------------------------------------


def test_infinite_loop_times_out_and_is_quarantined(host: PluginHost) -> None:
    plugin = load(host, "infinite_loop", timeout_s=0.05, max_failures=3)
    t0 = time.perf_counter()
    outs = [plugin.process(batch(2)) for _ in range(4)]
    elapsed = time.perf_counter() - t0
    assert [errors_of(o) for o in outs[:3]] == [["timed out after 50 ms"] * 2] * 3
    assert "quarantined" in errors_of(outs[3])[0]
    assert elapsed < 3 * 0.05 + 0.5  # three calls to the limit, the fourth not made
    assert plugin.stats.calls == 3 and plugin.stats.timeouts == 3
    assert counts(plugin) == ({"timeout": 6, "quarantined": 2}, {"timeout": 3})


# --- memory -------------------------------------------------------------------------------------


def test_memory_bomb_traps_at_the_limit(host: PluginHost) -> None:
    plugin = load(host, "memory_bomb", memory_limit=8 * MiB, timeout_s=5.0)
    (err,) = errors_of(plugin.process(batch(1)))
    assert err == "trap: unreachable (linear memory is at its limit of 8 MiB)"
    assert counts(plugin) == ({"trap": 1}, {"trap": 1})


def test_memory_bomb_rss_is_bounded_by_the_memory_limit() -> None:
    # 1,024 grows and 64 MiB written take longer than 50 ms on a busy machine
    r = run_child("memory_bomb", calls=3, memory_limit=64 * MiB, timeout_s=5.0)
    assert r["dead"]["trap"] == 9
    # each call wrote all 64 MiB (then the instance went, and its memory with it)
    assert r["peak"] - r["base"] < 64 + 24, r
    assert r["peak"] < 200, r


def test_table_bomb_is_held_by_the_table_budget(host: PluginHost) -> None:
    plugin = load(host, "table_bomb")
    budget = plugin._runner.budget
    assert budget.tables == 1 and budget.table_elements == 4096
    # the table's elements come out of memory_limit: 16 MiB less 32 KiB, to a whole page
    assert budget.memory == 16 * MiB - 65536
    (err,) = errors_of(plugin.process(batch(1)))
    assert err.startswith("trap: unreachable")
    assert counts(plugin) == ({"trap": 1}, {"trap": 1})


def test_table_bomb_rss_stays_small() -> None:
    # Unbounded, the bomb grows its table by 65,536 elements (512 KiB) a step for as long as
    # the process has memory (a 10-million-element table is 76 MiB of RSS).
    r = run_child("table_bomb", calls=3)
    assert r["dead"]["trap"] == 9
    assert r["peak"] - r["base"] < 16, r


def test_a_table_that_does_not_fit_the_budget_is_refused_at_load(host: PluginHost) -> None:
    with pytest.raises(PluginLoadError, match=r"table\(s\) of up to 4000000 elements need"):
        load(host, "huge_table")
    # with a budget it fits, the table is paid for out of it
    plugin = load(host, "huge_table", memory_limit=64 * MiB)
    assert plugin._runner.budget.memory == (64 * MiB - 32_000_000) // 65536 * 65536


def test_many_memories_are_refused_at_load(host: PluginHost) -> None:
    with pytest.raises(PluginLoadError, match="it defines 25 memories; ABI v1 allows exactly one"):
        load(host, "many_memories")


def test_memory64_is_refused_at_load(host: PluginHost) -> None:
    with pytest.raises(PluginLoadError, match=r"its memory is 64-bit \(memory64\)"):
        load(host, "memory64")


@pytest.mark.parametrize("name", ["many_memories", "memory64"])
def test_the_engine_refuses_them_too(host: PluginHost, name: str) -> None:
    # defence in depth: what check_memories refuses does not even compile
    with pytest.raises(ffi.WasmError):
        ffi.compile_module(host.engine, (HOSTILE / f"{name}.wat").read_bytes())


# --- output -------------------------------------------------------------------------------------


def test_huge_output_fails_the_call_before_it_is_copied(host: PluginHost) -> None:
    plugin = load(host, "huge_output", timeout_s=2.0)
    errs = errors_of(plugin.process(batch(3)))
    assert (
        errs
        == [
            "output limit: flux_process returned 12582912 bytes "
            f"(max_output_bytes is {MAX_OUTPUT_BYTES})"
        ]
        * 3
    )
    assert plugin.stats.output_bytes == 0
    assert counts(plugin) == ({"output_bytes": 3}, {"output_bytes": 1})
    # the byte cap is what stopped it; raised, the 12 Mi blank lines meet the line count
    # (blank lines count: a line is at least a byte), and with that raised too, they pass
    roomy = load(host, "huge_output", timeout_s=2.0, max_output_bytes=16 * MiB)
    assert errors_of(roomy.process(batch(3)))[0].startswith("output limit: 12582912 lines")
    assert counts(roomy) == ({"records": 3}, {})
    roomier = load(
        host,
        "huge_output",
        timeout_s=2.0,
        max_output_bytes=16 * MiB,
        max_records_per_message=5 * MiB,
    )
    assert roomier.process(batch(3)) == []
    assert roomier.stats.output_bytes == 12 * MiB


def test_deep_output_is_an_abi_error_not_a_recursion_error(host: PluginHost) -> None:
    plugin = load(host, "deep_output")
    errs = errors_of(plugin.process(batch(2)))
    assert (
        errs
        == [
            f"ABI error: output line 1 is nested more than {MAX_DEPTH} levels deep "
            "(docs/plugin-abi.md, Output)"
        ]
        * 2
    )
    assert counts(plugin) == ({"abi": 2}, {"abi": 1})


def test_deep_output_is_refused_the_same_way_from_a_deep_stack(host: PluginHost) -> None:
    # msgspec's own limit depends on how deep the caller's stack already is; ours does not
    plugin = load(host, "deep_output")
    limit = sys.getrecursionlimit()

    def nest(k: int) -> list[Measurement | ErrorRecord]:
        return plugin.process(batch(1)) if k == 0 else nest(k - 1)

    frame, depth = sys._getframe(), 0
    while frame is not None:  # how deep pytest (and coverage, in CI) already are
        frame, depth = frame.f_back, depth + 1
    # as deep as the stack can go with room for the call itself: 60 frames of headroom from
    # the top left too little under CI's coverage run (RecursionError in the test's own nest)
    (err,) = errors_of(nest(limit - depth - 120))
    assert "nested more than" in err


def test_record_bomb_is_stopped_by_the_output_cap(host: PluginHost) -> None:
    plugin = load(host, "record_bomb", timeout_s=2.0)
    errs = errors_of(plugin.process(batch(3)))
    assert len(errs) == 3 and all(e.startswith("output limit: flux_process returned") for e in errs)
    assert counts(plugin) == ({"output_bytes": 3}, {"output_bytes": 1})


def test_record_bomb_with_room_for_its_bytes_is_too_many_records(host: PluginHost) -> None:
    # 500,002 lines for 3 messages, more than 3 x 4096: refused before a line is decoded
    plugin = load(host, "record_bomb", timeout_s=2.0, max_output_bytes=16 * MiB)
    errs = errors_of(plugin.process(batch(3)))
    assert (
        errs
        == [
            "output limit: 500002 lines for 3 input message(s) (max_records_per_message is "
            f"{MAX_RECORDS_PER_MESSAGE})"
        ]
        * 3
    )
    # an output limit, not a failed call: no quarantine, no recycle
    assert counts(plugin) == ({"records": 3}, {})
    assert plugin.stats.recycles == 0 and not plugin.quarantined


def test_record_bomb_fails_only_its_message_under_the_records_cap(host: PluginHost) -> None:
    # a cap that the whole output fits (3 x 200,000 lines) but message 0 does not
    plugin = load(
        host,
        "record_bomb",
        timeout_s=2.0,
        max_output_bytes=16 * MiB,
        max_records_per_message=200_000,
    )
    indices: list[int] = []
    out = plugin.process(batch(3), indices=indices)
    assert [(r.name, r.value) for r in out if isinstance(r, Measurement)] == [("v", 1), ("v", 1)]
    (err,) = [r for r in out if isinstance(r, ErrorRecord)]
    assert err.error == (
        "output limit: 500000 records for one input message (max_records_per_message is "
        "200000); its records were dropped"
    )
    assert err.device == "dev" and err.ts == 1000.0 and err.plugin == "record_bomb"
    assert indices == [1, 2, 0]
    assert counts(plugin) == ({"records": 1}, {})
    assert plugin.stats.recycles == 0 and not plugin.quarantined


@pytest.mark.parametrize("per_message", [MAX_RECORDS_PER_MESSAGE, 200_000])
def test_record_bomb_rss_is_bounded(per_message: int) -> None:
    r = run_child(
        "record_bomb",
        calls=2,
        timeout_s=2.0,
        max_output_bytes=16 * MiB,
        max_records_per_message=per_message,
    )
    if per_message == MAX_RECORDS_PER_MESSAGE:
        assert r["dead"]["records"] == 6 and r["measurements"] == [0, 0]
        assert r["peak"] - r["base"] < 48, r  # guest memory and one copy of the output
    else:
        assert r["dead"]["records"] == 2 and r["measurements"] == [2, 2]
        assert r["peak"] < 200, r  # 500,000 lines decoded (not made into records)


def test_invalid_utf8_output_is_an_abi_error(host: PluginHost) -> None:
    plugin = load(host, "invalid_utf8")
    assert (
        errors_of(plugin.process(batch(2)))
        == ["ABI error: output line 1 is not valid UTF-8 (column 16)"] * 2
    )
    assert counts(plugin) == ({"abi": 2}, {"abi": 1})


# --- logs ---------------------------------------------------------------------------------------


def test_log_flood_is_rate_limited_and_counted(
    host: PluginHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flux_edge.plugin.log_flood")
    # 100,000 log calls take longer than the default 50 ms: this test is about the counts
    plugin = load(host, "log_flood", timeout_s=10.0)
    t0 = time.monotonic()
    out = plugin.process(batch(3))
    elapsed = time.monotonic() - t0
    assert [r.value for r in out if isinstance(r, Measurement)] == [1, 1, 1]
    floods = [r for r in caplog.records if r.getMessage() == "flood"]
    # the burst, and what the bucket refilled while the call ran
    assert LOG_BURST <= len(floods) <= LOG_BURST + LOG_RATE * elapsed + 1
    assert plugin.stats.logs_dropped == 100_000 - len(floods)
    assert counts(plugin) == ({}, {})


def test_log_control_characters_are_escaped(
    host: PluginHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flux_edge.plugin.log_control")
    plugin = load(host, "log_control")
    out = plugin.process(batch(2))
    assert len(out) == 2 and all(isinstance(r, Measurement) for r in out)
    logged = [r.getMessage() for r in caplog.records if r.name == "flux_edge.plugin.log_control"]
    want = "ok\\n2026-12-07 06:00:00 CRITICAL flux_edge.runtime: forged line\\r\\x1b[2J\\x1b[31mred"
    assert logged == [want, want]
    assert plugin._runner._sink.last_error == want  # quoted in error records as it is


def test_escape_text() -> None:
    assert escape_text("plain text, °C") == "plain text, °C"
    assert escape_text("a\\b") == "a\\b"  # nothing to escape: unchanged
    assert escape_text("a\\b\n") == "a\\\\b\\n"  # else backslashes too, so it reads back
    assert escape_text("\x00\x7f\x85\u2028\u202e\t") == "\\x00\\x7f\\x85\\u2028\\u202e\\t"


def test_wasi_output_is_logged_one_line_per_newline(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("flux_edge.plugin.wasi_lines")
    caplog.set_level(logging.INFO, logger=logger.name)
    write = LogSink(logger).stream(logging.INFO)
    assert write(b"one\ntwo\x1b[2J\n\n") == 13
    assert [r.getMessage() for r in caplog.records] == ["one", "two\\x1b[2J"]


# --- traps --------------------------------------------------------------------------------------


def test_trap_in_flux_init_refuses_the_plugin_at_load(host: PluginHost) -> None:
    with pytest.raises(PluginLoadError, match="initialisation failed: trap: unreachable"):
        load(host, "trap_init", wasi=True, deadline=0)


def test_trap_in_flux_init_after_a_recycle_is_an_init_failure(host: PluginHost) -> None:
    deadline = time.time_ns() + 500_000_000
    plugin = load(host, "trap_init", wasi=True, deadline=deadline, max_failures=3)
    assert [r.value for r in plugin.process(batch(2)) if isinstance(r, Measurement)] == [1, 1]
    # no event to await: the guest's own clock has to pass the deadline
    while time.time_ns() <= deadline:
        time.sleep(0.02)
    assert errors_of(plugin.process(batch(1)))[0].startswith("trap: unreachable")
    (err,) = errors_of(plugin.process(batch(1)))
    assert err.startswith("cannot make a fresh instance: initialisation failed: trap: unreachable")
    errors_of(plugin.process(batch(1)))
    assert plugin.quarantined
    assert counts(plugin) == ({"trap": 1, "init": 2}, {"trap": 1, "init": 2})


def test_trap_in_flux_process_is_recycled_then_quarantined(host: PluginHost) -> None:
    plugin = load(host, "trap_process", max_failures=3)
    for _ in range(3):
        assert errors_of(plugin.process(batch(2))) == ["trap: unreachable in decode_frame"] * 2
    assert "quarantined" in errors_of(plugin.process(batch(2)))[0]
    assert plugin.stats.recycles == 2  # made fresh before the 2nd and 3rd call
    assert counts(plugin) == ({"trap": 6, "quarantined": 2}, {"trap": 3})


# --- the host's own failures are contained too --------------------------------------------------


@pytest.mark.parametrize("exc", [RecursionError("deep"), MemoryError(), KeyError("bug")])
def test_an_exception_while_decoding_fails_only_that_batch(
    host: PluginHost, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    plugin = host.load("echo", ROOT / "tests" / "fixtures" / "wat" / "echo.wat", PluginLimits(), {})

    def boom(*args: object, **kwargs: object) -> object:
        raise exc

    with monkeypatch.context() as m:
        m.setattr(host_module, "decode_output_counted", boom)
        errs = errors_of(plugin.process(batch(2)))
    assert errs == [f"host error: {type(exc).__name__}: {exc}"] * 2
    assert counts(plugin) == ({"host": 2}, {"host": 1})
    out = plugin.process(batch(2))  # recycled, and fine again
    assert all(isinstance(r, Measurement) for r in out)
