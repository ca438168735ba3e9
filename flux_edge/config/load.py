"""Loading: text -> Config or a list of Problems, in passes (see the package docstring).

The entry points take the ``Kinds`` to load with; ``flux_edge.kinds`` binds them to every kind and
domain of this build (``load_config`` etc.), so this module names no domain."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec

from flux_edge.config.kinds import SECTIONS, Context, Kinds
from flux_edge.config.positions import _Positions, _scan, parse_document
from flux_edge.config.references import check_references
from flux_edge.config.schema import Config
from flux_edge.config.validate import _BAD, _Validator
from flux_edge.errors import ConfigError, Problem

_log = logging.getLogger("flux_edge.config")


def build_config(data: dict[str, Any], kinds: Kinds) -> Config:
    """The ``Config`` of checked data: each source and action entry becomes its kind's struct.
    Raises ``msgspec.ValidationError`` (a gap between the checks and the structs) or ``KeyError``
    (an entry of no registered kind)."""
    entries: dict[str, dict[str, Any]] = {}
    rest = dict(data)
    for section in SECTIONS:
        registry = kinds.registry(section)
        built = {}
        for name, entry in (rest.pop(section, None) or {}).items():
            kind = registry.get(entry.get("type"))
            if kind is None:
                raise KeyError(f"{section}.{name}: no {section} kind {entry.get('type')!r}")
            built[name] = msgspec.convert(entry, kind.struct)
        entries[section] = built
    config = msgspec.convert(rest, Config)
    return msgspec.structs.replace(config, **entries)


def make_validator(file: str, positions: _Positions, kinds: Kinds) -> _Validator:
    """The schema walk for one file, knowing the kinds' structs and rules."""
    return _Validator(
        file,
        positions,
        rules=kinds.rules(),
        table_checks=kinds.table_checks(),
        registries=(kinds.sources, kinds.actions),
    )


# --- entry points -------------------------------------------------------------------------------

def _check(
    text: str, file: str, config_path: str, kinds: Kinds
) -> tuple[Config | None, list[Problem]]:
    text, raw, syntax = parse_document(text, file)
    if raw is None:
        return None, syntax
    positions = _scan(text)
    v = make_validator(file, positions, kinds)
    base_dir = Path(config_path).parent if config_path else Path.cwd()

    def build(data: dict[str, Any]) -> Config | None:
        try:
            return build_config(data, kinds)
        except (msgspec.ValidationError, KeyError):
            return None

    ctx: Context | None = None
    try:
        data = v.check(raw, Config, ())
        if data is not _BAD:
            ctx = Context(v, raw=raw, data=data, base_dir=base_dir, kinds=kinds, build=build)
            check_references(ctx)
            for domain in kinds.domains:
                if domain.references is not None:
                    domain.references(ctx)
            for sname, src in ctx.entries("sources").items():
                kind = ctx.kind_of("sources", src)
                if kind is not None and kind.normalize is not None:
                    kind.normalize(ctx, sname, src)
            for domain in kinds.domains:
                if domain.semantic is not None:
                    domain.semantic(ctx)
    except RecursionError:
        v.report((), "values are nested too deeply")
    config = None
    if v.errors == 0 and ctx is not None:
        data["path"] = config_path
        try:
            config = build_config(data, kinds)
        except (msgspec.ValidationError, KeyError) as exc:  # a gap between checks and schema
            v.report((), f"internal error: the checked configuration was refused: {exc}")
        if config is not None:
            for sname in config.sources:
                kind = kinds.sources.of(config.sources[sname])
                if kind.built_check is not None:
                    kind.built_check(ctx, config, sname)
            for domain in kinds.domains:
                if domain.built is not None:
                    domain.built(ctx, config)
            if v.errors:
                config = None
    # this file's problems first, by position; then those of profile files it uses
    problems = sorted(
        v.problems, key=lambda p: (p.file != file, p.file, p.line == 0, p.line, p.column)
    )
    return config, problems


def _split(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    errors = [p for p in problems if p.severity == "error"]
    return errors, [p for p in problems if p.severity != "error"]


def check_config_text(
    text: str, kinds: Kinds, path: str = "<string>"
) -> tuple[Config | None, list[Problem]]:
    """Like ``check_config`` for text in memory. ``path`` names it in problems; unless it is
    ``"<...>"`` it also sets ``Config.path`` (so relative plugin paths resolve next to it)."""
    config_path = "" if path.startswith("<") else str(Path(path).resolve())
    return _check(text, path, config_path, kinds)


def check_config(path: str | Path, kinds: Kinds) -> tuple[Config | None, list[Problem]]:
    """Load and check a configuration file; never raises for a bad file.

    Returns ``(config, problems)``: every problem found, errors and warnings (``Problem.severity``),
    sorted by position. ``config`` is ``None`` when there is any error. ``flux-edge check-config``
    prints the problems and exits 0 without errors, 78 with.
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, [Problem(file, "", f"cannot read the configuration: {exc.strerror or exc}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded"
        return None, [Problem(file, "", message, line, column)]
    return _check(text, file, str(Path(path).resolve()), kinds)


def _finish(config: Config | None, problems: list[Problem]) -> Config:
    errors, warnings = _split(problems)
    if errors or config is None:
        raise ConfigError(errors or problems)
    for warning in warnings:
        _log.warning("%s", warning)
    return config


def load_config(path: str | Path, kinds: Kinds) -> Config:
    """Load a configuration file. Raises ``ConfigError`` holding every error; warnings are logged
    (use ``check_config`` to get them)."""
    return _finish(*check_config(path, kinds))


def load_config_text(text: str, kinds: Kinds, path: str = "<string>") -> Config:
    """Load configuration text (``path`` as in ``check_config_text``). Raises ``ConfigError``."""
    return _finish(*check_config_text(text, kinds, path))
