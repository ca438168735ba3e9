"""Ansible filters of the flux_edge role.

``flux_edge_toml``: a data structure from inventory variables -> a TOML document.

Used by the role to render /etc/flux-edge/flux-edge.toml from ``flux_edge_config``::

    {{ flux_edge_config_effective | flux_edge_toml }}

Mapping (TOML 1.0):

* a mapping at the top level is the document; nested mappings become ``[a.b]`` tables, except an
  empty mapping, which is written inline (``tls = {}``: for flux-edge "present but empty" means
  something);
* a list whose items are all non-empty mappings becomes an array of tables (``[[a.b]]``);
* any other list becomes an inline array (mappings inside it become inline tables);
* strings, booleans, integers, floats (``inf``/``nan`` included) and dates/times as TOML scalars;
* ``None`` (YAML ``~`` / an empty value) has no TOML form and is refused with the key path, as is
  any other type: nothing is silently stringified.

Keys are written bare when they consist of ``A-Za-z0-9_-`` and quoted otherwise. Within a table,
plain keys come first, then sub-tables, then arrays of tables, each group in the given order, so
the output is stable and a second run renders the same bytes.

``flux_edge_redact``: check-config output with secret values masked (see ``redact``).
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

try:  # inside Ansible: a filter error names the filter and the task
    from ansible.errors import AnsibleFilterError

    _BASES: tuple[type[Exception], ...] = (AnsibleFilterError, ValueError)
except ImportError:  # imported on its own (unit tests)
    _BASES = (ValueError,)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}


# A value that cannot be written as TOML; the message names its key path. A ValueError everywhere,
# and an AnsibleFilterError inside Ansible.
TomlError = type("TomlError", _BASES, {})


def _where(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _key(key: object, path: Sequence[str | int]) -> str:
    if not isinstance(key, str):
        raise TomlError(f"flux_edge_toml: {_where(path)}: key {key!r} is not a string")
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(value: str) -> str:
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _is_table(value: object) -> bool:
    return isinstance(value, Mapping) and len(value) > 0


def _is_table_array(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(_is_table(item) for item in value)
    )


def _scalar(value: object, path: Sequence[str | int]) -> str:
    """An inline value: scalar, inline array or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(float(value))
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        return _string(str(value))
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        items = [f"{_key(k, path)} = {_scalar(v, [*path, k])}" for k, v in value.items()]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v, [*path, i]) for i, v in enumerate(value)) + "]"
    if value is None:
        raise TomlError(
            f"flux_edge_toml: {_where(path)}: has no value (None); TOML has no null: "
            "remove the key or give it a value"
        )
    raise TomlError(
        f"flux_edge_toml: {_where(path)}: cannot write a {type(value).__name__} as TOML"
    )


def _table(
    lines: list[str],
    header: str | None,
    value: Mapping[Any, Any],
    path: list[str | int],
    array: bool = False,
) -> None:
    plain = [(k, v) for k, v in value.items() if not _is_table(v) and not _is_table_array(v)]
    tables = [(k, v) for k, v in value.items() if _is_table(v)]
    arrays = [(k, v) for k, v in value.items() if _is_table_array(v)]
    if header is not None and (array or plain or not (tables or arrays)):
        if lines:
            lines.append("")
        lines.append(f"[[{header}]]" if array else f"[{header}]")
    for k, v in plain:
        lines.append(f"{_key(k, path)} = {_scalar(v, [*path, k])}")
    for k, v in tables:
        name = _key(k, path)
        _table(lines, f"{header}.{name}" if header else name, v, [*path, k])
    for k, v in arrays:
        name = _key(k, path)
        for i, item in enumerate(v):
            _table(lines, f"{header}.{name}" if header else name, item, [*path, k, i], array=True)


def to_toml(value: object) -> str:
    """Render a mapping as a TOML document (ends with a newline)."""
    if not isinstance(value, Mapping):
        raise TomlError(
            f"flux_edge_toml: expects a mapping (the whole configuration), got "
            f"{type(value).__name__}"
        )
    lines: list[str] = []
    _table(lines, None, value, [])
    return "\n".join(lines) + "\n"


_SECRET_KEY = re.compile(r"^(?P<head>\S*:\d+:\d+: \S*password\S*: \w+:).*$")


def redact(text: str, secrets: Sequence[object] = ()) -> str:
    """``flux-edge check-config`` output made safe to show: every occurrence of a secret value is
    masked, and the message of a problem at a key path containing "password" is dropped (it may
    quote the value, e.g. "expected a string, got ...")."""
    for secret in secrets:
        if isinstance(secret, str) and secret:
            text = text.replace(secret, "********")
    lines = []
    for line in text.splitlines():
        m = _SECRET_KEY.match(line)
        lines.append(m.group("head") + " (message hidden: it may quote a secret)" if m else line)
    return "\n".join(lines)


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {"flux_edge_toml": to_toml, "flux_edge_redact": redact}
