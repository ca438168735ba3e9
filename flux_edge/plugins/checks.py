"""The plugins' check at load time (a ``Domain`` of the config loader): each declared plugin whose
.wasm file is found is the file its ``sha256`` pins, its manifest is readable, its kind suits its
use (a chain needs ``decode``, a ``wasm`` action ``action``), and its ``config`` table passes the
manifest's schema (``manifest.py``), every problem at ``plugins.NAME.config.<key path>``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from flux_edge.config.kinds import Context, Domain
from flux_edge.config.plugin_files import _candidates, pin_mismatch
from flux_edge.config.schema import DaemonConfig
from flux_edge.config.values import Key
from flux_edge.plugins.manifest import KIND_EXPORTS, ManifestError, read_manifest, validate_config


def check_plugin_configs(ctx: Context) -> None:
    """For each declared plugin whose .wasm file is found: the file matches its ``sha256`` pin,
    its manifest is readable, its kind suits its use (a chain needs ``decode``, a ``wasm``
    action ``action``), and its ``config`` table passes the manifest's schema. Problems are
    reported at ``plugins.NAME.config.<key path>`` (file:line from the validator), with
    did-you-mean hints for unknown keys and enum values. A plugin without a manifest gets a
    warning (its config cannot be checked). Missing files are ``check_references``' to report.

    Runs with the references (``Domain.references``), after the schema pass."""
    v = ctx.v
    daemon = ctx.data.get("daemon", {})
    plugin_dirs = daemon.get("plugin_dirs", DaemonConfig().plugin_dirs)
    if not v.clean(("daemon", "plugin_dirs")):
        plugin_dirs = ()
    in_chain: set[str] = set()
    for src in ctx.entries("sources").values():
        if isinstance(src, dict):
            in_chain.update(p for p in src.get("chain", ()) if isinstance(p, str))
    by_action: set[str] = set()
    for act in ctx.entries("actions").values():
        plugin_name = act.get("plugin") if isinstance(act, dict) else None
        if isinstance(plugin_name, str) and act.get("type") == "wasm":
            by_action.add(plugin_name)
    for pname, plugin in ctx.entries("plugins").items():
        path: Key = ("plugins", pname)
        if not isinstance(plugin, dict) or not (
            v.clean((*path, "file")) and v.clean((*path, "module"))
        ):
            continue
        file, module = plugin.get("file", ""), plugin.get("module", "")
        found = next(
            (c for c in _candidates(ctx.base_dir, plugin_dirs, pname, module, file) if c.is_file()),
            None,
        )
        if found is None:
            continue
        pin = plugin.get("sha256", "")
        if isinstance(pin, str) and pin and v.clean((*path, "sha256")):
            problem = pin_mismatch(pname, found, pin)
            if problem:
                v.report((*path, "sha256"), problem)
                continue
        config = plugin.get("config", {})
        # without a manifest only a config table is left unchecked: warn about that one
        for where, message, at, warning in plugin_config_issues(
            pname, found, config, in_chain, by_action, warn_without_manifest=bool(config)
        ):
            v.report((*path, *where), message, at=at, warning=warning)


def _is_text_module(path: Path) -> bool:
    """A module in the WebAssembly text format (wasmtime compiles .wat too): not binary."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False  # read_manifest reports it
    return head != b"\0asm" and path.suffix == ".wat"


def plugin_config_issues(
    name: str,
    wasm: Path,
    config: Any,
    in_chain: set[str] | frozenset[str] = frozenset(),
    by_action: set[str] | frozenset[str] = frozenset(),
    *,
    warn_without_manifest: bool = True,
) -> list[tuple[Key, str, Literal["key", "value"], bool]]:
    """The problems of plugin ``name`` (its module at ``wasm``, its ``config`` table) as
    (key path below ``plugins.NAME``, message, "key" | "value", is a warning). A module
    without a manifest is a warning unless ``warn_without_manifest`` is false."""
    if _is_text_module(wasm):  # WebAssembly text (.wat): no custom sections, so no manifest
        manifest = None
    else:
        try:
            manifest = read_manifest(wasm)
        except ManifestError as exc:
            message = f'plugin "{name}": {exc}; rebuild it with `flux-edge plugin build`'
            return [((), message, "key", False)]
    if manifest is None:
        if not warn_without_manifest:
            return []
        message = (
            f'plugin "{name}": {wasm} has no manifest, so its config cannot be checked; rebuild '
            'it with `flux-edge plugin build` to embed one (docs/plugin-abi.md, "Manifest")'
        )
        return [((), message, "key", True)]
    out: list[tuple[Key, str, Literal["key", "value"], bool]] = []
    uses = (("decode", in_chain, "a source's chain"), ("action", by_action, 'a "wasm" action'))
    for kind, users, what in uses:
        if name in users and kind not in manifest.kinds:
            message = (
                f'plugin "{name}" is used by {what} but its manifest says kind '
                f'"{"/".join(manifest.kinds)}" (it does not export {KIND_EXPORTS[kind]})'
            )
            out.append(((), message, "key", False))
    for issue in validate_config(manifest.config, config):
        out.append((("config", *issue.path), issue.message, issue.at, False))
    return out


DOMAIN = Domain(name="plugins", references=check_plugin_configs)
