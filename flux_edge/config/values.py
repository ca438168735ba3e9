"""Values in a configuration: durations, sizes, names, and how values are described in messages."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

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


def _check_input_ref(value: str) -> str | None:
    device, dot, name = value.partition(".")
    if not dot or _check_name(device) or _check_cel_ident(name):
        return (
            f'{_got(value)} is not "device.measurement": a device name, a dot and a '
            'measurement name, like "boiler.temperature"'
        )
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


def _check_profile_ref(value: str) -> str | None:
    if value.endswith(".toml"):
        return None
    if _NAME_RE.fullmatch(value):
        return None
    return (
        f"{_got(value)}: a profile is a name looked up in daemon.profile_dirs "
        '(like "eastron_sdm630") or the path of a file ending in ".toml"'
    )


# Baud rates serial adapters and Modbus devices offer; others are accepted with a warning.
_STANDARD_BAUDRATES = frozenset(
    {
        300,
        600,
        1200,
        2400,
        4800,
        9600,
        14400,
        19200,
        28800,
        38400,
        57600,
        76800,
        115200,
        128000,
        153600,
        230400,
        250000,
        256000,
        460800,
        500000,
        576000,
        921600,
        1000000,
        1152000,
        1500000,
        2000000,
        2500000,
        3000000,
        3500000,
        4000000,
    }
)


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
    # a secret (config/secrets.py): "value", { file = ... } or { credential = ... }; never echoed
    secret: Literal["", "value", "path"] = ""


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
    tp, own = unwrap(tp)
    rule = merge_rules(own, rule)
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


def _is_tagged(tp: Any) -> bool:
    return (
        isinstance(tp, type)
        and issubclass(tp, msgspec.Struct)
        and tp.__struct_config__.tag_field is not None
    )


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


_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_sha256_value(value: str) -> str | None:
    """Why ``value`` is not a usable ``sha256`` pin (64 hex digits), or None."""
    if _SHA256.fullmatch(value.lower()):
        return None
    return (
        f"sha256 must be 64 hex digits (the output of `sha256sum FILE` or "
        f"`flux-edge plugin info NAME`), got {len(value)} character(s)"
    )


# --- constraints in the structs' annotations ------------------------------------------------------
#
# A field's constraints live in its annotation: ``Annotated[int, Meta(ge=1, le=65535)]`` for what
# msgspec can carry (ranges, non-empty strings; msgspec enforces them when it builds the struct
# too), plus a ``_Rule`` for what it cannot (durations and sizes written as text, name checks,
# allowed choices, the keys of a table). The schema walk reads both (``unwrap``). On an array's
# items the constraint applies to each item: ``tuple[Annotated[str, Meta(min_length=1)], ...]``.

Rule = _Rule
DURATION = _Rule(kind="duration")  # "50ms", "1h30m" or a number of seconds -> float seconds
SIZE = _Rule(kind="size")  # "16MiB", "512KiB" or a number of bytes -> int bytes
NAME = _Rule(check=_check_name)
HOST = _Rule(check=_check_host)
CEL_IDENT = _Rule(check=_check_cel_ident)
MODULE = _Rule(check=_check_module)
PROFILE_REF = _Rule(check=_check_profile_ref)
INPUT_REF = _Rule(check=_check_input_ref)
NAME_KEYS = _Rule(keys=_check_name)
CEL_KEYS = _Rule(keys=_check_cel_ident)
LOG_LEVEL = _Rule(choices=_LOG_LEVELS)
SHA256 = _Rule(check=check_sha256_value)
SECRET = _Rule(secret="value")  # a password: text, { file = ... } or { credential = ... }
SECRET_PATH = _Rule(secret="path")  # a key/certificate file: a path or { credential = ... }


def merge_rules(a: _Rule | None, b: _Rule | None) -> _Rule | None:
    """``a`` with every field ``b`` sets (b wins)."""
    if a is None or b is None:
        return a or b
    changes = {
        f.name: getattr(b, f.name)
        for f in dataclasses.fields(b)
        if getattr(b, f.name) != f.default
    }
    return dataclasses.replace(a, **changes)


def _from_meta(meta: msgspec.Meta) -> _Rule:
    unsupported = [
        n for n in ("lt", "multiple_of", "pattern", "max_length", "tz")
        if getattr(meta, n, None) is not None
    ]
    if unsupported or (meta.gt not in (None, 0)) or (meta.min_length not in (None, 0, 1)):
        raise TypeError(f"config schema: Meta({meta}) has a constraint the walk does not check")
    return _Rule(
        min=meta.ge,
        max=meta.le,
        positive=meta.gt == 0,
        nonempty=meta.min_length == 1,
    )


@functools.cache
def unwrap(tp: Any) -> tuple[Any, _Rule | None]:
    """A field type without its ``Annotated`` wrapper, and the constraints the wrapper held."""
    if get_origin(tp) is not Annotated:
        return tp, None
    base, *extras = get_args(tp)
    rule: _Rule | None = None
    for extra in extras:
        if isinstance(extra, msgspec.Meta):
            rule = merge_rules(rule, _from_meta(extra))
        elif isinstance(extra, _Rule):
            rule = merge_rules(rule, extra)
    return base, rule
