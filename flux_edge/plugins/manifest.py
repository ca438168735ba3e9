"""Plugin manifests: what a plugin is and which config it takes, carried inside its .wasm file.

A manifest is a UTF-8 JSON object in a wasm custom section named ``flux.manifest``
(docs/plugin-abi.md, "Manifest"). This module is pure Python and instantiates nothing: it walks
the module's section headers, so reading the manifest of a 200 KB plugin costs microseconds and
no wasm engine. ``flux-edge plugin build`` writes the section from ``manifest.toml`` beside the
plugin's source (see ``flux_edge.plugins.tooling``).

Three parts:

- the wasm reader: :func:`read_module` (custom sections and exports), :func:`embed_section`;
- the manifest: :class:`Manifest`, :func:`parse_manifest`, :func:`manifest_of`;
- the config schema, a JSON Schema subset (``type``, ``enum``, ``minimum``/``maximum``,
  ``exclusiveMinimum``/``exclusiveMaximum``, ``minLength``/``maxLength``,
  ``minItems``/``maxItems``, ``items``, ``properties``, ``required``, ``additionalProperties``,
  ``default``, ``description``, ``examples``): :func:`check_schema` checks a schema uses only
  that subset; :func:`validate_config` checks a plugin's ``config`` table against it and
  returns every :class:`ConfigIssue` with its key path, never raising for bad input.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flux_edge.errors import FluxError

SECTION = "flux.manifest"
"""The name of the custom section that holds the manifest."""
FORMAT = 1
"""The manifest format this module writes and reads (the ``manifest`` key)."""
ABI_VERSION = 1
KINDS = ("decode", "action")
"""``decode``: exports ``flux_process`` (a source's chain); ``action``: exports ``flux_act``."""
KIND_EXPORTS = {"decode": "flux_process", "action": "flux_act"}

_MAGIC = b"\0asm"
_VERSION = b"\x01\0\0\0"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:[-+][0-9A-Za-z.+-]+)?")
_MAX_MANIFEST = 1 << 20


class ManifestError(FluxError):
    """A module is not valid wasm as far as the section headers go, or its manifest is
    malformed. The message says which file and what is wrong."""


# --- the wasm reader ------------------------------------------------------------------------------


def _leb_u32(data: bytes | memoryview, pos: int, end: int, what: str) -> tuple[int, int]:
    """An unsigned LEB128 of at most 32 bits at ``pos`` (before ``end``): (value, next pos)."""
    result = 0
    shift = 0
    for i in range(5):
        if pos >= end:
            raise ManifestError(f"truncated {what} at byte {pos}")
        byte = data[pos]
        pos += 1
        if i == 4 and byte & 0xF0:
            raise ManifestError(f"{what} at byte {pos - 1} does not fit in 32 bits")
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos
    raise ManifestError(f"{what} at byte {pos - 5} is longer than 5 bytes")


def _name(data: bytes | memoryview, pos: int, end: int, what: str) -> tuple[str, int]:
    length, pos = _leb_u32(data, pos, end, f"{what} length")
    if length > end - pos:
        raise ManifestError(f"{what} at byte {pos} runs past its section")
    try:
        text = bytes(data[pos : pos + length]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{what} at byte {pos} is not UTF-8") from exc
    return text, pos + length


@dataclass(frozen=True)
class Module:
    """What :func:`read_module` finds: custom sections in file order (name, payload) and the
    exports (name -> kind: ``func``, ``table``, ``memory``, ``global``, ``tag``)."""

    custom: tuple[tuple[str, bytes], ...]
    exports: Mapping[str, str]

    def sections(self, name: str) -> list[bytes]:
        return [payload for n, payload in self.custom if n == name]


_EXPORT_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}


def _sections(data: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """(id, start of the section header, start of content, end of content) of each section."""
    if len(data) < 8 or bytes(data[:4]) != _MAGIC:
        raise ManifestError("not a WebAssembly module (no \\0asm header)")
    if bytes(data[4:8]) != _VERSION:
        raise ManifestError(
            f"unsupported WebAssembly binary version {bytes(data[4:8]).hex()} (expected 01000000)"
        )
    pos, end = 8, len(data)
    while pos < end:
        head = pos
        sid = data[pos]
        size, pos = _leb_u32(data, pos + 1, end, "section size")
        if size > end - pos:
            raise ManifestError(
                f"section {sid} at byte {head} claims {size} bytes; only {end - pos} remain"
            )
        yield sid, head, pos, pos + size
        pos += size


def read_module(data: bytes) -> Module:
    """The custom sections and exports of a wasm binary, from its section headers only.
    Raises :class:`ManifestError` on a malformed header or section."""
    view = memoryview(data)
    custom: list[tuple[str, bytes]] = []
    exports: dict[str, str] = {}
    for sid, _head, start, end in _sections(view):
        if sid == 0:
            name, pos = _name(view, start, end, "custom section name")
            custom.append((name, bytes(view[pos:end])))
        elif sid == 7:
            count, pos = _leb_u32(view, start, end, "export count")
            for _ in range(count):
                ename, pos = _name(view, pos, end, "export name")
                if pos >= end:
                    raise ManifestError(f"truncated export {ename!r}")
                kind = _EXPORT_KINDS.get(view[pos], f"kind {view[pos]}")
                _index, pos = _leb_u32(view, pos + 1, end, "export index")
                exports[ename] = kind
    return Module(tuple(custom), exports)


def _leb_encode(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def custom_section(name: str, payload: bytes) -> bytes:
    """The bytes of one custom section."""
    raw = name.encode("utf-8")
    body = _leb_encode(len(raw)) + raw + payload
    return b"\0" + _leb_encode(len(body)) + body


def remove_section(data: bytes, name: str) -> bytes:
    """``data`` without the custom sections called ``name``."""
    view = memoryview(data)
    kept = bytearray(data[:8])
    for sid, head, start, end in _sections(view):
        if sid == 0 and _name(view, start, end, "custom section name")[0] == name:
            continue
        kept += view[head:end]
    return bytes(kept)


def embed_section(data: bytes, name: str, payload: bytes) -> bytes:
    """``data`` with every custom section called ``name`` removed and one with ``payload``
    appended (custom sections may stand anywhere; engines ignore them)."""
    return remove_section(data, name) + custom_section(name, payload)


# --- the manifest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A plugin's manifest (docs/plugin-abi.md, "Manifest")."""

    name: str
    version: str
    abi: int
    kinds: tuple[str, ...]
    description: str
    license: str
    config: Mapping[str, Any]  # a JSON Schema (subset) for the plugin's ``config`` table
    example: str = ""  # a TOML example of the plugin's tables
    homepage: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "manifest": FORMAT,
            "name": self.name,
            "version": self.version,
            "abi": self.abi,
            "kind": self.kinds[0] if len(self.kinds) == 1 else list(self.kinds),
            "description": self.description,
            "license": self.license,
            "config": self.config,
        }
        if self.example:
            out["example"] = self.example
        if self.homepage:
            out["homepage"] = self.homepage
        return out

    def encode(self) -> bytes:
        """The section payload: compact JSON, keys in a fixed order (builds are reproducible)."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode()


_MANIFEST_KEYS = (
    *("manifest", "name", "version", "abi", "kind", "description", "license", "config"),
    *("example", "homepage"),
)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"? ' if close else ""


def manifest_from_data(data: Mapping[str, Any]) -> Manifest:
    """A :class:`Manifest` from decoded JSON (or TOML) data; every problem in one error."""
    problems: list[str] = []
    for key in data:
        if key not in _MANIFEST_KEYS:
            problems.append(
                f'unknown key "{key}"; {_suggest(key, _MANIFEST_KEYS)}'
                f"keys: {', '.join(_MANIFEST_KEYS)}"
            )
    fmt = data.get("manifest", FORMAT)
    if fmt != FORMAT:
        problems.append(f"manifest format {fmt!r} is not supported (this flux-edge reads {FORMAT})")

    def text(key: str, required: bool = True) -> str:
        value = data.get(key)
        if value is None:
            if required:
                problems.append(f"{key} is missing")
            return ""
        if not isinstance(value, str):
            problems.append(f"{key} must be a string, got {_got(value)}")
            return ""
        return value

    name = text("name")
    if name and not _NAME.fullmatch(name):
        problems.append(
            f"name {name!r} must be 1-64 characters of a-z, 0-9 and _, starting with a letter"
        )
    version = text("version")
    if version and not _SEMVER.fullmatch(version):
        problems.append(f"version {version!r} is not a semantic version like 1.2.0")
    abi = data.get("abi")
    if abi is None:
        problems.append("abi is missing")
        abi = 0
    elif isinstance(abi, bool) or not isinstance(abi, int):
        problems.append(f"abi must be an integer, got {_got(abi)}")
        abi = 0
    raw_kind = data.get("kind")
    kinds: tuple[str, ...] = ()
    if isinstance(raw_kind, str):
        kinds = (raw_kind,)
    elif isinstance(raw_kind, list) and raw_kind and all(isinstance(k, str) for k in raw_kind):
        kinds = tuple(raw_kind)
    else:
        problems.append(f'kind must be "decode", "action" or a list of both, got {_got(raw_kind)}')
    for k in kinds:
        if k not in KINDS:
            problems.append(f'kind "{k}" is unknown; {_suggest(k, KINDS)}kinds: decode, action')
    if len(set(kinds)) != len(kinds):
        problems.append("kind lists a kind twice")
    description = text("description")
    license_ = text("license")
    example = text("example", required=False)
    homepage = text("homepage", required=False)
    config = data.get("config", {"type": "object", "properties": {}})
    if not isinstance(config, Mapping):
        problems.append(f"config must be a JSON Schema object, got {_got(config)}")
        config = {}
    else:
        problems += [f"config{_fmt(p)}: {m}" for p, m in check_schema(config)]
        if config.get("type", "object") != "object":
            problems.append('config: the schema of a config table has type "object"')
    if problems:
        raise ManifestError("invalid manifest: " + "; ".join(problems))
    return Manifest(
        name=name,
        version=version,
        abi=abi,
        kinds=kinds,
        description=description,
        license=license_,
        config=config,
        example=example,
        homepage=homepage,
        raw=dict(data),
    )


def parse_manifest(payload: bytes) -> Manifest:
    """The manifest in a ``flux.manifest`` section's payload."""
    if len(payload) > _MAX_MANIFEST:
        raise ManifestError(f"the manifest is {len(payload)} bytes; at most {_MAX_MANIFEST}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"the manifest is not UTF-8 (byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"the manifest is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"the manifest must be a JSON object, got {_got(data)}")
    return manifest_from_data(data)


def manifest_of(data: bytes) -> Manifest | None:
    """The manifest of a wasm binary; ``None`` when it has none. Raises :class:`ManifestError`
    for a malformed module or manifest, or two manifest sections."""
    found = read_module(data).sections(SECTION)
    if not found:
        return None
    if len(found) > 1:
        raise ManifestError(f"the module has {len(found)} {SECTION} sections; expected one")
    return parse_manifest(found[0])


def read_manifest(path: Path) -> Manifest | None:
    """The manifest of the .wasm file at ``path`` (see :func:`manifest_of`); the error names the
    file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return manifest_of(data)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc


def check_exports(manifest: Manifest, module: Module) -> list[str]:
    """Where the manifest's kinds disagree with the module's exports."""
    problems = []
    for kind, export in KIND_EXPORTS.items():
        has = module.exports.get(export) == "func"
        if kind in manifest.kinds and not has:
            problems.append(f'the manifest says kind "{kind}" but the module has no {export}')
        elif kind not in manifest.kinds and has:
            problems.append(f'the module exports {export} but the manifest lacks kind "{kind}"')
    return problems


# --- the config schema ----------------------------------------------------------------------------

PathPart = str | int
SchemaPath = tuple[PathPart, ...]

_TYPES = ("string", "integer", "number", "boolean", "array", "object", "null")
_ANNOTATIONS = ("description", "default", "examples", "title")
_KEYWORDS = (
    *("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
    *("minLength", "maxLength", "minItems", "maxItems", "items", "properties", "required"),
    *("additionalProperties", *_ANNOTATIONS),
)


def _fmt(path: SchemaPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def check_schema(schema: Mapping[str, Any], path: SchemaPath = ()) -> list[tuple[SchemaPath, str]]:
    """Problems in a schema: keywords outside the subset, wrong types of keyword values, a
    default that its own schema refuses."""
    out: list[tuple[SchemaPath, str]] = []
    for key in schema:
        if key not in _KEYWORDS:
            hint = _suggest(key, _KEYWORDS)
            listed = ", ".join(_KEYWORDS)
            out.append((path, f'keyword "{key}" is not supported; {hint}supported: {listed}'))
    types = _types(schema)
    if types is None:
        out.append((path, f"type must be one of {', '.join(_TYPES)} or a list of them"))
    enum = schema.get("enum")
    if enum is not None and (not isinstance(enum, list) or not enum):
        out.append((path, "enum must be a non-empty list"))
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = schema.get(key)
        if value is not None and not _is_number(value):
            out.append((path, f"{key} must be a number"))
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        value = schema.get(key)
        bad = not isinstance(value, int) or isinstance(value, bool) or value < 0
        if value is not None and bad:
            out.append((path, f"{key} must be a non-negative integer"))
    desc = schema.get("description")
    if desc is not None and not isinstance(desc, str):
        out.append((path, "description must be a string"))
    items = schema.get("items")
    if items is not None:
        if isinstance(items, Mapping):
            out += check_schema(items, (*path, "items"))
        else:
            out.append((path, "items must be a schema (an object)"))
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, Mapping):
            out.append((path, "properties must be an object of schemas"))
        else:
            for name, sub in props.items():
                if isinstance(sub, Mapping):
                    out += check_schema(sub, (*path, "properties", name))
                else:
                    out.append(((*path, "properties", name), "must be a schema (an object)"))
    required = schema.get("required")
    if required is not None:
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            out.append((path, "required must be a list of property names"))
        elif isinstance(props, Mapping):
            for r in required:
                if r not in props:
                    out.append((path, f'required names "{r}", which is not in properties'))
    extra = schema.get("additionalProperties")
    if extra is not None and not isinstance(extra, bool):
        if isinstance(extra, Mapping):
            out += check_schema(extra, (*path, "additionalProperties"))
        else:
            out.append((path, "additionalProperties must be true, false or a schema"))
    if "default" in schema and not out:
        refused = validate_config(schema, schema["default"])
        if refused:
            out.append((path, f"the default is refused by its own schema: {refused[0].message}"))
    return out


def _types(schema: Mapping[str, Any]) -> tuple[str, ...] | None:
    tp = schema.get("type")
    if tp is None:
        return ()
    if isinstance(tp, str):
        tp = [tp]
    if not isinstance(tp, list) or not tp:
        return None
    if not all(isinstance(t, str) and t in _TYPES for t in tp):
        return None
    return tuple(tp)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_type(value: object, tp: str) -> bool:
    if tp == "string":
        return isinstance(value, str)
    if tp == "boolean":
        return isinstance(value, bool)
    if tp == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer()
        )
    if tp == "number":
        return _is_number(value) and not (isinstance(value, float) and not math.isfinite(value))
    if tp == "array":
        return isinstance(value, list | tuple)
    if tp == "object":
        return isinstance(value, Mapping)
    return value is None  # "null"


_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "an array",
    "object": "a table",
    "null": "null",
}


def _got(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return json.dumps(shown, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else repr(value)


def _same(a: object, b: object) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a plugin's config: the key path below the ``config`` table, what is
    wrong, and whether it points at the key (an unknown key) or at the value."""

    path: SchemaPath
    message: str
    at: Literal["key", "value"] = "value"

    def __str__(self) -> str:
        where = _fmt(self.path).lstrip(".")
        return f"{where}: {self.message}" if where else self.message


def validate_config(schema: Mapping[str, Any], value: object) -> list[ConfigIssue]:
    """Every problem of ``value`` (a plugin's ``config`` table as loaded from TOML) against
    ``schema`` (a schema :func:`check_schema` accepts), in document order. Unknown keys are
    refused unless ``additionalProperties`` allows them, with a did-you-mean hint."""
    out: list[ConfigIssue] = []
    _validate(schema, value, (), out, 0)
    return out


def _validate(
    schema: Mapping[str, Any], value: object, path: SchemaPath, out: list[ConfigIssue], depth: int
) -> None:
    if depth > 64:
        out.append(ConfigIssue(path, "values are nested too deeply"))
        return
    types = _types(schema) or ()
    if types and not any(_is_type(value, t) for t in types):
        want = " or ".join(_TYPE_WORDS[t] for t in types)
        out.append(ConfigIssue(path, f"expected {want}, got {_got(value)}"))
        return
    enum = schema.get("enum")
    if isinstance(enum, list) and not any(_same(value, e) for e in enum):
        listed = ", ".join(_got(e) for e in enum)
        hint = ""
        if isinstance(value, str):
            hint = _suggest(value, [e for e in enum if isinstance(e, str)])
        out.append(ConfigIssue(path, f"{_got(value)} is not allowed; {hint}choose one of {listed}"))
        return
    if _is_number(value):
        _range(schema, float(value), path, out)  # type: ignore[arg-type]
    if isinstance(value, str):
        _length(schema, len(value), ("character", "minLength", "maxLength"), path, out)
    if isinstance(value, list | tuple):
        _length(schema, len(value), ("element", "minItems", "maxItems"), path, out)
        items = schema.get("items")
        if isinstance(items, Mapping):
            for i, item in enumerate(value):
                _validate(items, item, (*path, i), out, depth + 1)
    if isinstance(value, Mapping):
        _object(schema, value, path, out, depth)


def _range(schema: Mapping[str, Any], x: float, path: SchemaPath, out: list[ConfigIssue]) -> None:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    bounds = []
    if lo is not None:
        bounds.append(f">= {_num(lo)}")
    if xlo is not None:
        bounds.append(f"> {_num(xlo)}")
    if hi is not None:
        bounds.append(f"<= {_num(hi)}")
    if xhi is not None:
        bounds.append(f"< {_num(xhi)}")
    if (
        (lo is not None and x < lo)
        or (hi is not None and x > hi)
        or (xlo is not None and x <= xlo)
        or (xhi is not None and x >= xhi)
    ):
        out.append(ConfigIssue(path, f"{_num(x)} is out of range: must be {' and '.join(bounds)}"))


def _length(
    schema: Mapping[str, Any],
    n: int,
    what: tuple[str, str, str],
    path: SchemaPath,
    out: list[ConfigIssue],
) -> None:
    unit, lo_key, hi_key = what
    lo, hi = schema.get(lo_key), schema.get(hi_key)
    if lo is not None and n < lo:
        need = "it must not be empty" if lo == 1 else f"at least {lo} {unit}s are needed"
        out.append(ConfigIssue(path, f"{n} {unit}(s): {need}"))
    if hi is not None and n > hi:
        out.append(ConfigIssue(path, f"{n} {unit}(s): at most {hi} are allowed"))


def _object(
    schema: Mapping[str, Any],
    value: Mapping[Any, Any],
    path: SchemaPath,
    out: list[ConfigIssue],
    depth: int,
) -> None:
    props: Mapping[str, Any] = schema.get("properties") or {}
    # no "properties": any table; with them, unknown keys are refused unless allowed
    extra = schema.get("additionalProperties", "properties" not in schema)
    names = sorted(props)
    for key, item in value.items():
        sub = props.get(key)
        if sub is not None:
            _validate(sub, item, (*path, key), out, depth + 1)
        elif isinstance(extra, Mapping):
            _validate(extra, item, (*path, key), out, depth + 1)
        elif extra is False:
            known = f"known keys: {', '.join(names)}" if names else "this table takes no keys"
            out.append(
                ConfigIssue(
                    (*path, str(key)),
                    f'unknown key "{key}"; {_suggest(str(key), names)}{known}',
                    at="key",
                )
            )
    for key in schema.get("required") or ():
        if key not in value:
            desc = props.get(key, {}).get("description", "")
            why = f" ({desc})" if desc else ""
            at: Literal["key", "value"] = "key" if path else "value"
            out.append(ConfigIssue(path, f'"{key}" is required{why}', at=at))
