"""`flux-edge test`: commissioning from the shell, as Telegraf's ``--test`` does.

Polls every configured source once (a Modbus device: until each of its devices has been polled;
MQTT and serial sources: listens for ``--seconds``), runs what it read through the plugin
chains, prints the measurements, which rules would fire and what the safety layer would say
about the actions they would take. **Nothing is written to any device**: no action executor is
built at all. State goes to a temporary directory (the plugin cache is reused when readable), so
the rule state, the audit log and the outbox of a running daemon are not touched; a Modbus RTU
port or a broker session the daemon holds may need the daemon stopped first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TextIO

import msgspec

from flux_edge.config import Config
from flux_edge.errors import FluxError
from flux_edge.model import Measurement, Quality, Reading

EX_OK, EX_FAIL = 0, 1


def _listens(cfg: object) -> bool:
    """Sources that wait for data rather than poll (MQTT, serial)."""
    return type(cfg).__struct_config__.tag in ("mqtt", "serial")  # type: ignore[attr-defined]


async def _read_source(name: str, cfg: object, gateway: str, *, seconds: float,
                       wait_max: float, out: TextIO) -> list[Reading]:
    from flux_edge.runtime.pipeline import make_source

    readings: list[Reading] = []
    got = asyncio.Event()

    async def emit(r: Reading) -> None:
        readings.append(r)
        got.set()

    def on_status(device: str, quality: Quality, error: str) -> None:
        if quality != "good":
            print(f"  {name}/{device}: {quality}: {error}", file=out)
        got.set()

    source = make_source(name, cfg, emit, on_status, gateway)  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(source.run())
    listen = _listens(cfg)
    deadline = asyncio.get_running_loop().time() + (seconds if listen else wait_max)
    try:
        while True:
            if not listen and source.health and all(
                h.polls >= 1 and (h.last_success_ts is not None or h.consecutive_errors)
                for h in source.health.values()
            ):
                break
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or task.done():
                break
            got.clear()
            try:
                async with asyncio.timeout(left):
                    await got.wait()
            except TimeoutError:
                break
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except FluxError as exc:
            print(f"  {name}: {exc}", file=out)
        await source.close()
    return readings


async def _run(config: Config, only: str, *, seconds: float, wait_max: float, out: TextIO
               ) -> int:
    from flux_edge.actions.safety import SafetyLayer
    from flux_edge.plugins.host import PluginHost
    from flux_edge.rules.engine import RuleEngine
    from flux_edge.runtime import plugin_instances
    from flux_edge.runtime.pipeline import Pipeline

    names = [only] if only else list(config.sources)
    if only and only not in config.sources:
        print(f"flux-edge: error: no source {only!r} (sources: {', '.join(config.sources)})",
              file=sys.stderr)
        return 2
    cache = Path(config.daemon.state_dir) / "cache"
    with tempfile.TemporaryDirectory(prefix="flux-edge-test-") as tmp:
        use_cache = cache if cache.is_dir() and os.access(cache, os.W_OK) else Path(tmp) / "cache"
        use_cache.mkdir(parents=True, exist_ok=True)
        sources = dict(config.sources)
        for n, s in sources.items():  # never take over the daemon's broker session
            if hasattr(s, "client_id"):
                sources[n] = msgspec.structs.replace(s, client_id=f"flux-edge-test-{os.getpid()}")
        cfg = msgspec.structs.replace(
            config, sources=sources,
            daemon=msgspec.structs.replace(config.daemon, state_dir=tmp),
        )
        measurements: list[Measurement] = []
        with PluginHost(cache_dir=use_cache) as host:
            for sname in names:
                scfg = cfg.sources[sname]
                kind = type(scfg).__struct_config__.tag
                what = f"listening {seconds:g} s" if _listens(scfg) else "polling once"
                print(f"source {sname} ({kind}): {what}", file=out)
                chains: dict[str, list[object]] = defaultdict(list)
                for inst in plugin_instances.source_instances(cfg, sname):
                    chains[inst.device].append(plugin_instances.load(host, cfg, inst))
                readings = await _read_source(sname, scfg, cfg.daemon.name, seconds=seconds,
                                              wait_max=wait_max, out=out)
                if not readings:
                    print("  nothing read", file=out)
                by_dev: dict[str, list[Reading]] = defaultdict(list)
                for r in readings:
                    by_dev[r.device].append(r)
                for dev, rs in by_dev.items():
                    chain = chains.get(dev) or chains.get("", [])
                    ms, errors = Pipeline.chain_results(chain, rs)  # type: ignore[arg-type]
                    print(f"  {dev}: {len(rs)} reading(s) -> {len(ms)} measurement(s)", file=out)
                    for m in ms:
                        unit = f" {m.unit}" if m.unit else ""
                        q = "" if m.quality == "good" else f" [{m.quality}]"
                        print(f"    {m.name} = {m.value!r}{unit}{q}", file=out)
                    for e in errors:
                        print(f"    error ({e.plugin or e.stage}): {e.error}", file=out)
                    measurements += ms
                for chain in chains.values():
                    for plugin in chain:
                        plugin.close()  # type: ignore[attr-defined]
        if not config.rules:
            return EX_OK
        engine = RuleEngine(cfg, log_firings=False)
        safety = SafetyLayer(cfg)
        latest: dict[str, dict[str, Measurement]] = defaultdict(dict)
        print("rules:", file=out)
        fired = 0
        for m in measurements:
            latest[m.device][m.name] = m
            for cmd in engine.on_measurement(m):
                fired += 1
                d = safety.check(cmd, latest)
                verdict = (f"the safety layer would block it: {d.reason}" if d.blocked
                           else "the safety layer would allow it" + (f" ({d.reason})"
                                                                      if d.reason else ""))
                print(f"  {cmd.rule} would fire: action {cmd.action} "
                      f"{cmd.params or ''} - {verdict} (not run)", file=out)
        deadline = engine.next_deadline()
        if deadline is not None:
            print(f"  a `for` timer is pending: a rule would fire in "
                  f"{max(deadline - time.time(), 0):.1f} s if its condition holds", file=out)
        if not fired:
            print("  none would fire on these values", file=out)
    return EX_OK


def cmd_test(args: argparse.Namespace) -> int:
    from flux_edge.kinds import load_config
    from flux_edge.logs import setup_logging

    setup_logging(args.log or "warn")
    config = load_config(args.config_path)
    return asyncio.run(_run(config, args.source or "", seconds=args.seconds,
                            wait_max=args.timeout, out=sys.stdout))


def add_test_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                    add_config: object) -> None:
    p = sub.add_parser(
        "test", help="poll every source once, run plugins and rules, print what would happen "
        "(writes nothing to any device)")
    add_config(p)  # type: ignore[operator]
    p.add_argument("--source", help="only this source")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="how long to listen on MQTT and serial sources (default 5)")
    p.add_argument("--timeout", type=float, default=15.0,
                   help="longest wait for a polled source's devices (default 15)")
    p.add_argument("--log", help="log filter (default: warn)")
    p.set_defaults(func=cmd_test)
