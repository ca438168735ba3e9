"""Daemon.run's lifecycle around a stop that comes during the start (issue #13, item 4;
regression: a SIGTERM between "pipeline running" and the end of the start skipped the "stopped"
line and the tail of the run)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from flux_edge.kinds import load_config_text
from flux_edge.runtime.daemon import Daemon
from flux_edge.runtime.systemd import Notifier


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__(env={})
        self.said: list[str] = []

    def ready(self, status: str = "") -> None:
        self.said.append("READY")

    def stopping(self, status: str = "") -> None:
        self.said.append("STOPPING")


def daemon(tmp_path: Path) -> Daemon:
    config = load_config_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[metrics]\nenabled = false\n')
    return Daemon(config, notifier=Recorder())


@pytest.mark.parametrize("moment", ["before", "during", "at_the_end"])
def test_a_stop_during_the_start_shuts_down_without_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, moment: str
) -> None:
    caplog.set_level(logging.INFO, logger="flux_edge.runtime")
    d = daemon(tmp_path)
    stop = asyncio.Event()
    if moment == "before":
        stop.set()
    real_start = d.start
    release = asyncio.Event()

    async def start() -> None:
        await real_start()
        if moment == "at_the_end":
            stop.set()  # the stop comes as the start finishes
            return
        if moment == "during":
            stop.set()
            await release.wait()  # a start that would go on: it is abandoned

    d.start = start  # type: ignore[method-assign]

    async def main() -> None:
        await asyncio.wait_for(d.run(stop=stop), 10)

    asyncio.run(main())
    said = d.notifier.said  # type: ignore[attr-defined]
    assert "READY" not in said
    assert "stopped" in caplog.text
    if moment != "before":
        assert "STOPPING" in said  # the shutdown ran
