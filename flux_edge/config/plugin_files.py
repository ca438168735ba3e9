"""Where a plugin's .wasm file is looked up, whether it is the file the config pinned
(``sha256``), and whether the plugin's ``config`` table suits its manifest."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flux_edge.config.schema import Config, DaemonConfig
from flux_edge.config.values import Key, _fmt_path
from flux_edge.errors import ConfigError, Problem
from flux_edge.plugins.manifest import KIND_EXPORTS, ManifestError, read_manifest, validate_config

if TYPE_CHECKING:
    from flux_edge.config.kinds import Context

# --- plugin files -------------------------------------------------------------------------------


def bundled_plugin_dir() -> Path:
    """Where the plugins shipped with flux-edge live (built by plugins/build-all.sh)."""
    return Path(__file__).resolve().parent.parent / "plugins" / "bundled"


def _candidates(
    base_dir: Path, plugin_dirs: tuple[str, ...] | list[str], name: str, module: str, file: str
) -> list[Path]:
    if file:
        given = Path(file).expanduser()
        return [given if given.is_absolute() else base_dir / given]
    filename = f"{module or name}.wasm"
    dirs = [Path(d).expanduser() for d in plugin_dirs]
    dirs = [d if d.is_absolute() else base_dir / d for d in dirs]
    return [d / filename for d in [*dirs, bundled_plugin_dir()]]


def _missing_wasm(name: str, file: str, candidates: list[Path]) -> str:
    build = (
        "build the bundled plugins with plugins/build-all.sh, "
        "or your own with `flux-edge plugin build DIR`"
    )
    if file:
        return f'plugin "{name}": file {candidates[0]} does not exist; {build}'
    return (
        f'plugin "{name}": {candidates[0].name} not found; looked in: '
        + ", ".join(str(c.parent) for c in candidates)
        + f"; {build}"
    )


def plugin_search_paths(config: Config, name: str) -> list[Path]:
    """The files tried for plugin ``name``, in order: ``file`` (relative to the config file's
    directory), else ``<module or name>.wasm`` in each of ``daemon.plugin_dirs`` (relative to the
    config file's directory), then in ``bundled_plugin_dir()``. ``KeyError`` if undeclared."""
    plugin = config.plugins[name]
    return _candidates(config.base_dir, config.daemon.plugin_dirs, name, plugin.module, plugin.file)


def resolve_plugin_path(config: Config, name: str) -> Path:
    """The .wasm file for plugin ``name``. Raises ``ConfigError`` naming every place searched."""
    if name not in config.plugins:
        declared = ", ".join(config.plugins) or "none"
        raise ConfigError(
            [
                Problem(
                    config.path,
                    f"plugins.{name}",
                    f'no plugin "{name}" is declared (declared: {declared})',
                )
            ]
        )
    candidates = plugin_search_paths(config, name)
    for candidate in candidates:
        if candidate.is_file():
            pin = str(getattr(config.plugins[name], "sha256", "") or "")
            problem = pin_mismatch(name, candidate, pin) if pin else None
            if problem:
                path = _fmt_path(("plugins", name, "sha256"))
                raise ConfigError([Problem(config.path, path, problem)])
            return candidate
    message = _missing_wasm(name, config.plugins[name].file, candidates)
    raise ConfigError([Problem(config.path, _fmt_path(("plugins", name)), message)])


# --- sha256 pinning -------------------------------------------------------------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256_value(value: str) -> str | None:
    """Why ``value`` is not a usable ``sha256`` pin (64 hex digits), or None."""
    if _SHA256.fullmatch(value.lower()):
        return None
    return (
        f"sha256 must be 64 hex digits (the output of `sha256sum FILE` or "
        f"`flux-edge plugin info NAME`), got {len(value)} character(s)"
    )


def pin_mismatch(name: str, path: Path, pin: str) -> str | None:
    """Why the file at ``path`` is not the one ``pin`` names, or None when it is."""
    bad = check_sha256_value(pin)
    if bad:
        return f'plugin "{name}": {bad}'
    try:
        actual = file_sha256(path)
    except OSError as exc:
        return f'plugin "{name}": cannot read {path} to check its sha256: {exc.strerror or exc}'
    if actual == pin.lower():
        return None
    return (
        f'plugin "{name}": {path} has sha256 {actual}, but the config pins {pin.lower()}: the '
        "file was replaced or rebuilt; refusing to load it. If the new file is intended, put its "
        "sha256 in the config (flux-edge plugin info NAME prints it); else restore the pinned file"
    )


# --- the plugin's config against its manifest ----------------------------------------------------


def check_plugin_configs(ctx: Context) -> None:
    """For each declared plugin whose .wasm file is found: the file matches its ``sha256`` pin,
    its manifest is readable, its kind suits its use (a chain needs ``decode``, a ``wasm``
    action ``action``), and its ``config`` table passes the manifest's schema. Problems are
    reported at ``plugins.NAME.config.<key path>`` (file:line from the validator), with
    did-you-mean hints for unknown keys and enum values. A plugin without a manifest gets a
    warning (its config cannot be checked). Missing files are ``check_references``' to report.

    Meant to run after the schema pass with the references (``Domain.references``)."""
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
        for where, message, at, warning in plugin_config_issues(
            pname, found, config, in_chain, by_action
        ):
            v.report((*path, *where), message, at=at, warning=warning)


def plugin_config_issues(
    name: str,
    wasm: Path,
    config: Any,
    in_chain: set[str] | frozenset[str] = frozenset(),
    by_action: set[str] | frozenset[str] = frozenset(),
) -> list[tuple[Key, str, Literal["key", "value"], bool]]:
    """The problems of plugin ``name`` (its module at ``wasm``, its ``config`` table) as
    (key path below ``plugins.NAME``, message, "key" | "value", is a warning)."""
    try:
        manifest = read_manifest(wasm)
    except ManifestError as exc:
        message = f'plugin "{name}": {exc}; rebuild it with `flux-edge plugin build`'
        return [((), message, "key", False)]
    if manifest is None:
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
