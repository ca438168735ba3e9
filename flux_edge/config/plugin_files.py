"""Where a plugin's .wasm file is looked up, and whether it is the file the config pinned
(``sha256``). Whether the plugin's ``config`` table suits its manifest is the plugins domain's
check (``flux_edge/plugins/checks.py``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from flux_edge.config.schema import Config
from flux_edge.config.values import _fmt_path, check_sha256_value
from flux_edge.errors import ConfigError, Problem

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

def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
