"""Loading: text -> Config or a list of Problems, in passes (see the package docstring).

The entry points take the ``Kinds`` to load with; ``flux_edge.kinds`` binds them to every kind and
domain of this build (``load_config`` etc.), so this module names no domain."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from flux_edge.config.kinds import SECTIONS, Context, Kinds
from flux_edge.config.positions import _Positions, _scan, parse_document
from flux_edge.config.references import check_references
from flux_edge.config.schema import Config
from flux_edge.config.security import check_security
from flux_edge.config.validate import _BAD, _Validator
from flux_edge.errors import ConfigError, Problem

_log = logging.getLogger("flux_edge.config")

# The largest configuration file read: a 2 MiB file (20,000 Modbus registers written out) is
# checked in about 1 s on the development machine; larger ones are refused with this limit
# rather than taking many seconds (10 MB: 5 s) of a gateway's start-up or reload.
MAX_CONFIG_BYTES = 2 * 1024 * 1024
MAX_DEPTH = 32  # tables and arrays nested deeper than any schema needs
INT64 = (-(2**63), 2**63 - 1)  # TOML integers are 64-bit (the spec: refuse what is not)


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
    v.base_dir = base_dir

    def build(data: dict[str, Any]) -> Config | None:
        try:
            return build_config(data, kinds)
        except (msgspec.ValidationError, KeyError):
            return None

    if not _within_limits(v, raw):
        return None, v.problems
    ctx: Context | None = None
    try:
        data = v.check(raw, Config, ())
        if data is not _BAD:
            ctx = Context(v, raw=raw, data=data, base_dir=base_dir, kinds=kinds, build=build)
            check_references(ctx)
            check_security(v, data, config_path)
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


def _within_limits(v: _Validator, raw: dict[str, Any]) -> bool:
    """Integers outside 64 bits and nesting past ``MAX_DEPTH``, each reported at its key;
    checked before the schema walk (which would meet them as an OverflowError or a
    RecursionError)."""
    before = v.errors
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(raw, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            if not INT64[0] <= value <= INT64[1]:
                digits = len(str(abs(value))) if abs(value) < 10**4300 else 4300
                v.report(path, f"integer out of range: {digits} digits (TOML integers are 64-bit, "
                         f"{INT64[0]}..{INT64[1]})")
            continue
        if isinstance(value, dict | list):
            if len(path) > MAX_DEPTH:
                v.report(path, f"values nested more than {MAX_DEPTH} levels deep")
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((item, (*path, key)) for key, item in items)
    return v.errors == before


def _split(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    errors = [p for p in problems if p.severity == "error"]
    return errors, [p for p in problems if p.severity != "error"]


def _too_large(file: str) -> Problem:
    return Problem(
        file, "", f"the file is larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB, the limit of a "
        "flux-edge configuration (split a gateway this large in two, or use device profiles: "
        "config/devices/*.toml)",
    )


def _not_text(file: str, data: bytes) -> Problem | None:
    """UTF-16/32 text (by its byte-order mark or its NUL bytes) and binary files, said so."""
    head = data[:4]
    odd, even = data[1:8:2], data[0:8:2]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (
        len(data) >= 4 and (odd.count(0) == len(odd)) != (even.count(0) == len(even))
    ):
        wide = "UTF-32" if head in (b"\xff\xfe\0\0", b"\0\0\xfe\xff") else "UTF-16"
        return Problem(file, "", f"the file is {wide} text: save it as UTF-8", 1, 1)
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        column = nul - (data.rfind(b"\n", 0, nul) + 1) + 1
        return Problem(file, "", "a NUL byte: a configuration is text (is this the right "
                       "file?)", line, column)
    return None


def _guarded(
    file: str, check: Callable[[], tuple[Config | None, list[Problem]]]
) -> tuple[Config | None, list[Problem]]:
    """Whatever happens while checking is a problem of the file, never a traceback."""
    try:
        return check()
    except MemoryError:
        return None, [Problem(file, "", "not enough memory to check this configuration")]
    except RecursionError:
        return None, [Problem(file, "", "values are nested too deeply")]
    except Exception as exc:  # noqa: BLE001 - a bug of ours must not end check-config in a traceback
        _log.debug("checking %s failed", file, exc_info=exc)
        return None, [Problem(
            file, "", f"internal error while checking this file ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the file is refused: please report it",
        )]


def check_config_text(
    text: str, kinds: Kinds, path: str = "<string>"
) -> tuple[Config | None, list[Problem]]:
    """Like ``check_config`` for text in memory. ``path`` names it in problems; unless it is
    ``"<...>"`` it also sets ``Config.path`` (so relative plugin paths resolve next to it)."""
    if len(text) > MAX_CONFIG_BYTES:
        return None, [_too_large(path)]
    config_path = "" if path.startswith("<") else str(Path(path).resolve())
    if "\0" in text:
        return None, [_not_text(path, text.encode("utf-8", "replace")) or _too_large(path)]
    return _guarded(path, lambda: _check(text, path, config_path, kinds))


def check_config(path: str | Path, kinds: Kinds) -> tuple[Config | None, list[Problem]]:
    """Load and check a configuration file; never raises for a bad file.

    Returns ``(config, problems)``: every problem found, errors and warnings (``Problem.severity``),
    sorted by position. ``config`` is ``None`` when there is any error. ``flux-edge check-config``
    prints the problems and exits 0 without errors, 78 with.
    """
    file = str(path)
    try:
        # non-blocking: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, [Problem(file, "", "cannot read the configuration: not a regular "
                                      "file (a directory, a device or a pipe)")]
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return None, [Problem(file, "", f"cannot read the configuration: {exc.strerror or exc}")]
    if len(data) > MAX_CONFIG_BYTES:
        return None, [_too_large(file)]
    if bad := _not_text(file, data):
        return None, [bad]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded"
        return None, [Problem(file, "", message, line, column)]
    return _guarded(file, lambda: _check(text, file, str(Path(path).resolve()), kinds))


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
