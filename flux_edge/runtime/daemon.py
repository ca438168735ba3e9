"""`flux-edge run`: load the config, start the pipeline, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from flux_edge.config import Config
from flux_edge.errors import FluxError
from flux_edge.plugins.host import PluginHost
from flux_edge.runtime.pipeline import Observers, Pipeline

log = logging.getLogger("flux_edge.runtime")


def prepare_state_dir(config: Config) -> Path:
    """Create <state_dir>/cache; a clear error if it cannot be written."""
    cache = Path(config.daemon.state_dir) / "cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FluxError(
            f"daemon.state_dir: cannot create {cache}: {exc.strerror}; set daemon.state_dir to a "
            "writable directory (the service user must own it)"
        ) from exc
    return cache


async def run_pipeline(
    config: Config,
    *,
    observers: Observers | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[Pipeline], None] | None = None,
) -> None:
    """Run until ``stop`` is set or SIGTERM/SIGINT arrives; then drain and stop."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    host = PluginHost(cache_dir=prepare_state_dir(config))
    pipeline = Pipeline(config, host=host, observers=observers)
    try:
        await pipeline.start()
        if started is not None:
            started(pipeline)
        await stop.wait()
        log.info("stopping: draining queues")
    finally:
        await pipeline.stop()
        host.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("stopped")
