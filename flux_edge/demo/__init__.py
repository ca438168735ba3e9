"""`flux-edge demo`: the real pipeline against a simulated boiler, no hardware or broker needed.

A pymodbus server on 127.0.0.1 plays a boiler whose temperature rises while its burner coil is on
and falls while it is off. The embedded config (demo.toml, the same file as config/demo.toml) polls
it, decodes the registers with the bundled modbus_decode.wasm, and two rules keep it between 60
and 80 °C by writing the burner coil.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from importlib import resources
from pathlib import Path
from typing import TextIO

import msgspec

from flux_edge.config import Config
from flux_edge.kinds import load_config
from flux_edge.model import Measurement, Outcome
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers

DEMO_PORT = 15020


def demo_config_path() -> Path:
    return Path(str(resources.files("flux_edge.demo").joinpath("demo.toml")))


def demo_config(port: int, state_dir: Path) -> Config:
    """The embedded demo config, pointed at the simulator's port and a writable state dir."""
    cfg = load_config(demo_config_path())
    sources = {
        name: msgspec.structs.replace(src, port=port) for name, src in cfg.sources.items()
    }
    daemon = msgspec.structs.replace(cfg.daemon, state_dir=str(state_dir))
    return msgspec.structs.replace(cfg, sources=sources, daemon=daemon)


def _fmt_value(m: Measurement) -> str:
    if isinstance(m.value, bool):
        return "on" if m.value else "off"
    if isinstance(m.value, float):
        return f"{m.value:.1f}{' ' + m.unit if m.unit else ''}"
    return f"{m.value}{' ' + m.unit if m.unit else ''}"


class DemoPrinter:
    """One readable line per poll of the boiler and one per action, naming the rule.

    A poll reads the coil and the registers in two requests (two readings); the printer joins
    what arrives within 100 ms into one line per device.
    """

    def __init__(self, config: Config, out: TextIO) -> None:
        self._out = out
        self._config = config
        self._pending: dict[str, dict[str, Measurement]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self.fired: collections.Counter[str] = collections.Counter()
        self.ok = 0
        self.failed = 0

    @staticmethod
    def _clock(ts: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 10) % 10}"

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for device, by_name in self._pending.items():
            ms = list(by_name.values())
            parts = "  ".join(f"{m.name} {_fmt_value(m)}" for m in ms)
            self._out.write(f"{self._clock(ms[0].ts)}  {device:<8} {parts}\n")
        self._pending.clear()
        self._out.flush()

    def measurements(self, source: str, ms: list[Measurement]) -> None:
        for m in ms:
            pending = self._pending.setdefault(m.device, {})
            if m.name in pending:  # a new poll began: print the previous one
                self.flush()
                pending = self._pending.setdefault(m.device, {})
            pending[m.name] = m
        if self._pending and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(0.1, self.flush)

    def outcome(self, o: Outcome) -> None:
        self.flush()
        cmd = o.command
        rule = self._config.rules.get(cmd.rule)
        cause = ""
        if cmd.cause is not None:
            cause = f"{cmd.cause.name} was {_fmt_value(cmd.cause)}"
        when = f" [{rule.when}]" if rule else ""
        self.fired[cmd.rule] += 1
        if o.ok:
            self.ok += 1
            result = "done"
            if o.verified is not None:
                result += f", device reads back {o.verified!r}"
        else:
            self.failed += 1
            result = f"FAILED: {o.error}"
        self._out.write(
            f"{self._clock(o.ts)}  >> rule {cmd.rule}{when} fired ({cause}): "
            f"action {cmd.action}: {result} ({o.latency_s * 1000:.1f} ms)\n"
        )
        self._out.flush()


async def _demo(seconds: float | None, port: int, out: TextIO) -> int:
    from flux_edge.demo.boiler import BoilerSimulator

    state_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flux-edge-demo"
    sim = BoilerSimulator(host="127.0.0.1", port=port)
    await sim.start()
    port = sim.port  # the real one when asked for port 0
    config = demo_config(port, state_dir)
    printer = DemoPrinter(config, out)
    observers = Observers(measurements=[printer.measurements], outcomes=[printer.outcome])
    out.write(
        f"flux-edge demo: simulated boiler on 127.0.0.1:{port}; rules keep it between 60 and 80 °C"
        f"{f' for {seconds:g} s' if seconds else ' (Ctrl-C to stop)'}\n"
    )
    stop = asyncio.Event()
    if seconds:
        asyncio.get_running_loop().call_later(seconds, stop.set)
    try:
        await run_pipeline(config, observers=observers, stop=stop)
    finally:
        await sim.stop()
        printer.flush()
    fired = ", ".join(f"{r} x{n}" for r, n in sorted(printer.fired.items())) or "none"
    out.write(f"demo finished: rules fired: {fired}; actions ok {printer.ok}, "
              f"failed {printer.failed}\n")
    return 0 if printer.failed == 0 else 1


def run_demo(seconds: float | None, port: int, out: TextIO) -> int:
    return asyncio.run(_demo(seconds, port, out))
