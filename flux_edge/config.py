"""TOML configuration -> typed, frozen config. The ONE place config is validated.

Schema (the Structs below) is the contract the rest of the daemon reads. Durations are given in
TOML as strings ("50ms", "1s", "2m", "1h", "1h30m") or numbers of seconds and stored as float
seconds; sizes as "16MiB"/"512KiB"/"1GB" or a number of bytes and stored as int bytes.

Loading happens in three passes, each collecting *every* problem it finds (docs/configuration.md):

1. syntax: tomlkit parses the text; a syntax error is reported with its line and column;
2. schema: the whole document is walked against the Structs (unknown keys with a suggestion,
   types deep in lists, missing keys, durations, sizes, ranges), each problem placed at the line
   and column of the offending key or value by a small position scanner (``_Scanner``), since
   tomlkit does not expose positions;
3. references: chains name plugins, plugin files exist, actions name sources, rules name actions,
   and rule conditions type-check (``flux_edge.rules.engine.check_rules``).

Public API: ``load_config``, ``load_config_text``, ``check_config``, ``check_config_text``,
``resolve_plugin_path``, ``plugin_search_paths``, ``bundled_plugin_dir``, ``parse_duration``,
``parse_size``.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import importlib
import logging
import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import msgspec
import tomlkit
import tomlkit.exceptions

from flux_edge.errors import ConfigError, FluxError, Problem

RegisterFunction = Literal["coil", "discrete", "holding", "input"]
RegisterType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32"]
Order = Literal["big", "little"]


class _S(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class DaemonConfig(_S, frozen=True):
    name: str = ""  # gateway id; default: the host name
    state_dir: str = "/var/lib/flux-edge"  # plugin cache lives in state_dir/cache
    plugin_dirs: tuple[str, ...] = ("plugins",)  # searched for <module>.wasm, relative to config
    queue_size: int = 10000  # capacity of each queue between stages
    batch_max: int = 256  # most messages per plugin call
    log_level: str = "info"


class PluginConfig(_S, frozen=True):
    module: str = ""  # looked up as <module>.wasm in plugin_dirs, then bundled; default: table name
    file: str = ""  # explicit .wasm path (relative to the config file); excludes ``module``
    timeout: float = 0.05  # wall time per call, seconds
    memory_limit: int = 16 * 1024 * 1024  # bytes of linear memory
    max_failures: int = 3  # consecutive failed calls before quarantine
    quarantine: float = 60.0  # seconds a quarantined plugin is left alone before a retry
    wasi: bool = False  # grant WASI (no preopened dirs, no env, no args) when true
    config: dict[str, Any] = {}  # passed as JSON to the plugin's flux_init


class RegisterConfig(_S, frozen=True):
    name: str  # a CEL identifier: [A-Za-z_][A-Za-z0-9_]*
    address: int  # 0..65535
    function: RegisterFunction = "holding"
    type: RegisterType = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""


class ModbusTcpSource(_S, frozen=True, tag="modbus_tcp", tag_field="type"):
    host: str
    port: int = 502
    unit_id: int = 1
    interval: float = 1.0  # seconds between polls
    timeout: float = 1.0  # seconds per request
    device: str = ""  # device name for measurements; default: the source's table name
    chain: tuple[str, ...] = ()  # plugin names, applied in order
    max_gap: int = 8  # registers a coalesced read may skip over
    registers: tuple[RegisterConfig, ...] = ()


SourceConfig = ModbusTcpSource


class RuleConfig(_S, frozen=True):
    when: str  # CEL condition
    actions: tuple[str, ...]
    device: str = ""  # only this device's measurements trigger the rule; "" = any device
    mode: Literal["edge", "level"] = "edge"  # edge: fire once on becoming true
    inputs: dict[str, Literal["bool", "int", "double", "string"]] = {}  # extra variables' types
    description: str = ""


class ModbusWriteAction(_S, frozen=True, tag="modbus_write", tag_field="type"):
    source: str  # the modbus source whose connection and unit id are used
    address: int
    value: bool | int
    function: Literal["coil", "holding"] = "coil"
    verify: bool = True  # read back and compare
    timeout: float = 1.0


ActionConfig = ModbusWriteAction


class Config(_S, frozen=True):
    daemon: DaemonConfig = DaemonConfig()
    plugins: dict[str, PluginConfig] = {}
    sources: dict[str, SourceConfig] = {}
    rules: dict[str, RuleConfig] = {}
    actions: dict[str, ActionConfig] = {}
    # Set by the loader, not by the file:
    path: str = ""  # the file it was loaded from

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent if self.path else Path.cwd()


# =================================================================================================
# Loader. Everything below turns text into the Structs above, or into a list of Problems.
# =================================================================================================

_log = logging.getLogger(__name__)

Key = tuple[str | int, ...]  # a key path: ("sources", "boiler", "registers", 2, "type")

# --- durations and sizes ------------------------------------------------------------------------

DURATION_HELP = 'a duration: "50ms", "1s", "2m", "1h", "1h30m", "1d" or a number of seconds'
SIZE_HELP = 'a size: "512KiB", "16MiB", "1GB" or a number of bytes'

_DURATION_UNITS: dict[str, Decimal] = {
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
_DURATION_RANK = {unit: rank for rank, unit in enumerate(_DURATION_UNITS)}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_PLAIN_NUMBER = re.compile(rf"[+-]?{_NUMBER}")

_SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_SIZE_RE = re.compile(rf"({_NUMBER}) ?([A-Za-z]+)")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_duration(value: str | int | float) -> float:
    """A duration in seconds: ``"50ms"``, ``"1s"``, ``"2m"``, ``"1h"``, ``"1h30m"``, ``"1d"``,
    ``"0.5s"``, or a number of seconds (int or float).

    Units go from largest to smallest, each at most once. Zero is accepted (callers check their own
    lower bound); negative, infinite or NaN values are not. Raises ``ValueError`` saying what is
    wrong and what is expected.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {DURATION_HELP}, got {_got(value)}")
    if not isinstance(value, str):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number of seconds, got {value}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return float(value)
    text = value
    if _PLAIN_NUMBER.fullmatch(text):
        raise ValueError(
            f'{_got(text)} has no unit: write {text.lstrip("+")} (a number of seconds) or "{text}s"'
        )
    if text.startswith("-"):
        raise ValueError(f"a duration cannot be negative, got {_got(text)}")
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"{_got(text)} is not {DURATION_HELP}")
    total = Decimal(0)
    last_rank = -1
    for match in _DURATION_PART.finditer(text):
        number, unit = match.group(1), match.group(2)
        rank = _DURATION_RANK[unit]
        if rank <= last_rank:
            raise ValueError(
                f'{_got(text)}: units must go from largest to smallest, each once (like "1h30m")'
            )
        last_rank = rank
        total += Decimal(number) * _DURATION_UNITS[unit]
    seconds = float(total)
    if not math.isfinite(seconds):
        raise ValueError(f"{_got(text)} is too long a duration")
    return seconds


def parse_size(value: str | int | float) -> int:
    """A size in bytes: ``"512KiB"``, ``"16MiB"``, ``"1GB"``, ``"1.5 MiB"``, ``"100B"`` or a number
    of bytes. Units: B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024).
    The result must be a whole number of bytes, zero or more. Raises ``ValueError``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {SIZE_HELP}, got {_got(value)}")
    if not isinstance(value, str):
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"a size must be a whole number of bytes, got {value}")
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return int(value)
    text = value
    if _PLAIN_NUMBER.fullmatch(text):
        raise ValueError(f'{_got(text)} has no unit: write {text} (a number of bytes) or "{text}B"')
    if text.startswith("-"):
        raise ValueError(f"a size cannot be negative, got {_got(text)}")
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise ValueError(f"{_got(text)} is not {SIZE_HELP}")
    number, unit = match.group(1), match.group(2)
    if unit not in _SIZE_UNITS:
        folded = {u.lower(): u for u in _SIZE_UNITS}
        hint = folded.get(unit.lower()) or folded.get(unit.lower() + "b")
        units = ", ".join(_SIZE_UNITS)
        did = f'; did you mean "{number}{hint}"?' if hint else ""
        raise ValueError(f'{_got(text)}: unknown unit "{unit}" (units: {units}){did}')
    total = Decimal(number) * _SIZE_UNITS[unit]
    if total != total.to_integral_value():
        raise ValueError(f"{_got(text)} is not a whole number of bytes ({total})")
    return int(total)


# --- names --------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
_NAME_HELP = "1-64 letters, digits, '_' or '-' (no dots, slashes or spaces)"
_CEL_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CEL_RESERVED = frozenset(
    {
        *("true", "false", "null", "in", "as", "break", "const", "continue", "else", "for"),
        *("function", "if", "import", "let", "loop", "package", "namespace", "return", "var"),
        *("void", "while"),
    }
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _check_name(value: str) -> str | None:
    if _NAME_RE.fullmatch(value):
        return None
    return f"{_got(value)} is not a valid name: use {_NAME_HELP}"


def _check_cel_ident(value: str) -> str | None:
    if not _CEL_IDENT.fullmatch(value):
        return (
            f"{_got(value)} is not usable as a rule variable: a name is a letter or '_' "
            "followed by letters, digits or '_' ([A-Za-z_][A-Za-z0-9_]*)"
        )
    if value in _CEL_RESERVED:
        return f"{_got(value)} is a reserved word in rule conditions: pick another name"
    return None


def _check_module(value: str) -> str | None:
    if "/" in value or "\\" in value:
        return f'{_got(value)}: "module" is a name looked up in plugin_dirs; use "file" for a path'
    if value.endswith(".wasm"):
        return f'{_got(value)}: give the module name without ".wasm" ("{value[:-5]}")'
    return None


def _check_host(value: str) -> str | None:
    if any(ch.isspace() for ch in value):
        return f"{_got(value)} is not a host name or IP address"
    return None


# --- per-field rules the types alone do not say ---------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """Extra validation for one field (arrays: for each item; tables: ``keys`` for the names)."""

    kind: Literal["", "duration", "size"] = ""
    min: float | None = None  # inclusive
    max: float | None = None  # inclusive
    positive: bool = False  # strictly greater than zero
    nonempty: bool = False
    choices: tuple[str, ...] = ()
    check: Callable[[str], str | None] | None = None  # for non-empty strings
    keys: Callable[[str], str | None] | None = None  # for the keys of a table
    help: str = ""  # what is expected, for messages about a missing key


_RULES: dict[tuple[type, str], _Rule] = {
    (DaemonConfig, "name"): _Rule(check=_check_name),
    (DaemonConfig, "state_dir"): _Rule(nonempty=True),
    (DaemonConfig, "plugin_dirs"): _Rule(nonempty=True),
    (DaemonConfig, "queue_size"): _Rule(min=1, max=10_000_000),
    (DaemonConfig, "batch_max"): _Rule(min=1, max=65_536),
    (DaemonConfig, "log_level"): _Rule(choices=_LOG_LEVELS),
    (PluginConfig, "module"): _Rule(check=_check_module),
    (PluginConfig, "timeout"): _Rule(kind="duration", positive=True, max=3600),
    (PluginConfig, "memory_limit"): _Rule(kind="size", min=64 * 1024, max=2**30),
    (PluginConfig, "max_failures"): _Rule(min=1, max=1_000_000),
    (PluginConfig, "quarantine"): _Rule(kind="duration", min=0),
    (RegisterConfig, "name"): _Rule(nonempty=True, check=_check_cel_ident),
    (RegisterConfig, "address"): _Rule(min=0, max=65535),
    (ModbusTcpSource, "host"): _Rule(nonempty=True, check=_check_host),
    (ModbusTcpSource, "port"): _Rule(min=1, max=65535),
    (ModbusTcpSource, "unit_id"): _Rule(min=0, max=247),
    (ModbusTcpSource, "interval"): _Rule(kind="duration", positive=True),
    (ModbusTcpSource, "timeout"): _Rule(kind="duration", positive=True),
    (ModbusTcpSource, "device"): _Rule(check=_check_name),
    (ModbusTcpSource, "max_gap"): _Rule(min=0, max=123),
    (ModbusTcpSource, "chain"): _Rule(nonempty=True),
    (RuleConfig, "when"): _Rule(nonempty=True),
    (RuleConfig, "actions"): _Rule(nonempty=True),
    (RuleConfig, "inputs"): _Rule(keys=_check_cel_ident),
    (ModbusWriteAction, "source"): _Rule(nonempty=True),
    (ModbusWriteAction, "address"): _Rule(min=0, max=65535),
    (ModbusWriteAction, "timeout"): _Rule(kind="duration", positive=True),
    (Config, "plugins"): _Rule(keys=_check_name),
    (Config, "sources"): _Rule(keys=_check_name),
    (Config, "rules"): _Rule(keys=_check_name),
    (Config, "actions"): _Rule(keys=_check_name),
}

# Fields the loader sets; a file may not.
_LOADER_ONLY: frozenset[tuple[type, str]] = frozenset({(Config, "path")})

_WIDE_TYPES = frozenset({"int32", "uint32", "float32"})
_BIT_FUNCTIONS = frozenset({"coil", "discrete"})

# --- describing values --------------------------------------------------------------------------


def _got(value: object) -> str:
    """A short rendering of a TOML value for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return msgspec.json.encode(shown).decode()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__


def _desc(tp: Any, rule: _Rule | None = None) -> str:
    """What a value of type ``tp`` looks like, for messages."""
    if rule is not None and rule.kind == "duration":
        return DURATION_HELP
    if rule is not None and rule.kind == "size":
        return SIZE_HELP
    if rule is not None and rule.choices:
        return "one of " + ", ".join(rule.choices)
    origin = get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin is tuple:
        return "an array of " + _plural(_desc(get_args(tp)[0]))
    if origin is dict:
        return "a table"
    if origin is Union or _is_union(tp):
        return " or ".join(_desc(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return "a table"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(tp, str(tp))


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _plural(desc: str) -> str:
    for article in ("a ", "an "):
        if desc.startswith(article):
            return desc[len(article) :] + "s"
    return desc


def _is_union(tp: Any) -> bool:
    return isinstance(tp, types.UnionType)


def _fmt_path(path: Key) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else msgspec.json.encode(part).decode()
            out += ("." if out else "") + key
    return out


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"? ' if close else ""


# --- positions: where each key and value sits in the text ---------------------------------------


class _ScanError(Exception):
    """The scanner met text it does not understand (positions then fall back to enclosing ones)."""


class _Positions:
    """Offsets of keys and values in the source text, by key path.

    ``keys[path]`` is where the key (or table header name) defining ``path`` starts;
    ``values[path]`` the start and end of its value. Table headers, array-of-tables entries
    (``[[a.b]]`` counted per array), dotted keys, inline tables and arrays are all recorded.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.keys: dict[Key, int] = {}
        self.values: dict[Key, tuple[int, int]] = {}
        self.duplicate: int | None = None  # offset of the first key defined twice
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def linecol(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def _nearest(self, path: Key) -> int | None:
        for n in range(len(path), 0, -1):
            off = self.keys.get(path[:n])
            if off is not None:
                return off
        return None

    def key(self, path: Key) -> tuple[int, int]:
        """(line, column) of the key for ``path``, or of its nearest enclosing key; (0, 0)."""
        off = self._nearest(path)
        return self.linecol(off) if off is not None else (0, 0)

    def value(self, path: Key) -> tuple[int, int]:
        """(line, column) of the value for ``path``, else as ``key``."""
        span = self.values.get(path)
        if span is not None:
            return self.linecol(span[0])
        return self.key(path)

    def in_string(self, path: Key, index: int) -> tuple[int, int] | None:
        """(line, column) of the 0-based character ``index`` inside the string value at ``path``.

        Exact for strings without escapes; otherwise close to it.
        """
        span = self.values.get(path)
        if span is None:
            return None
        start, end = span
        raw = self.text[start:end]
        if raw[:3] in ('"""', "'''"):
            inner = start + 3
            if self.text.startswith("\r\n", inner):
                inner += 2
            elif self.text.startswith("\n", inner):
                inner += 1
        elif raw[:1] in ('"', "'"):
            inner = start + 1
        else:
            return None
        return self.linecol(max(start, min(inner + index, end - 1)))


_BARE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SIMPLE_ESCAPES = {
    "b": "\b",
    "t": "\t",
    "n": "\n",
    "f": "\f",
    "r": "\r",
    "e": "\x1b",
    '"': '"',
    "\\": "\\",
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


class _Scanner:
    """A position-recording walk over TOML text that tomlkit has already accepted (or that
    tomlkit rejected for a key defined twice, which this finds). Not a validator."""

    def __init__(self, text: str, positions: _Positions) -> None:
        self.t = text
        self.n = len(text)
        self.i = 0
        self.p = positions
        self.aot: dict[Key, int] = {}  # array-of-tables path -> entries so far
        self.assigned: set[Key] = set()  # paths given a value by `key = value`
        self.explicit: set[Key] = set()  # tables opened by a header (and [[ ]] entries)
        self.dotted: set[Key] = set()  # tables made by dotted keys

    # characters
    def ch(self, k: int = 0) -> str:
        j = self.i + k
        return self.t[j] if j < self.n else ""

    def fail(self) -> _ScanError:
        return _ScanError(self.i)

    def ws(self) -> None:
        while self.ch() in (" ", "\t") and self.ch():
            self.i += 1

    def comment(self) -> None:
        if self.ch() == "#":
            while self.ch() not in ("", "\n"):
                self.i += 1

    def ws_nl(self) -> None:
        while True:
            self.ws()
            self.comment()
            if self.ch() == "\n":
                self.i += 1
            elif self.ch() == "\r" and self.ch(1) == "\n":
                self.i += 2
            else:
                return

    def eol(self) -> None:
        self.ws()
        self.comment()
        if self.ch() == "":
            return
        if self.ch() == "\n":
            self.i += 1
        elif self.ch() == "\r" and self.ch(1) == "\n":
            self.i += 2
        else:
            raise self.fail()

    def dup(self, offset: int) -> None:
        if self.p.duplicate is None:
            self.p.duplicate = offset

    # document
    def run(self) -> None:
        table: Key = ()
        while True:
            self.ws_nl()
            if self.i >= self.n:
                return
            if self.ch() == "[":
                table = self.header()
            else:
                self.keyval(table)
            self.eol()

    def header(self) -> Key:
        is_aot = self.t.startswith("[[", self.i)
        self.i += 2 if is_aot else 1
        parts = self.key()
        closing = "]]" if is_aot else "]"
        if not self.t.startswith(closing, self.i):
            raise self.fail()
        self.i += len(closing)
        resolved: Key = ()
        for j, (name, off) in enumerate(parts):
            resolved = (*resolved, name)
            last = j == len(parts) - 1
            if resolved in self.assigned:
                self.dup(off)
            if last and is_aot:
                if resolved in self.explicit or resolved in self.dotted:
                    self.dup(off)
                count = self.aot.get(resolved, 0)
                self.aot[resolved] = count + 1
                self.p.keys.setdefault(resolved, off)
                resolved = (*resolved, count)
                self.explicit.add(resolved)
                self.p.keys[resolved] = off
            elif last:
                if resolved in self.aot:
                    self.dup(off)
                if resolved in self.explicit or resolved in self.dotted:
                    self.dup(off)
                self.explicit.add(resolved)
                self.p.keys[resolved] = off
            else:
                self.p.keys.setdefault(resolved, off)
                if resolved in self.aot:
                    resolved = (*resolved, self.aot[resolved] - 1)
        return resolved

    def key(self) -> list[tuple[str, int]]:
        parts: list[tuple[str, int]] = []
        while True:
            self.ws()
            start = self.i
            c = self.ch()
            if c == '"':
                name = self.basic_string()
            elif c == "'":
                name = self.literal_string()
            else:
                while self.ch() in _BARE_CHARS and self.ch():
                    self.i += 1
                if self.i == start:
                    raise self.fail()
                name = self.t[start : self.i]
            parts.append((name, start))
            self.ws()
            if self.ch() != ".":
                return parts
            self.i += 1

    def keyval(self, table: Key) -> None:
        parts = self.key()
        if self.ch() != "=":
            raise self.fail()
        self.i += 1
        self.ws()
        path = table
        for j, (name, off) in enumerate(parts):
            path = (*path, name)
            if path in self.assigned:
                self.dup(off)
            if j < len(parts) - 1:
                self.dotted.add(path)
                self.p.keys.setdefault(path, off)
            else:
                if path in self.explicit or path in self.dotted:
                    self.dup(off)
                self.p.keys.setdefault(path, off)
        self.value(path)
        self.assigned.add(path)

    # values
    def value(self, path: Key) -> None:
        start = self.i
        c = self.ch()
        if self.t.startswith('"""', self.i):
            self.multiline('"""')
        elif self.t.startswith("'''", self.i):
            self.multiline("'''")
        elif c == '"':
            self.basic_string()
        elif c == "'":
            self.literal_string()
        elif c == "[":
            self.array(path)
        elif c == "{":
            self.inline_table(path)
        else:
            while self.ch() not in ("", ",", "]", "}", "#", "\n", "\r"):
                self.i += 1
            end = self.i
            while end > start and self.t[end - 1] in " \t":
                end -= 1
            if end == start:
                raise self.fail()
            self.p.values[path] = (start, end)
            self.p.keys.setdefault(path, start)
            return
        self.p.values[path] = (start, self.i)
        self.p.keys.setdefault(path, start)

    def array(self, path: Key) -> None:
        self.i += 1
        index = 0
        while True:
            self.ws_nl()
            if self.ch() == "]":
                self.i += 1
                return
            self.value((*path, index))
            index += 1
            self.ws_nl()
            if self.ch() == ",":
                self.i += 1
            elif self.ch() == "]":
                self.i += 1
                return
            else:
                raise self.fail()

    def inline_table(self, path: Key) -> None:
        self.i += 1
        while True:
            self.ws_nl()
            if self.ch() == "}":
                self.i += 1
                return
            self.keyval(path)
            self.ws_nl()
            if self.ch() == ",":
                self.i += 1
            elif self.ch() == "}":
                self.i += 1
                return
            else:
                raise self.fail()

    def basic_string(self) -> str:
        self.i += 1
        out: list[str] = []
        while True:
            c = self.ch()
            if c in ("", "\n"):
                raise self.fail()
            self.i += 1
            if c == '"':
                return "".join(out)
            if c != "\\":
                out.append(c)
                continue
            e = self.ch()
            self.i += 1
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
            elif e in _HEX_ESCAPES:
                digits = self.t[self.i : self.i + _HEX_ESCAPES[e]]
                self.i += _HEX_ESCAPES[e]
                try:
                    out.append(chr(int(digits, 16)))
                except (ValueError, OverflowError) as exc:
                    raise self.fail() from exc
            else:
                raise self.fail()

    def literal_string(self) -> str:
        self.i += 1
        start = self.i
        while self.ch() != "'":
            if self.ch() in ("", "\n"):
                raise self.fail()
            self.i += 1
        self.i += 1
        return self.t[start : self.i - 1]

    def multiline(self, delim: str) -> None:
        self.i += 3
        while True:
            if self.i >= self.n:
                raise self.fail()
            if self.t.startswith(delim, self.i):
                self.i += 3
                extra = 0
                while self.ch() == delim[0] and extra < 2:
                    self.i += 1
                    extra += 1
                return
            if delim == '"""' and self.ch() == "\\":
                self.i += 2
            else:
                self.i += 1


def _scan(text: str) -> _Positions:
    positions = _Positions(text)
    # On a failure what was recorded so far stays usable; the rest falls back to enclosing keys.
    with contextlib.suppress(_ScanError, RecursionError):
        _Scanner(text, positions).run()
    return positions


# --- schema validation --------------------------------------------------------------------------

_BAD: Any = object()  # "this value was rejected" (a Problem has been recorded)


class _Validator:
    """Walks the document against the Structs, collecting every problem.

    Returns plain data (lists, dicts, scalars, durations as float seconds, sizes as int bytes) in
    which rejected values are left out, so later passes can still look at the valid parts.
    """

    def __init__(self, file: str, positions: _Positions) -> None:
        self.file = file
        self.pos = positions
        self.problems: list[Problem] = []
        self.dirty: set[Key] = set()

    @property
    def errors(self) -> int:
        return sum(1 for p in self.problems if p.severity == "error")

    def report(
        self,
        path: Key,
        message: str,
        *,
        at: Literal["key", "value"] = "value",
        where: Key | None = None,
        warning: bool = False,
    ) -> None:
        loc = path if where is None else where
        line, column = self.pos.key(loc) if at == "key" else self.pos.value(loc)
        severity = "warning" if warning else "error"
        self.problems.append(Problem(self.file, _fmt_path(path), message, line, column, severity))
        if not warning:
            self.dirty.add(path)

    def clean(self, path: Key) -> bool:
        n = len(path)
        return not any(d[:n] == path for d in self.dirty)

    # one value against one type
    def check(self, value: Any, tp: Any, path: Key, rule: _Rule | None = None) -> Any:
        if rule is not None and rule.kind:
            return self._measure(value, path, rule)
        origin = get_origin(tp)
        if tp is Any:
            self._jsonable(value, path)
            return value
        if origin is Literal:
            return self._literal(value, get_args(tp), path)
        if origin is tuple:
            return self._array(value, get_args(tp)[0], path, rule)
        if origin is dict:
            return self._table(value, get_args(tp)[1], path, rule)
        if origin is Union or _is_union(tp):
            for alternative in get_args(tp):
                if self._is(value, alternative):
                    return self.check(value, alternative, path, rule)
            self.report(path, f"expected {_desc(tp)}, got {_got(value)}")
            return _BAD
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            return self._struct(value, tp, path)
        if not self._is(value, tp):
            self.report(path, f"expected {_desc(tp, rule)}, got {_got(value)}")
            return _BAD
        if tp is float:
            value = float(value)
            if not math.isfinite(value):
                self.report(path, f"expected a finite number, got {value}")
                return _BAD
        if rule is not None and not self._apply(value, path, rule):
            return _BAD
        return value

    @staticmethod
    def _is(value: Any, tp: Any) -> bool:
        if tp is bool:
            return isinstance(value, bool)
        if tp is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if tp is float:
            return _is_number(value)
        if tp is str:
            return isinstance(value, str)
        return False

    def _apply(self, value: Any, path: Key, rule: _Rule) -> bool:
        """Range, choice and name rules on an already well-typed value."""
        message = None
        if isinstance(value, str):
            if rule.nonempty and not value:
                message = "must not be empty"
            elif rule.choices and value not in rule.choices:
                hint = _suggest(value, rule.choices).strip()
                message = f"expected one of {', '.join(rule.choices)}, got {_got(value)}"
                message += f"; {hint}" if hint else ""
            elif rule.check is not None and value:
                message = rule.check(value)
        elif _is_number(value):
            if rule.positive and value <= 0:
                message = f"must be greater than 0, got {_got(value)}"
            elif (
                rule.min is not None
                and rule.max is not None
                and not (rule.min <= value <= rule.max)
            ):
                message = (
                    f"must be between {_num(rule.min)} and {_num(rule.max)}, got {_got(value)}"
                )
            elif rule.min is not None and value < rule.min:
                message = f"must be at least {_num(rule.min)}, got {_got(value)}"
            elif rule.max is not None and value > rule.max:
                message = f"must be at most {_num(rule.max)}, got {_got(value)}"
        if message:
            self.report(path, message)
            return False
        return True

    def _measure(self, value: Any, path: Key, rule: _Rule) -> Any:
        """A duration (-> float seconds) or a size (-> int bytes)."""
        try:
            result: float | int = (
                parse_duration(value) if rule.kind == "duration" else parse_size(value)
            )
        except ValueError as exc:
            self.report(path, str(exc))
            return _BAD
        except (InvalidOperation, OverflowError):
            self.report(path, f"expected {_desc(None, rule)}, got {_got(value)}")
            return _BAD
        unit = "s" if rule.kind == "duration" else " bytes"
        if rule.positive and result <= 0:
            self.report(path, f"must be greater than 0, got {_got(value)}")
            return _BAD
        if rule.min is not None and result < rule.min:
            self.report(path, f"must be at least {_num(rule.min)}{unit}, got {_got(value)}")
            return _BAD
        if rule.max is not None and result > rule.max:
            self.report(path, f"must be at most {_num(rule.max)}{unit}, got {_got(value)}")
            return _BAD
        return result

    def _literal(self, value: Any, choices: tuple[Any, ...], path: Key) -> Any:
        if isinstance(value, str) and value in choices:
            return value
        names = [str(c) for c in choices]
        hint = _suggest(value, names).strip() if isinstance(value, str) else ""
        got = f"expected one of {', '.join(names)}, got {_got(value)}"
        self.report(path, got + (f"; {hint}" if hint else ""))
        return _BAD

    def _array(self, value: Any, item: Any, path: Key, rule: _Rule | None) -> Any:
        if not isinstance(value, list):
            self.report(
                path, f"expected an array of {_plural(_desc(item, rule))}, got {_got(value)}"
            )
            return _BAD
        out = []
        for index, element in enumerate(value):
            checked = self.check(element, item, (*path, index), rule)
            if checked is not _BAD:
                out.append(checked)
        return out

    def _table(self, value: Any, item: Any, path: Key, rule: _Rule | None) -> Any:
        if not isinstance(value, dict):
            self.report(path, f"expected a table, got {_got(value)}")
            return _BAD
        out = {}
        for key, element in value.items():
            if rule is not None and rule.keys is not None:
                message = rule.keys(key)
                if message:
                    self.report((*path, key), message, at="key")
                    continue
            checked = self.check(element, item, (*path, key))
            if checked is not _BAD:
                out[key] = checked
        return out

    def _jsonable(self, value: Any, path: Key) -> None:
        """Plugin config goes to the guest as JSON: no dates, no inf/nan."""
        if isinstance(value, datetime | date | time):
            self.report(
                path,
                f"{_got(value)} cannot be passed to a plugin (its config is JSON): "
                "quote it as a string",
            )
        elif isinstance(value, float) and not math.isfinite(value):
            self.report(path, f"{value} cannot be passed to a plugin (its config is JSON)")
        elif isinstance(value, list):
            for index, element in enumerate(value):
                self._jsonable(element, (*path, index))
        elif isinstance(value, dict):
            for key, element in value.items():
                self._jsonable(element, (*path, key))

    def _struct(self, value: Any, cls: type[msgspec.Struct], path: Key) -> Any:
        if not isinstance(value, dict):
            self.report(path, f"expected a table, got {_got(value)}")
            return _BAD
        fields = {
            f.name: f for f in msgspec.structs.fields(cls) if (cls, f.name) not in _LOADER_ONLY
        }
        conf = cls.__struct_config__
        tag_field, tag = conf.tag_field, conf.tag
        allowed = list(fields) + ([tag_field] if tag_field else [])
        out: dict[str, Any] = {}
        before = self.errors
        for key, element in value.items():
            kpath = (*path, key)
            if tag_field is not None and key == tag_field:
                if element != tag:
                    hint = _suggest(element, [str(tag)]) if isinstance(element, str) else ""
                    self.report(
                        kpath, f"expected one of {tag}, got {_got(element)}; {hint}".rstrip("; ")
                    )
                continue
            field = fields.get(key)
            if field is None:
                self.report(
                    kpath,
                    f'unknown key "{key}"; {_suggest(key, allowed)}'
                    f"allowed here: {', '.join(allowed)}",
                    at="key",
                )
                continue
            checked = self.check(element, field.type, kpath, _RULES.get((cls, key)))
            if checked is not _BAD:
                out[key] = checked
        if tag_field is not None:
            if tag_field not in value:
                self.report(
                    (*path, tag_field),
                    f'missing required key "{tag_field}" (expected one of {tag})',
                    at="key",
                    where=path,
                )
            out[tag_field] = tag
        for field in fields.values():
            if field.required and field.name not in value:
                rule = _RULES.get((cls, field.name))
                self.report(
                    (*path, field.name),
                    f'missing required key "{field.name}" ({_desc(field.type, rule)})',
                    at="key",
                    where=path,
                )
        check = _STRUCT_CHECKS.get(cls)
        if check is not None:
            check(self, out, path, self.errors == before)
        return out


# --- checks that span several fields of one table ------------------------------------------------


def _register_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean:
        return
    function = out.get("function", "holding")
    if function in _BIT_FUNCTIONS:
        if "type" not in out:
            out["type"] = "bool"  # a coil or discrete input is one bit: bool unless told
        elif out["type"] != "bool":
            v.report(
                (*path, "type"),
                f'a {function} is a single bit: type must be "bool", got {_got(out["type"])}',
            )
            return
    words = 2 if out.get("type") in _WIDE_TYPES else 1
    if out["address"] + words - 1 > 65535:
        v.report(
            (*path, "address"),
            f"a {out['type']} takes 2 registers: address must be at most 65534",
        )


def _source_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    seen: dict[str, int] = {}
    registers = out.get("registers", [])
    for index, register in enumerate(registers):
        name = register.get("name") if isinstance(register, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            v.report(
                (*path, "registers", index, "name"),
                f'register name "{name}" is already used by registers[{seen[name]}]: '
                "names must be unique within a source",
            )
        else:
            seen[name] = index
    if clean and not registers:
        v.report(path, "this source has no registers: it will poll nothing", at="key", warning=True)


def _plugin_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if out.get("file") and out.get("module"):
        v.report(
            (*path, "file"),
            'give either "file" (a path) or "module" (a name looked up in plugin_dirs), not both',
        )


def _action_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean:
        return
    value = out["value"]
    if out.get("function", "coil") == "coil":
        if not isinstance(value, bool):
            v.report((*path, "value"), f"a coil takes true or false, got {_got(value)}")
    elif isinstance(value, bool) or not -32768 <= value <= 65535:
        v.report(
            (*path, "value"),
            "a holding register takes an integer from -32768 to 65535 (negative values are "
            f"written as 16-bit two's complement), got {_got(value)}",
        )


def _rule_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if clean and not out.get("actions"):
        v.report(
            (*path, "actions"), "this rule has no actions: it will never do anything", warning=True
        )


_STRUCT_CHECKS: dict[type, Callable[[_Validator, dict[str, Any], Key, bool], None]] = {
    RegisterConfig: _register_checks,
    ModbusTcpSource: _source_checks,
    PluginConfig: _plugin_checks,
    ModbusWriteAction: _action_checks,
    RuleConfig: _rule_checks,
}


# --- plugin files -------------------------------------------------------------------------------


def bundled_plugin_dir() -> Path:
    """Where the plugins shipped with flux-edge live (built by plugins/build-all.sh)."""
    return Path(__file__).resolve().parent / "plugins" / "bundled"


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
            return candidate
    message = _missing_wasm(name, config.plugins[name].file, candidates)
    raise ConfigError([Problem(config.path, _fmt_path(("plugins", name)), message)])


# --- references between tables ------------------------------------------------------------------


def _names(raw: dict[str, Any], section: str) -> list[str] | None:
    """The names declared in a top-level table, or None if it is not a table (already reported)."""
    table = raw.get(section, {})
    return list(table) if isinstance(table, dict) else None


def _missing_ref(kind: str, name: str, declared: list[str]) -> str:
    listed = ", ".join(declared) if declared else "none"
    return f'no {kind} named "{name}"; {_suggest(name, declared)}declared {kind}s: {listed}'


def _cross_check(v: _Validator, raw: dict[str, Any], data: dict[str, Any], base_dir: Path) -> None:
    plugins = _names(raw, "plugins")
    sources = _names(raw, "sources")
    actions = _names(raw, "actions")
    src_data: dict[str, Any] = data.get("sources", {})
    used_plugins: set[str] = set()

    for sname, src in src_data.items():
        for index, pname in enumerate(src.get("chain", [])):
            used_plugins.add(pname)
            if plugins is not None and pname not in plugins:
                v.report(("sources", sname, "chain", index), _missing_ref("plugin", pname, plugins))

    daemon = data.get("daemon", {})
    plugin_dirs = daemon.get("plugin_dirs", DaemonConfig().plugin_dirs)
    if not v.clean(("daemon", "plugin_dirs")):
        plugin_dirs = ()
    for pname, plugin in data.get("plugins", {}).items():
        path: Key = ("plugins", pname)
        if not (v.clean((*path, "file")) and v.clean((*path, "module"))):
            continue
        file, module = plugin.get("file", ""), plugin.get("module", "")
        candidates = _candidates(base_dir, plugin_dirs, pname, module, file)
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

    for aname, action in data.get("actions", {}).items():
        target = action.get("source")
        if sources is None or not isinstance(target, str) or not target:
            continue
        if target not in sources:
            v.report(("actions", aname, "source"), _missing_ref("source", target, sources))
        elif src_data.get(target, {}).get("type") != "modbus_tcp":
            v.report(
                ("actions", aname, "source"),
                f'source "{target}" is not a Modbus source: modbus_write needs one',
            )

    devices = {src.get("device") or sname for sname, src in src_data.items()}
    for rname, rule in data.get("rules", {}).items():
        for index, aname in enumerate(rule.get("actions", [])):
            if actions is not None and aname not in actions:
                v.report(("rules", rname, "actions", index), _missing_ref("action", aname, actions))
        device = rule.get("device")
        if device and sources is not None and v.clean(("sources",)) and device not in devices:
            v.report(
                ("rules", rname, "device"),
                f'no source reads a device named "{device}", so this rule never fires; '
                f"{_suggest(device, sorted(devices))}"
                f"devices: {', '.join(sorted(devices)) or 'none'}",
                warning=True,
            )


def _check_conditions(v: _Validator, data: dict[str, Any]) -> None:
    """Type-check every rule condition with the rules engine (CEL), if it is importable."""
    if not v.clean(("sources",)) or not data.get("rules"):
        return  # a broken source would make every rule using its registers look wrong
    try:
        engine = importlib.import_module("flux_edge.rules.engine")
    except ModuleNotFoundError as exc:
        if exc.name in ("flux_edge.rules", "flux_edge.rules.engine"):
            return  # not part of this build yet
        v.report((), f"rule conditions were not checked: {exc}", warning=True)
        return
    except ImportError as exc:
        v.report((), f"rule conditions were not checked: {exc}", warning=True)
        return
    check_rules: Callable[[Config], list[Any]] = engine.check_rules
    salvage: dict[str, Any] = {}
    for section in ("plugins", "sources", "rules", "actions"):
        entries = data.get(section, {})
        salvage[section] = {k: e for k, e in entries.items() if v.clean((section, k))}
    if v.clean(("daemon",)) and "daemon" in data:
        salvage["daemon"] = data["daemon"]
    try:
        config = msgspec.convert(salvage, Config)
    except msgspec.ValidationError:
        return
    try:
        errors = check_rules(config)
    except FluxError as exc:
        errors = [exc]
    for err in errors:
        rule = getattr(err, "rule", "")
        column = int(getattr(err, "column", 0) or 0)
        path: Key = ("rules", rule, "when")
        line, col = v.pos.value(path)
        if column > 0:
            line, col = v.pos.in_string(path, column - 1) or (line, col)
        v.problems.append(Problem(v.file, _fmt_path(path), str(err), line, col))
        v.dirty.add(path)


# --- entry points -------------------------------------------------------------------------------

_AT_LINE = re.compile(r" at line \d+ col \d+$")


def _syntax_problem(file: str, exc: Exception, positions: _Positions) -> Problem:
    message = _AT_LINE.sub("", str(exc))
    line = getattr(exc, "line", 0) or 0
    col = getattr(exc, "col", -1)
    column = col + 1 if isinstance(col, int) and col >= 0 and line else 0
    if "already exists" in message or "Redefinition" in message:
        with contextlib.suppress(_ScanError, RecursionError):
            _Scanner(positions.text, positions).run()
        if positions.duplicate is not None:
            line, column = positions.linecol(positions.duplicate)
        message = message.rstrip(".") + ": each key and table may be defined only once"
    elif message == "Unexpected character: '\\n'":
        message = "unexpected end of line: a value, a closing quote or a bracket is missing"
    return Problem(file, "", f"invalid TOML: {message}", line, column)


def _check(text: str, file: str, config_path: str) -> tuple[Config | None, list[Problem]]:
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        raw = tomlkit.parse(text).unwrap()
    except (tomlkit.exceptions.TOMLKitError, ValueError, OverflowError) as exc:
        return None, [_syntax_problem(file, exc, _Positions(text))]
    except RecursionError:
        return None, [Problem(file, "", "invalid TOML: values are nested too deeply")]
    positions = _scan(text)
    v = _Validator(file, positions)
    base_dir = Path(config_path).parent if config_path else Path.cwd()
    try:
        data = v.check(raw, Config, ())
        if data is not _BAD:
            _cross_check(v, raw, data, base_dir)
            _check_conditions(v, data)
    except RecursionError:
        v.report((), "values are nested too deeply")
    config = None
    if v.errors == 0:
        data["path"] = config_path
        try:
            config = msgspec.convert(data, Config)
        except msgspec.ValidationError as exc:  # a gap between this validator and the schema
            v.report((), f"internal error: the checked configuration was refused: {exc}")
    problems = sorted(v.problems, key=lambda p: (p.line == 0, p.line, p.column))
    return config, problems


def _split(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    errors = [p for p in problems if p.severity == "error"]
    return errors, [p for p in problems if p.severity != "error"]


def check_config_text(text: str, path: str = "<string>") -> tuple[Config | None, list[Problem]]:
    """Like ``check_config`` for text in memory. ``path`` names it in problems; unless it is
    ``"<...>"`` it also sets ``Config.path`` (so relative plugin paths resolve next to it)."""
    config_path = "" if path.startswith("<") else str(Path(path).resolve())
    return _check(text, path, config_path)


def check_config(path: str | Path) -> tuple[Config | None, list[Problem]]:
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
    return _check(text, file, str(Path(path).resolve()))


def _finish(config: Config | None, problems: list[Problem]) -> Config:
    errors, warnings = _split(problems)
    if errors or config is None:
        raise ConfigError(errors or problems)
    for warning in warnings:
        _log.warning("%s", warning)
    return config


def load_config(path: str | Path) -> Config:
    """Load a configuration file. Raises ``ConfigError`` holding every error; warnings are logged
    (use ``check_config`` to get them)."""
    return _finish(*check_config(path))


def load_config_text(text: str, path: str = "<string>") -> Config:
    """Load configuration text (``path`` as in ``check_config_text``). Raises ``ConfigError``."""
    return _finish(*check_config_text(text, path))
