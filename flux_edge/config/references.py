"""References between tables that no single kind or domain owns: chains name plugins, plugin
files exist, device names are unique across sources, one source per serial port. Then each
entry's own kind checks its references (``Kind.cross_check``: an action's source, a wasm
action's target) and each domain its own (``Domain.references``: rules name actions)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from flux_edge.config.kinds import SECTIONS, Context, Device
from flux_edge.config.plugin_files import _candidates, _missing_wasm
from flux_edge.config.schema import DaemonConfig
from flux_edge.config.values import Key, _fmt_path, _got

if TYPE_CHECKING:
    from flux_edge.config.validate import _Validator


def check_references(ctx: Context) -> None:
    v = ctx.v
    plugins = ctx.names("plugins")
    sources = ctx.names("sources")
    used_plugins: set[str] = set()
    for section in SECTIONS:
        for entry in ctx.entries(section).values():
            kind = ctx.kind_of(section, entry)
            if kind is not None and kind.plugins is not None:
                used_plugins.update(kind.plugins(entry))
    for sname, src in ctx.entries("sources").items():
        for index, pname in enumerate(src.get("chain", [])):
            used_plugins.add(pname)
            if plugins is not None and pname not in plugins:
                v.report(
                    ("sources", sname, "chain", index), ctx.missing_ref("plugin", pname, plugins)
                )

    daemon = ctx.data.get("daemon", {})
    plugin_dirs = daemon.get("plugin_dirs", DaemonConfig().plugin_dirs)
    if not v.clean(("daemon", "plugin_dirs")):
        plugin_dirs = ()
    for pname, plugin in ctx.entries("plugins").items():
        path: Key = ("plugins", pname)
        if not (v.clean((*path, "file")) and v.clean((*path, "module"))):
            continue
        file, module = plugin.get("file", ""), plugin.get("module", "")
        candidates = _candidates(ctx.base_dir, plugin_dirs, pname, module, file)
        if not any(c.is_file() for c in candidates):
            where = (*path, "file") if file else (*path, "module") if module else path
            v.report(
                where,
                _missing_wasm(pname, file, candidates),
                at="value" if (file or module) else "key",
            )
        if sources is not None and pname not in used_plugins:
            v.report(
                path,
                f'plugin "{pname}" is declared but no source\'s chain uses it',
                at="key",
                warning=True,
            )

    _check_device_names(v, ctx.devices().declared)
    _check_exclusive(ctx)
    for section in SECTIONS:
        for name, entry in ctx.entries(section).items():
            kind = ctx.kind_of(section, entry)
            if kind is not None and kind.cross_check is not None:
                kind.cross_check(ctx, name, entry)


def _check_device_names(v: _Validator, declared: tuple[Device, ...]) -> None:
    first: dict[str, Key] = {}
    for device in declared:
        name, path = device.name, device.path
        if name not in first:
            first[name] = path
            continue
        other = first[name]
        if len(other) == 2:
            by = f'source "{other[1]}" (a source without "device" is named after its table)'
        else:
            by = _fmt_path(other)
        v.report(
            path,
            f'device name "{name}" is already used by {by}: measurements are keyed by '
            "device, so device names must be unique across all sources",
            at="key" if len(path) == 2 else "value",
        )


def _port_identity(port: str) -> str:
    """Ports compared by the device they open (/dev/serial/by-id/... links resolved)."""
    with contextlib.suppress(OSError, RuntimeError):
        if Path(port).exists():
            return str(Path(port).resolve())
    return port


def _check_exclusive(ctx: Context) -> None:
    """What a kind's ``exclusive`` key names (a serial port) is opened by one source only."""
    v = ctx.v
    owners: dict[str, str] = {}
    for sname, src in ctx.entries("sources").items():
        kind = ctx.kind_of("sources", src)
        if kind is None or not kind.exclusive:
            continue
        port = src.get(kind.exclusive)
        if not isinstance(port, str) or not port:
            continue
        identity = _port_identity(port)
        if identity in owners:
            v.report(
                ("sources", sname, kind.exclusive),
                f'port {_got(port)} is already used by source "{owners[identity]}": a serial '
                "port is one bus, opened by one source; put every device of an RS-485 line "
                "into that source's devices",
            )
        else:
            owners[identity] = sname


