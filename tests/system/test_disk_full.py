"""A full disk under load, through the real daemon (issue #13): the state directory is a small
tmpfs that the test fills while numbered QoS 1 messages flow in and the upstream broker is away
(so the outbox has to grow), then frees again. Counted by sequence number: delivered + counted
drops = produced, delivery resumes by itself (no restart), /healthz, STATUS= and the metrics
report the degraded store with its reason meanwhile, and the watchdog is fed throughout."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import run
from tests.support.daemon import DaemonProcess, http_get, metric, wait_until
from tests.system.test_zero_loss import Rig

pytestmark = [pytest.mark.system, pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0750", "tmpfs", str(state)],
                   check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(directory: Path) -> Path:
    """Write a ballast file until the file system is full."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 512):  # big chunks, then the last few bytes
            chunk = b"\0" * size
            try:
                while os.write(fd, chunk) == size:
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return ballast


def health(rig: Rig) -> dict[str, object]:
    code, body = http_get(f"http://127.0.0.1:{rig.mport}/healthz")
    assert code == 200, (code, body)  # degraded, never "unhealthy": a restart frees nothing
    data: dict[str, object] = json.loads(body)
    return data


def outbox_state(rig: Rig) -> tuple[str, str]:
    stores = health(rig)["stores"]
    assert isinstance(stores, dict)
    return str(stores["outbox"]["status"]), str(stores["outbox"]["reason"])


def test_a_full_disk_under_load_recovers_by_itself_and_loses_nothing_uncounted(
    tmp_path: Path, small_disk: Path
) -> None:
    rig = Rig(tmp_path, uplink_extra="max_inflight = 20")
    n = 6000

    async def go() -> None:
        collector = await rig.collector()
        after = time.monotonic()
        rig.daemon = DaemonProcess(rig.config, rig.notify, log=tmp_path / "daemon.log",
                                   watchdog_usec=3_000_000)
        await asyncio.to_thread(rig.notify.wait_line, "READY=1", 60.0, after)
        await asyncio.to_thread(
            wait_until,
            lambda: metric(rig.metrics(), "flux_edge_device_up", 'source="devices"') == 1,
            30.0, "the MQTT source subscribed")
        producer = asyncio.get_running_loop().create_task(rig.publish(n, rate=400.0))
        await rig.received(200, 30)  # delivery flows
        rig.upstream.stop()  # the backlog must go to the disk now
        ballast = await asyncio.to_thread(fill, small_disk)
        # the outbox reports the full disk (within the retry back-off)
        await asyncio.to_thread(
            wait_until, lambda: outbox_state(rig) == ("degraded", "disk full"), 30.0,
            "/healthz reports the outbox degraded: disk full")
        fault_at = time.monotonic()
        text = await asyncio.to_thread(rig.metrics)
        assert metric(text, "flux_edge_store_degraded", 'store="outbox"') == 1
        assert 'reason="disk full"' in text
        assert health(rig)["status"] == "degraded"
        await asyncio.to_thread(
            rig.notify.wait_for, lambda t: "STORE DEGRADED: outbox (disk full)" in t, 30.0)
        await asyncio.sleep(4.0)  # under load, with the disk full
        # the watchdog is fed all along: a full disk is not a hang
        pings = [t for t, m in rig.notify.messages if "WATCHDOG=1" in m and t > fault_at]
        assert len(pings) >= 3, f"only {len(pings)} watchdog pings while the disk was full"
        assert rig.daemon.proc.poll() is None
        ballast.unlink()  # space comes back; nothing else is done
        rig.upstream.start()
        await producer
        await asyncio.to_thread(
            wait_until, lambda: outbox_state(rig) == ("ok", ""), 30.0, "the outbox ok again")
        deadline = time.monotonic() + 90
        while True:
            text = await asyncio.to_thread(rig.metrics)
            dropped = int(metric(text, "flux_edge_uplink_dropped_total"))
            if len(rig.seqs) + dropped >= n:
                break
            assert time.monotonic() < deadline, (
                f"delivery did not resume: {len(rig.seqs)} delivered + {dropped} dropped of {n}; "
                f"first missing {sorted(set(range(n)) - set(rig.seqs))[:10]}")
            await asyncio.sleep(0.2)
        await collector.close()
        assert len(rig.seqs) + dropped == n, (len(rig.seqs), dropped)
        # QoS 1 inputs are refused (not acknowledged) while nothing can be stored: none is lost
        assert dropped == 0, text
        assert health(rig)["status"] == "ok"
        assert metric(text, "flux_edge_store_degraded", 'store="outbox"') == 0
        assert "disk full" in rig.daemon.log_text() and "works again" in rig.daemon.log_text()
        assert rig.daemon.proc.poll() is None  # never restarted

    try:
        run(go(), timeout=240)
    finally:
        rig.close()
