"""The schema pass: the document walked against the Structs, every problem collected with its
key path, line and column."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time
from decimal import InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import msgspec

from flux_edge.config.positions import _Positions
from flux_edge.config.schema import (
    ActionSpec,
    Config,
    SourceSpec,
)
from flux_edge.config.secrets import exposed, resolve_secret, secret_file
from flux_edge.config.tables import TABLE_CHECKS
from flux_edge.config.values import (
    Key,
    _desc,
    _fmt_path,
    _got,
    _is_number,
    _is_tagged,
    _is_union,
    _num,
    _plural,
    _Rule,
    _suggest,
    merge_rules,
    parse_duration,
    parse_size,
    unwrap,
)
from flux_edge.errors import Problem

if TYPE_CHECKING:
    from flux_edge.config.kinds import Registry, TableCheck

# Constraints that cannot be written in the structs' annotations come from the domains
# (``Domain.rules``: the uplink's topics are checked by the uplink's template compiler).
_RULES: dict[tuple[type, str], _Rule] = {}

# Fields the loader sets; a file may not.
_LOADER_ONLY: frozenset[tuple[type, str]] = frozenset({(Config, "path")})
# --- schema validation --------------------------------------------------------------------------

_BAD: Any = object()  # "this value was rejected" (a Problem has been recorded)


@functools.cache
def _fields(cls: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    """A struct's fields by TOML key (msgspec's encoded name: RuleConfig.for_ is "for"), the
    loader-only ones left out. Cached: msgspec resolves the annotations on every call, which
    cost 5 s of a 20,000-register file."""
    return {
        f.encode_name: f
        for f in msgspec.structs.fields(cls)
        if (cls, f.name) not in _LOADER_ONLY
    }


class _Validator:
    """Walks the document against the Structs, collecting every problem.

    Returns plain data (lists, dicts, scalars, durations as float seconds, sizes as int bytes) in
    which rejected values are left out, so later passes can still look at the valid parts.
    """

    def __init__(
        self,
        file: str,
        positions: _Positions,
        *,
        rules: Mapping[tuple[type, str], _Rule] | None = None,
        table_checks: Mapping[type, TableCheck] | None = None,
        registries: Sequence[Registry] = (),
    ) -> None:
        self.file = file
        self.pos = positions
        self.problems: list[Problem] = []
        self.dirty: set[Key] = set()
        self.base_dir = Path.cwd()  # where relative secret files are (the config file's dir)
        self.secrets: list[Key] = []  # secrets written in the file itself (not from a file)
        self._rules = {**_RULES, **(rules or {})}
        self._table_checks = {**TABLE_CHECKS, **(table_checks or {})}
        # a field typed SourceSpec/ActionSpec is a table of one of that registry's kinds
        self._kinds: dict[type, tuple[type, ...]] = {}
        for registry in registries:
            base = SourceSpec if registry.section == "sources" else ActionSpec
            self._kinds[base] = registry.structs

    def rule(self, cls: type, key: str) -> _Rule | None:
        """The rule of field ``key`` of struct ``cls`` (or of a base struct it inherits it from)."""
        for klass in cls.__mro__:
            rule = self._rules.get((klass, key))
            if rule is not None:
                return rule
        return None

    def report_in_string(self, path: Key, message: str, column: int) -> None:
        """An error at ``column`` (1-based, 0 = unknown) inside the string value at ``path``."""
        line, col = self.pos.value(path)
        if column > 0:
            line, col = self.pos.in_string(path, column - 1) or (line, col)
        self.problems.append(Problem(self.file, _fmt_path(path), message, line, col))
        self.dirty.add(path)

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
        tp, own = unwrap(tp)
        rule = merge_rules(own, rule)
        if rule is not None and rule.secret:
            return self._secret(value, path, rule)
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
            if all(_is_tagged(a) for a in get_args(tp)):
                return self._tagged(value, get_args(tp), path)
            for alternative in get_args(tp):
                if self._is(value, alternative):
                    return self.check(value, alternative, path, rule)
            self.report(path, f"expected {_desc(tp)}, got {_got(value)}")
            return _BAD
        if tp in self._kinds:
            return self._tagged(value, self._kinds[tp], path)
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
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):  # an optional table
            return isinstance(value, dict)
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

    def _secret(self, value: Any, path: Key, rule: _Rule) -> Any:
        """A secret: resolved from its file or systemd credential; never shown in a problem."""
        resolved, problem, literal = resolve_secret(
            value, path, self.base_dir, as_path=rule.secret == "path"
        )
        if resolved is None:
            self.report(path, problem)
            return _BAD
        if literal:
            self.secrets.append(path)
        file = secret_file(value, self.base_dir)
        if file is not None and (mode := exposed(file)) is not None:
            self.report(
                path,
                f"the secret file {file} can be read by every user of this machine (mode "
                f"{mode:04o}): chmod 640 it (group flux-edge) or 600",
                warning=True,
            )
        return resolved

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

    def _tagged(self, value: Any, alternatives: tuple[Any, ...], path: Key) -> Any:
        """A table of one of several tagged Structs, chosen by its tag field ("type")."""
        if not isinstance(value, dict):
            self.report(path, f"expected a table, got {_got(value)}")
            return _BAD
        tag_field = alternatives[0].__struct_config__.tag_field
        by_tag = {str(a.__struct_config__.tag): a for a in alternatives}
        names = ", ".join(by_tag)
        if tag_field not in value:
            self.report(
                (*path, tag_field),
                f'missing required key "{tag_field}" (expected one of {names})',
                at="key",
                where=path,
            )
            return _BAD
        tag = value[tag_field]
        cls = by_tag.get(tag) if isinstance(tag, str) else None
        if cls is None:
            hint = _suggest(tag, list(by_tag)) if isinstance(tag, str) else ""
            self.report(
                (*path, tag_field), f"expected one of {names}, got {_got(tag)}; {hint}".rstrip("; ")
            )
            return _BAD
        return self._struct(value, cls, path)

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
        # keyed by the TOML key: msgspec's encoded name (RuleConfig.for_ is "for")
        fields = _fields(cls)
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
            checked = self.check(element, field.type, kpath, self.rule(cls, key))
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
            if field.required and field.encode_name not in value:
                rule = self.rule(cls, field.encode_name)
                self.report(
                    (*path, field.encode_name),
                    f'missing required key "{field.encode_name}" ({_desc(field.type, rule)})',
                    at="key",
                    where=path,
                )
        check = self._table_checks.get(cls)
        if check is not None:
            check(self, out, path, self.errors == before)
        return out
