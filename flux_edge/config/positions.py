"""Where each key and value sits in a TOML text: a small scanner, because tomlkit exposes no
positions and no schema library gives TOML line and column."""

from __future__ import annotations

import bisect
import contextlib
import re
import tomllib
from typing import Any

import tomlkit
import tomlkit.exceptions

from flux_edge.config.values import Key
from flux_edge.errors import Problem

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
        self.duplicate_first: int | None = None  # ... and where it was defined before
        self._lines: list[int] | None = None
        self._pending = False  # the scan is still to run (``_scan``: on the first question)

    @property
    def _line_starts(self) -> list[int]:
        if self._lines is None:
            self._lines = [0] + [m.end() for m in re.finditer("\n", self.text)]
        return self._lines

    def _ensure(self) -> None:
        if self._pending:
            self._pending = False
            # On a failure what was recorded so far stays usable; the rest falls back to
            # enclosing keys.
            with contextlib.suppress(_ScanError, RecursionError):
                _Scanner(self.text, self).run()

    def linecol(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def _nearest(self, path: Key) -> int | None:
        self._ensure()
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
        self._ensure()
        span = self.values.get(path)
        if span is not None:
            return self.linecol(span[0])
        return self.key(path)

    def in_string(self, path: Key, index: int) -> tuple[int, int] | None:
        """(line, column) of the 0-based character ``index`` inside the string value at ``path``.

        Exact for strings without escapes; otherwise close to it.
        """
        self._ensure()
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

    def dup(self, offset: int, path: Key = ()) -> None:
        if self.p.duplicate is None:
            self.p.duplicate = offset
            self.p.duplicate_first = self.p.keys.get(path)

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
                self.dup(off, resolved)
            if last and is_aot:
                if resolved in self.explicit or resolved in self.dotted:
                    self.dup(off, resolved)
                count = self.aot.get(resolved, 0)
                self.aot[resolved] = count + 1
                self.p.keys.setdefault(resolved, off)
                resolved = (*resolved, count)
                self.explicit.add(resolved)
                self.p.keys[resolved] = off
            elif last:
                if resolved in self.aot:
                    self.dup(off, resolved)
                if resolved in self.explicit or resolved in self.dotted:
                    self.dup(off, resolved)
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
                self.dup(off, path)
            if j < len(parts) - 1:
                self.dotted.add(path)
                self.p.keys.setdefault(path, off)
            else:
                if path in self.explicit or path in self.dotted:
                    self.dup(off, path)
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
    """The positions of ``text``, scanned when first asked for: a file without problems is
    never scanned (0.8 s of a 2 MB file)."""
    positions = _Positions(text)
    positions._pending = True
    return positions


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
        first = positions.duplicate_first
        if positions.duplicate is not None and first is not None and first != positions.duplicate:
            fl, fc = positions.linecol(first)
            message += f" (first defined at line {fl}, column {fc}; again at line {line})"
    elif message == "Unexpected character: '\\n'":
        message = "unexpected end of line: a value, a closing quote or a bracket is missing"
    return Problem(file, "", f"invalid TOML: {message}", line, column)


def parse_document(text: str, file: str) -> tuple[str, dict[str, Any] | None, list[Problem]]:
    """Parse TOML text (a byte-order mark dropped): ``(text, data, [])`` with the document as
    plain data, or ``(text, None, [the syntax problem at its line and column])``.

    The standard library's parser reads the document (ten times faster than tomlkit: 0.4 s
    against 4-6 s for 2 MB); a document it refuses is handed to tomlkit for the message, whose
    wording and positions the tests and docs show (tomllib's is the fallback)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return text, tomllib.loads(text), []
    except tomllib.TOMLDecodeError as exc:
        first: Exception = exc
    except RecursionError:
        return text, None, [Problem(file, "", "invalid TOML: values are nested too deeply")]
    try:
        tomlkit.parse(text)
    except (tomlkit.exceptions.TOMLKitError, ValueError, OverflowError) as exc:
        return text, None, [_syntax_problem(file, exc, _Positions(text))]
    except RecursionError:
        return text, None, [Problem(file, "", "invalid TOML: values are nested too deeply")]
    return text, None, [_tomllib_problem(file, first)]


_TOMLLIB_AT = re.compile(r" \(at line (\d+), column (\d+)\)$")


def _tomllib_problem(file: str, exc: Exception) -> Problem:
    message = str(exc)
    m = _TOMLLIB_AT.search(message)
    line, column = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return Problem(file, "", f"invalid TOML: {_TOMLLIB_AT.sub('', message)}", line, column)
