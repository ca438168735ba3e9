"""The audit log (flux_edge/actions/audit.py) and ``audit tail`` (actions/audit_cli.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flux_edge.actions.audit import AuditLog, rotated_path
from flux_edge.actions.audit_cli import audit_tail, format_record
from flux_edge.model import Command, Measurement, Outcome

T0 = 1_795_849_200.125  # 2026-11-28T07:00:00.125Z


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def cause(value: Any = 82.5) -> Measurement:
    return Measurement(
        device="boiler", name="temperature", value=value, ts=T0 - 0.5, unit="°C", quality="good"
    )


def command(action: str = "burner_off", rule: str = "overheat", **kw: Any) -> Command:
    return Command(rule=rule, action=action, ts=T0, cause=kw.pop("cause", cause()), **kw)


def outcome(cmd: Command, ok: bool = True) -> Outcome:
    return Outcome(
        command=cmd, ok=ok, ts=T0, latency_s=0.0123, verified=False if ok else None,
        error="" if ok else "action 'burner_off': timeout",
    )


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_complete_and_parseable(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.jsonl"  # the directory is created
    audit = AuditLog(path, max_size=1 << 20, keep=3, clock=Clock())
    c = command()
    audit.record(c, allowed=True, outcome=outcome(c), actuator="burner")
    audit.record(command("burner_on", rule="cold"), allowed=False,
                 reason="min_off: burner switched off 5 s ago, min_off is 30 s",
                 actuator="burner")
    safety = Command(rule="safety", action="burner_off", ts=T0, params={"safety": "shutdown"})
    audit.record(safety, allowed=True, outcome=outcome(safety, ok=False), actuator="burner")
    audit.close()
    first, blocked, failed = records(path)
    assert first == {
        "ts": "2026-11-28T07:00:00.125Z",
        "unix": T0,
        "rule": "overheat",
        "action": "burner_off",
        "actuator": "burner",
        "params": {},
        "cause": {"device": "boiler", "name": "temperature", "value": 82.5,
                  "quality": "good", "ts": T0 - 0.5, "unit": "°C"},
        "decision": "allowed",
        "reason": "",
        "outcome": {"ok": True, "verified": False, "error": "", "latency_ms": 12.3},
        "suppressed": 0,
    }
    assert blocked["decision"] == "blocked" and blocked["outcome"] is None
    assert blocked["reason"].startswith("min_off:")
    assert failed["cause"] is None and failed["params"] == {"safety": "shutdown"}
    assert failed["outcome"]["ok"] is False and "timeout" in failed["outcome"]["error"]
    assert audit.stats.written == 3 and audit.stats.errors == 0


def test_each_record_is_one_write_of_a_whole_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real = os.write

    def spy(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(os, "write", spy)
    audit = AuditLog(tmp_path / "a.jsonl", max_size=1 << 20, keep=1)
    for i in range(5):
        c = command(cause=cause(i))
        audit.record(c, allowed=True, outcome=outcome(c))
    audit.close()
    assert len(writes) == 5
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)


def test_fsync_is_batched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mono = [0.0]
    syncs: list[int] = []
    monkeypatch.setattr(os, "fsync", syncs.append)
    audit = AuditLog(tmp_path / "a.jsonl", max_size=1 << 20, keep=1, fsync_interval=5.0,
                     monotonic=lambda: mono[0])
    c = command()

    def settle() -> None:  # the periodic fsync runs in a worker thread (off the event loop)
        t = audit._syncing
        if t is not None:
            t.join(5)

    for _ in range(10):  # 10 records within 1 s: the first syncs, the others wait
        audit.record(c, allowed=True, outcome=outcome(c))
        settle()
        mono[0] += 0.1
    assert len(syncs) == 1
    mono[0] = 5.1
    audit.record(c, allowed=True, outcome=outcome(c))
    settle()
    assert len(syncs) == 2
    audit.record(c, allowed=True, outcome=outcome(c))
    audit.sync()  # a periodic timer bounds the window
    assert len(syncs) == 3
    audit.sync()  # nothing new: no fsync
    audit.close()
    assert len(syncs) == 3
    every = AuditLog(tmp_path / "b.jsonl", max_size=1 << 20, keep=1, fsync_interval=0)
    for _ in range(3):
        every.record(c, allowed=True, outcome=outcome(c))
    every.close()
    assert len(syncs) == 6


def test_rotation_keeps_n_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_size=2000, keep=3)
    for i in range(60):
        c = command(cause=cause(i))
        audit.record(c, allowed=True, outcome=outcome(c))
    audit.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    for i in (1, 2, 3):
        assert 2000 - 400 < rotated_path(path, i).stat().st_size <= 2000  # full, never past
    assert path.stat().st_size <= 2000
    # newest last, contiguous, nothing lost among the kept files
    values = [r["cause"]["value"] for i in (3, 2, 1, 0) for r in records(rotated_path(path, i))]
    assert values == list(range(60 - len(values), 60))
    assert audit.stats.rotations >= 4  # some records fell off the end


def test_rotation_keep_zero_and_reopen_existing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_size=1000, keep=0)
    for i in range(20):
        audit.record(command(cause=cause(i)), allowed=False, reason=f"r{i}")
    audit.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl"]
    # a new AuditLog appends to the existing file
    size = path.stat().st_size
    again = AuditLog(path, max_size=1000, keep=0)
    again.record(command(cause=cause(99)), allowed=False, reason="x")
    again.close()
    assert records(path)[-1]["reason"] == "x"
    assert path.stat().st_size > size or len(records(path)) == 1  # appended, or rotated first


def test_a_partial_last_line_is_ended_first(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"ts": "2026-11-28T06:59:59.000Z", "deci')  # cut by a power loss
    audit = AuditLog(path, max_size=1 << 20, keep=1)
    audit.record(command(), allowed=False, reason="x")
    audit.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["reason"] == "x"


def test_repeated_blocks_are_counted_not_written(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "a.jsonl"
    audit = AuditLog(path, max_size=1 << 20, keep=1, clock=clock, suppress_window=60)
    reason = "min_on: burner switched on 1 s ago, min_on is 30 s"
    for _ in range(10):
        audit.record(command(), allowed=False, reason=reason)
        clock.t += 1
    c = command()
    audit.record(c, allowed=True, outcome=outcome(c))
    audit.close()
    recs = records(path)
    assert [r["decision"] for r in recs] == ["blocked", "allowed"]
    assert recs[1]["suppressed"] == 9 and audit.stats.suppressed == 9


def test_disk_errors_never_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    audit = AuditLog(blocker / "audit.jsonl", max_size=100_000, keep=1)
    caplog.set_level(logging.WARNING, logger="flux_edge.audit")
    for _ in range(5):
        audit.record(command(), allowed=False, reason="x")
        audit.record(command(), allowed=True, outcome=outcome(command()))
    # issue #13: nothing is lost while the disk fails: the records wait in memory
    assert audit.stats.errors == 0 and audit.stats.written == 0
    waiting = audit.pending
    assert waiting == 10
    assert audit.health.degraded and audit.health.reason == "missing"
    assert len(caplog.records) == 1 and "cannot write" in caplog.records[0].getMessage()
    blocker.unlink()  # the problem goes away: the next record writes them all and says so
    audit.record(command(), allowed=False, reason="y")
    assert audit.stats.written == waiting + 1 and audit.pending == 0
    assert len(records(blocker / "audit.jsonl")) == waiting + 1
    assert not audit.health.degraded
    assert "works again" in caplog.records[-1].getMessage()
    audit.close()
    audit.record(command(), allowed=False, reason="after close")  # counted, no raise
    assert audit.stats.errors == 1


def test_a_failed_audit_write_is_retried_on_its_own_timer(tmp_path: Path) -> None:
    blocker = tmp_path / "gone"
    blocker.write_text("")

    async def go() -> AuditLog:
        audit = AuditLog(blocker / "audit.jsonl", max_size=100_000, keep=1)
        audit._retry.first = 0.01
        audit.record(command(), allowed=False, reason="x")
        assert audit.pending == 1
        blocker.unlink()  # no further record comes: the timer writes it
        for _ in range(500):
            if audit.pending == 0:
                break
            await asyncio.sleep(0.01)
        return audit

    audit = asyncio.run(go())
    assert audit.pending == 0 and audit.stats.written == 1
    audit.close()


def test_unencodable_params_are_counted(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.jsonl", max_size=1000, keep=1)
    audit.record(command(params={"x": object()}), allowed=False, reason="x")
    assert audit.stats.errors == 1
    audit.close()


# --- audit tail -----------------------------------------------------------------------------------


def test_format_record() -> None:
    c = command()
    buf = tmp_lines(lambda a: a.record(c, allowed=True, outcome=outcome(c), actuator="burner"))
    assert format_record(buf[0]) == (
        "2026-11-28 07:00:00.125Z  ALLOWED  burner_off  rule overheat  "
        "boiler.temperature=82.5 °C  ok (read back false) 12.3 ms"
    )
    buf = tmp_lines(lambda a: a.record(command("burner_on"), allowed=False, reason="rate limit: 6"))
    assert format_record(buf[0]).endswith("BLOCKED  burner_on  rule overheat  "
                                          "boiler.temperature=82.5 °C  rate limit: 6")
    assert format_record('{"decision": "allo') == '(unreadable record) {"decision": "allo'


def tmp_lines(fn: Any) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a.jsonl"
        audit = AuditLog(path, max_size=1 << 20, keep=1, clock=Clock())
        fn(audit)
        audit.close()
        return path.read_text().splitlines()


def write_n(audit: AuditLog, start: int, n: int) -> None:
    for i in range(start, start + n):
        c = command(cause=cause(i))
        audit.record(c, allowed=True, outcome=outcome(c))


def test_tail_last_lines_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_size=2000, keep=5)
    write_n(audit, 0, 30)
    audit.close()
    assert rotated_path(path, 1).exists()
    out = io.StringIO()
    assert audit_tail(path, lines=25, out=out, raw=True) == 0
    got = [json.loads(x)["cause"]["value"] for x in out.getvalue().splitlines()]
    assert got == list(range(5, 30))
    out = io.StringIO()
    assert audit_tail(path, lines=3, out=out) == 0
    shown = out.getvalue().splitlines()
    assert len(shown) == 3 and "boiler.temperature=29 °C" in shown[-1]


def test_tail_missing_file(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert audit_tail(tmp_path / "nope.jsonl", out=out, err=err) == 1
    assert "no audit log" in err.getvalue() and out.getvalue() == ""


class Lines(io.StringIO):
    """Output that lets a test wait (bounded) for a number of lines."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()

    def write(self, s: str) -> int:
        with self.cond:
            n = super().write(s)
            self.cond.notify_all()
            return n

    def wait_lines(self, n: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.getvalue().splitlines()) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"only {self.getvalue().splitlines()} after {timeout} s")
                self.cond.wait(left)
            return self.getvalue().splitlines()


def test_tail_follow_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_size=2000, keep=5)
    write_n(audit, 0, 2)
    out = Lines()
    stop = threading.Event()
    result: list[int] = []
    follower = threading.Thread(
        target=lambda: result.append(
            audit_tail(path, lines=1, follow=True, out=out, raw=True, poll=0.01, stop=stop)
        )
    )
    follower.start()
    try:
        out.wait_lines(1)
        write_n(audit, 2, 25)  # rotates at least once while being followed
        assert audit.stats.rotations >= 1
        lines = out.wait_lines(26)
        got = [json.loads(x)["cause"]["value"] for x in lines]
        assert got == list(range(1, 27))  # the last old record, then every new one, once
    finally:
        stop.set()
        follower.join(10)
        audit.close()
    assert not follower.is_alive() and result == [0]


def test_tail_follow_waits_for_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    out = Lines()
    stop = threading.Event()
    follower = threading.Thread(
        target=audit_tail, args=(path,),
        kwargs={"follow": True, "out": out, "poll": 0.01, "stop": stop},
    )
    follower.start()
    try:
        audit = AuditLog(path, max_size=1 << 20, keep=1)
        write_n(audit, 0, 2)
        audit.close()
        lines = out.wait_lines(2)
        assert "ALLOWED" in lines[0] and "temperature=1 °C" in lines[1]
    finally:
        stop.set()
        follower.join(10)
    assert not follower.is_alive()


def test_cli_parser_and_audit_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from flux_edge.actions.audit_cli import add_audit_parser, audit_path
    from flux_edge.kinds import load_config_text

    parser = argparse.ArgumentParser(prog="flux-edge")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_size=1 << 20, keep=1)
    write_n(audit, 0, 3)
    audit.close()
    args = parser.parse_args(["audit", "tail", "--file", str(path), "-n", "2", "--json"])
    assert args.func(args) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["cause"]["value"] for x in shown] == [1, 2]
    cfg_file = tmp_path / "flux.toml"
    cfg_file.write_text('[daemon]\nstate_dir = "/var/lib/x"\n')
    assert audit_path(load_config_text(cfg_file.read_text(), str(cfg_file))) == Path(
        "/var/lib/x/audit.jsonl"
    )
    text = '[daemon]\naudit_file = "logs/audit.jsonl"\n'
    assert audit_path(load_config_text(text, str(cfg_file))) == tmp_path / "logs/audit.jsonl"
    args = parser.parse_args(["audit", "tail", "--config", str(cfg_file)])
    assert args.func(args) == 1  # /var/lib/x/audit.jsonl does not exist
