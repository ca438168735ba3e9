"""The outbox's memory mode through the real daemon (issue #13): with the upstream broker away
for a few seconds under load the backlog spills to the file and everything is delivered once it
returns; a clean stop while records wait writes them to the file and the next start sends them.
Counted by sequence number."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from flux_edge.mqtt import MqttClient
from tests.support import run
from tests.support.daemon import metric
from tests.support.mosquitto import HOST
from tests.system.test_zero_loss import Rig

pytestmark = [pytest.mark.system, pytest.mark.integration, pytest.mark.slow]


async def publish(rig: Rig, seqs: range) -> None:
    pub = MqttClient("devices-2", HOST, rig.local.port)
    pub.start()
    await pub.wait_connected(10)
    await asyncio.gather(*(
        pub.publish(f"site/dev{s % 4}/telemetry", json.dumps({"seq": s}).encode(), 1)
        for s in seqs))
    await pub.close()


def test_memory_mode_spills_during_an_outage_and_survives_a_clean_restart(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, uplink_extra='outbox_mode = "memory"\nspill_after = "1s"')
    n, rate = 3000, 300.0

    async def go() -> None:
        collector = await rig.collector()
        await asyncio.to_thread(rig.start_daemon)
        load = asyncio.get_running_loop().create_task(rig.publish(n, rate))
        await rig.received(300, 30)
        rig.upstream.stop()
        await asyncio.sleep(4)  # records wait longer than spill_after: written to the file
        assert rig.daemon is not None
        assert "has waited 1 s" in rig.daemon.log_text()
        rig.upstream.start()
        await load
        await rig.wait_all(n, timeout=90)
        # a clean stop while records wait: they go to the file, the next start sends them
        rig.upstream.stop()
        await publish(rig, range(n, n + 300))
        deadline = time.monotonic() + 30
        while metric(await asyncio.to_thread(rig.metrics),
                     "flux_edge_stage_processed_total", 'stage="uplink"') < n + 300:
            assert time.monotonic() < deadline, "the daemon did not take every message"
            await asyncio.sleep(0.1)
        rig.daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(rig.daemon.wait, 40) == 0
        rig.upstream.start()
        await asyncio.to_thread(rig.start_daemon)
        await rig.wait_all(n + 300, timeout=60)
        await collector.close()

    try:
        run(go(), timeout=240)
        assert set(rig.seqs) == set(range(n + 300))
        assert metric(rig.metrics(), "flux_edge_uplink_dropped_total") == 0
    finally:
        rig.close()
