"""Checks across the fields of one table that config owns (a plugin), and helpers the kinds share
(a serial line's baud rate, TLS files)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux_edge.config.schema import PluginConfig
from flux_edge.config.values import _STANDARD_BAUDRATES, Key

if TYPE_CHECKING:  # the validator calls these checks; they only take it as an argument
    from flux_edge.config.kinds import TableCheck
    from flux_edge.config.validate import _Validator


def baudrate_warning(v: _Validator, out: dict[str, Any], path: Key) -> None:
    baud = out.get("baudrate")
    if baud is not None and baud not in _STANDARD_BAUDRATES:
        v.report(
            (*path, "baudrate"),
            f"{baud} is not a standard baud rate (9600, 19200, 38400, 115200, ...): check the "
            "device's setting; a rate the serial adapter cannot generate fails when the port opens",
            warning=True,
        )


def resolve_tls_files(v: _Validator, tls: object, where: Key, base_dir: Path) -> None:
    """TLS files (MQTT sources, uplink) must exist; relative paths become absolute, next to the
    config file."""
    if not isinstance(tls, dict):
        return
    for key in ("ca_file", "cert_file", "key_file"):
        value = tls.get(key, "")
        if not isinstance(value, str) or not value:
            continue
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            v.report((*where, key), f"no such file: {path}")
        else:
            tls[key] = str(path)


def _plugin_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if out.get("file") and out.get("module"):
        v.report(
            (*path, "file"),
            'give either "file" (a path) or "module" (a name looked up in plugin_dirs), not both',
        )


TABLE_CHECKS: dict[type, TableCheck] = {PluginConfig: _plugin_checks}
