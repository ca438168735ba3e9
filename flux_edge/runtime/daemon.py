"""`flux-edge run`: the daemon's lifecycle around one pipeline at a time.

    start: state dir -> plugin host -> uplink (outbox opened, connects in the background)
           -> pipeline (plugins compiled or loaded from cache, every stage running)
           -> metrics endpoint -> READY=1
    SIGHUP: RELOADING=1 -> check the file -> load its plugins on the side -> only if all is well,
           drain the old pipeline (no safe state: actuators keep their state) and start the new
           one -> READY=1. A bad file or plugin leaves the running pipeline untouched; the error
           is logged and shown in STATUS until the next good reload.
    SIGTERM/SIGINT: STOPPING=1 -> sources stop -> queues drain through rules, actions and into
           the outbox -> actuators to their safe state -> the outbox is flushed upstream while
           time allows (what remains stays on disk for the next start) -> exit 0, all within
           daemon.shutdown_timeout.

The watchdog (WATCHDOG=1) is fed by ``WatchdogFeeder`` only while every critical stage shows
progress (``HealthMonitor``), and since it runs on the event loop a blocked loop starves it too.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from flux_edge.config import Config
from flux_edge.errors import FluxError, Problem
from flux_edge.files import ensure_dir
from flux_edge.kinds import check_config
from flux_edge.plugins.host import PluginHost
from flux_edge.runtime import plugin_instances, signals
from flux_edge.runtime.health import HealthMonitor, WatchdogFeeder
from flux_edge.runtime.pipeline import Observers, Pipeline
from flux_edge.runtime.systemd import Notifier
from flux_edge.uplink.sender import Uplink

log = logging.getLogger("flux_edge.runtime")


def prepare_state_dir(config: Config) -> Path:
    """Create <state_dir>/cache (directories 0750 whatever the umask); a clear error if it
    cannot be written."""
    cache = Path(config.daemon.state_dir) / "cache"
    try:
        ensure_dir(cache)
    except OSError as exc:
        raise FluxError(
            f"daemon.state_dir: cannot create {cache}: {exc.strerror}; set daemon.state_dir to a "
            "writable directory (the service user must own it)"
        ) from exc
    return cache


def gateway_name(config: Config) -> str:
    return config.daemon.name or socket.gethostname()


def preload_plugins(config: Config, host: PluginHost) -> None:
    """Load (compile, or take from the cache) and initialise every plugin instance ``config``
    needs, then release them: a reload learns that a changed or broken .wasm fails *before*
    the running pipeline is touched. Raises PluginError/FluxError."""
    plugin_instances.preload(config, host)


class Daemon:
    """One running flux-edge: owns the plugin host, the uplink, the metrics endpoint, the health
    monitor and the current pipeline (replaced on reload)."""

    def __init__(
        self,
        config: Config,
        *,
        observers: Observers | None = None,
        serve_metrics: bool = False,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        # one Observers for every pipeline (the console's observer outlives a reload)
        self.observers = observers or Observers()
        self.serve_metrics = serve_metrics
        self.notifier = notifier or Notifier()
        self.monitor = HealthMonitor(config.daemon.stall_timeout)
        self.host: PluginHost | None = None
        self.uplink: Uplink | None = None
        self.pipeline: Pipeline | None = None
        self.metrics: object | None = None  # MetricsServer, imported only when served
        self.console: object | None = None  # console.app.Console, imported only when enabled
        self.overrides: dict[str, dict[str, object]] = {}  # actuators held by an operator
        self._reload_lock = asyncio.Lock()
        self._console_task: asyncio.Task[None] | None = None
        self.started_at = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.reload_error = ""  # first problem of the last failed reload; "" after a good one
        self.stopping = False
        self.hurry = asyncio.Event()  # a second stop signal: cut the shutdown short

    # --- start / stop ------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        self.host = PluginHost(cache_dir=prepare_state_dir(config))
        if config.uplink is not None:
            self.uplink = Uplink(
                config.uplink, gateway=gateway_name(config),
                state_dir=Path(config.daemon.state_dir),
            )
            await self.uplink.start()
        self.pipeline = self._new_pipeline(config)
        await self.pipeline.start()
        if self.serve_metrics and config.metrics.enabled:
            await self._start_metrics(config)
        if self.serve_metrics and config.console.enabled:
            await self._start_console()

    def _new_pipeline(self, config: Config) -> Pipeline:
        assert self.host is not None
        return Pipeline(
            config, host=self.host, observers=self.observers, uplink=self.uplink,
            monitor=self.monitor,
        )

    async def _start_metrics(self, config: Config) -> None:
        from flux_edge.runtime.metrics import MetricsServer
        from flux_edge.runtime.observe import health_report, render_metrics

        server = MetricsServer(
            config.metrics.host, config.metrics.port,
            render=lambda: render_metrics(self), health=lambda: health_report(self),
        )
        try:
            await server.start()
        except FluxError as exc:  # the pipeline matters more than its metrics: keep running
            log.error("%s; running without metrics", exc)
            return
        self.metrics = server
        log.info("metrics on http://%s:%d/metrics (health: /healthz)",
                 config.metrics.host, server.port)

    async def _start_console(self) -> None:
        from flux_edge.console.app import Console

        console = Console(self)
        try:
            await console.start()
        except FluxError as exc:  # like the metrics: the pipeline matters more
            log.error("%s; running without the console", exc)
            await console.close()
            return
        self.console = console

    async def _stop_console(self) -> None:
        console, self.console = self.console, None
        if console is not None:
            from flux_edge.console.app import Console

            assert isinstance(console, Console)
            await console.close()

    async def _restart_console(self) -> None:
        await self._stop_console()
        if self.config.console.enabled:
            await self._start_console()

    async def _stop_metrics(self) -> None:
        server, self.metrics = self.metrics, None
        if server is not None:
            from flux_edge.runtime.metrics import MetricsServer

            assert isinstance(server, MetricsServer)
            await server.close()

    async def shutdown(self) -> None:
        """Drain, safe state, flush the outbox: within daemon.shutdown_timeout in all."""
        self.stopping = True
        await self._stop_console()  # no operator action while the pipeline drains
        budget = self.config.daemon.shutdown_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        self.notifier.stopping("stopping: draining queues")
        if self.pipeline is not None:
            # leave the uplink at least a third of the budget to flush
            await self.pipeline.stop(drain_timeout=budget * 2 / 3, safe_state=True)
        if self.uplink is not None:
            remaining = max(deadline - loop.time(), 0.0)
            # with the link down there is nobody to flush to: the outbox keeps the records, and
            # a reboot should not wait out the budget for a broker that is not there
            up = self.uplink
            if self.hurry.is_set():
                remaining = 0.0
            flush = asyncio.ensure_future(up.flush(remaining if up.connected else 0.0))
            hurry = asyncio.ensure_future(self.hurry.wait())
            await asyncio.wait({flush, hurry}, return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            if not flush.done():
                flush.cancel()
                await asyncio.wait({flush})
            flushed = not flush.cancelled() and flush.result()
            if not flushed:
                log.warning(
                    "stop: %d record(s) not yet acknowledged upstream stay in the outbox and "
                    "are sent after the next start", self.uplink.depth(),
                )
            await self.uplink.close()
        await self._stop_metrics()
        if self.host is not None:
            self.host.close()

    # --- reload --------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file; swap pipelines only if the new one checks and loads.
        One reload at a time (SIGHUP, the console)."""
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> bool:
        self.notifier.reloading()
        path = self.config.path
        log.info("reload: reading %s", path)
        new, problems = check_config(path)
        errors = [p for p in problems if p.severity == "error"]
        for p in problems:
            (log.error if p.severity == "error" else log.warning)("reload: %s", p)
        if new is None or errors:
            return self._reload_failed(errors[0] if errors else "the configuration is invalid")
        assert self.host is not None and self.pipeline is not None
        try:
            prepare_state_dir(new)
            preload_plugins(new, self.host)
        except FluxError as exc:
            return self._reload_failed(str(exc))
        old = self.pipeline
        uplink_changed = new.uplink != self.config.uplink
        await old.stop(drain_timeout=new.daemon.shutdown_timeout, safe_state=False)
        if uplink_changed:
            await self._swap_uplink(new)
        if new.daemon.stall_timeout != self.monitor.stall_timeout:
            self.monitor.stall_timeout = new.daemon.stall_timeout
        pipeline = self._new_pipeline(new)
        try:
            await pipeline.start()
        except FluxError as exc:
            log.error("reload: the new pipeline did not start (%s); restarting the old one", exc)
            await pipeline.stop(safe_state=False)
            if uplink_changed:
                await self._swap_uplink(self.config)
            self.pipeline = self._new_pipeline(self.config)
            await self.pipeline.start()
            if self.console is not None:
                self.console.pipeline_changed()  # type: ignore[attr-defined]
            return self._reload_failed(str(exc))
        self.pipeline = pipeline
        metrics_changed = new.metrics != self.config.metrics
        console_changed = new.console != self.config.console
        self.config = new
        if self.console is not None:
            self.console.pipeline_changed()  # type: ignore[attr-defined]
        if console_changed and self.serve_metrics:
            # not awaited here: the reload may have been asked for by the console itself
            self._console_task = asyncio.get_running_loop().create_task(self._restart_console())
        if metrics_changed and self.serve_metrics:
            await self._stop_metrics()
            if new.metrics.enabled:
                await self._start_metrics(new)
        self.reloads_ok += 1
        self.reload_error = ""
        log.info("reload: done")
        self.notifier.ready(self.status_line())
        return True

    async def _swap_uplink(self, config: Config) -> None:
        if self.uplink is not None:
            await self.uplink.close()  # its outbox keeps whatever was not acknowledged
            self.uplink = None
        if config.uplink is not None:
            self.uplink = Uplink(
                config.uplink, gateway=gateway_name(config),
                state_dir=Path(config.daemon.state_dir),
            )
            await self.uplink.start()

    def _reload_failed(self, problem: Problem | str) -> bool:
        self.reloads_failed += 1
        if isinstance(problem, Problem):  # short enough for STATUS: key path first, then line
            where = f"{problem.path} (line {problem.line})" if problem.line else problem.path
            self.reload_error = f"{where}: {problem.message}" if where else problem.message
        else:
            self.reload_error = problem
        log.error("reload failed, still running the previous configuration: %s", problem)
        self.notifier.ready(self.status_line())
        return False

    # --- status --------------------------------------------------------------------------------

    def status_line(self) -> str:
        from flux_edge.runtime.observe import status_line

        return status_line(self)

    async def run(
        self,
        stop: asyncio.Event | None = None,
        started: Callable[[Pipeline], None] | None = None,
    ) -> None:
        """Start, serve until ``stop`` is set or SIGTERM/SIGINT arrives (SIGHUP reloads), then
        shut down cleanly. Signals are handled at any moment (runtime/signals.py): during the
        start (a stop abandons it), a reload (a SIGHUP is done after it) and the shutdown (a
        second stop signal cuts it short; a SIGHUP is ignored)."""
        stop = stop or asyncio.Event()
        reload_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = self._install_signals(loop, stop, reload_requested)
        feeder: asyncio.Task[None] | None = None
        try:
            if await self._start_unless_stopped(stop):
                feeder = await self._serve(loop, stop, reload_requested, started)
        finally:
            # the handlers stay through the shutdown: a second SIGTERM cuts it short, a SIGHUP
            # is ignored (with the default action back, either would kill the process)
            try:
                await self.shutdown()
            finally:
                if feeder is not None:
                    feeder.cancel()
                for sig in installed:
                    loop.remove_signal_handler(sig)
        log.info("stopped")

    async def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        stop: asyncio.Event,
        reload_requested: asyncio.Event,
        started: Callable[[Pipeline], None] | None,
    ) -> asyncio.Task[None]:
        """READY, the watchdog, reloads on SIGHUP until ``stop``; returns the watchdog task."""
        assert self.pipeline is not None
        feeder: asyncio.Task[None] | None = None
        try:
            assert self.pipeline is not None
            if started is not None:
                started(self.pipeline)
            self.notifier.ready(self.status_line())
            # what exists now (modules, config, plugin instances) lives as long as the process:
            # keep it out of the collector's full passes (shorter pauses on the loop)
            gc.freeze()
            feeder = loop.create_task(
                WatchdogFeeder(self.notifier, self.monitor, self.status_line).run(),
                name="watchdog",
            )
            while not stop.is_set():
                waits = {loop.create_task(stop.wait()), loop.create_task(reload_requested.wait())}
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                if stop.is_set():
                    break
                reload_requested.clear()
                await self.reload()
            log.info("stopping: draining queues")
        except BaseException:
            if feeder is not None:
                feeder.cancel()
            raise
        return feeder

    def _install_signals(
        self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event, reload: asyncio.Event
    ) -> list[signal.Signals]:
        """SIGTERM/SIGINT stop (a second one hurries the shutdown), SIGHUP reloads (ignored
        while stopping); then the signals held since the first instruction are let through."""

        def on_stop(sig: signal.Signals) -> None:
            if not stop.is_set():
                log.info("%s: stopping", sig.name)
                stop.set()
            elif not self.hurry.is_set():
                log.warning(
                    "%s again while stopping: cutting the drain and the outbox flush short "
                    "(actuators still go to their safe state; unsent records stay in the "
                    "outbox)", sig.name,
                )
                self.hurry.set()
                if self.pipeline is not None:
                    self.pipeline.hurry()

        def on_hup() -> None:
            if stop.is_set():
                log.info("SIGHUP while stopping: no reload")
            else:
                reload.set()

        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_stop, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        try:
            loop.add_signal_handler(signal.SIGHUP, on_hup)
            installed.append(signal.SIGHUP)
        except (NotImplementedError, RuntimeError):
            pass
        if installed:
            signals.unblock()  # what came since the first instruction arrives now
        return installed

    async def _start_unless_stopped(self, stop: asyncio.Event) -> bool:
        """``start()``, abandoned (cancelled) if a stop comes first. True when it started."""
        loop = asyncio.get_running_loop()
        # a signal held since the first instruction reaches its handler two loop turns after
        # the unblock (the wakeup fd is read, then the handler runs): before anything starts
        for _ in range(2):
            await asyncio.sleep(0)
        if stop.is_set():
            log.info("stop requested before the start")
            return False
        starting = loop.create_task(self.start(), name="start")
        stopped = loop.create_task(stop.wait(), name="stop-wait")
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            stopped.cancel()
            starting.result()  # its error, if it failed
            return not stop.is_set()  # stopped as it finished: no READY, straight to shutdown
        log.info("stop requested during start-up: abandoning the start")
        starting.cancel()
        await asyncio.wait({starting})
        if not starting.cancelled() and starting.exception() is not None:
            log.info("start-up ended by: %s", starting.exception())
        return False


async def run_pipeline(
    config: Config,
    *,
    observers: Observers | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[Pipeline], None] | None = None,
    serve_metrics: bool = False,
) -> None:
    """Run ``config`` until ``stop`` is set or SIGTERM/SIGINT arrives; then drain and stop."""
    daemon = Daemon(config, observers=observers, serve_metrics=serve_metrics)
    await daemon.run(stop=stop, started=started)
