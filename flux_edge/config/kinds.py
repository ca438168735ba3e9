"""The one small interface between the config loader and the domains: kinds and domain checks.

A **kind** is one value of a section's type tag: ``[sources.X] type = "serial"``, ``[actions.Y]
type = "modbus_write"`` (and the uplink encoders the northbound issue adds). Each kind is declared
in one module beside its domain (``flux_edge/sources/serial_kind.py``, ...), as a ``Kind``: its
config struct (a subclass of ``SourceSpec`` or ``ActionSpec``, each field's constraints in its
annotation), its checks and its factory. The loader never names a kind: it
looks the tag up in a ``Registry``.

A **domain** adds what belongs to it but not to one entry: the rules' references, conditions and
test cases (``flux_edge/rules/checks.py``), actuators (``flux_edge/actions/checks.py``), the
uplink's topics (``flux_edge/uplink/checks.py``). Its passes get the ``Context`` and report
through it.

``flux_edge.kinds`` (above every domain) collects the kinds and domains into one ``Kinds`` and
binds the loader's entry points to it; this package imports nothing above itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from flux_edge.config.values import Key, _fmt_path, _Rule, _suggest
from flux_edge.errors import Problem

if TYPE_CHECKING:  # the loader passes its validator in; kinds only receive it
    from flux_edge.config.schema import Config
    from flux_edge.config.validate import _Validator

Section = Literal["sources", "actions"]
SECTIONS: tuple[Section, ...] = ("sources", "actions")

# Checks across the fields of one table: (validator, the checked table, its key path, whether
# the table had no error so far). They may fill in defaults the other passes rely on.
TableCheck = Callable[["_Validator", dict[str, Any], Key, bool], None]


@dataclass(frozen=True, slots=True)
class Device:
    """A device name a source entry declares, where (key path) it is declared, and the points
    (register names) known for it from the config; ``None`` = not known before run time."""

    name: str
    path: Key
    points: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Devices:
    """What a source entry says about its devices. ``dynamic``: names come at run time (an MQTT
    source's ``device_from_topic``), so device references cannot be checked."""

    declared: tuple[Device, ...] = ()
    dynamic: bool = False


def _default_devices(name: str, table: dict[str, Any]) -> Devices:
    device = table.get("device")
    if isinstance(device, str) and device:
        return Devices((Device(device, ("sources", name, "device")),))
    return Devices((Device(name, ("sources", name)),))


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of a section, declared by the module of its domain.

    ``struct``: its config struct, tagged with ``tag`` (``SourceSpec``/``ActionSpec`` subclass),
    each field's constraints in its annotation (``flux_edge.config.values``: ``Meta`` ranges,
    ``DURATION``, ``NAME`` ...). ``table_checks``: checks across one table's fields, keyed by
    struct.
    ``cross_check(ctx, name, table)``: the checked entry against the rest of the document.
    ``normalize(ctx, name, table)``: rewrite the entry into its loaded shape (device profiles).
    ``built_check(ctx, config, name)``: on the built ``Config`` (the RTU bus budget).
    ``devices(name, table)``: the device names a source entry declares (default: its ``device``
    key, else its table name). ``exclusive``: a key naming something only one entry may open
    (a serial port). ``plugins(table)``: plugins an entry uses besides a source's chain.
    ``rank``: the order kinds are listed in. ``factory``: what the runtime calls to build it
    (the pipeline knows its signature per section: ``flux_edge.sources.SourceFactory``,
    ``flux_edge.actions.ActionFactory``).
    """

    section: Section
    tag: str
    struct: type[msgspec.Struct]
    factory: Callable[..., Any]
    table_checks: Mapping[type, TableCheck] = field(default_factory=dict)
    cross_check: Callable[[Context, str, dict[str, Any]], None] | None = None
    normalize: Callable[[Context, str, dict[str, Any]], None] | None = None
    built_check: Callable[[Context, Config, str], None] | None = None
    devices: Callable[[str, dict[str, Any]], Devices] = _default_devices
    exclusive: str = ""
    plugins: Callable[[dict[str, Any]], list[str]] | None = None
    rank: int = 100  # where the kind is listed among its section's (messages, docs)

    def __post_init__(self) -> None:
        tag = self.struct.__struct_config__.tag
        if tag != self.tag:
            raise ValueError(
                f"kind {self.tag!r}: its struct {self.struct.__name__} is tagged {tag!r}"
            )


@dataclass(frozen=True, slots=True)
class Domain:
    """What a domain (rules, actuators, the uplink) adds to the loader beyond its kinds:
    constraints on fields of config's structs that need the domain's code (``rules``, by
    (struct, TOML key): the uplink's topics are checked by its template compiler;
    ``table_checks``, as in ``Kind``), and passes over the whole document. ``references``
    runs after the schema pass (the document as checked plain data), ``semantic`` after the
    normalization (profiles merged), ``built`` on the built ``Config``."""

    name: str
    rules: Mapping[tuple[type, str], _Rule] = field(default_factory=dict)
    table_checks: Mapping[type, TableCheck] = field(default_factory=dict)
    references: Callable[[Context], None] | None = None
    semantic: Callable[[Context], None] | None = None
    built: Callable[[Context, Config], None] | None = None


class Registry:
    """The kinds of one section, by tag."""

    def __init__(self, section: Section, kinds: Iterable[Kind] = ()) -> None:
        self.section = section
        self._by_tag: dict[str, Kind] = {}
        for kind in sorted(kinds, key=lambda k: k.rank):  # stable: equal ranks keep their order
            self.add(kind)

    def add(self, kind: Kind) -> None:
        if kind.section != self.section:
            raise ValueError(
                f"kind {kind.tag!r} is a {kind.section} kind, not a {self.section} one"
            )
        if kind.tag in self._by_tag:
            raise ValueError(f"two {self.section} kinds are tagged {kind.tag!r}")
        self._by_tag[kind.tag] = kind

    def remove(self, tag: str) -> Kind:
        """Take a kind out again (tests that register a kind of their own)."""
        return self._by_tag.pop(tag)

    def get(self, tag: object) -> Kind | None:
        return self._by_tag.get(tag) if isinstance(tag, str) else None

    def of(self, spec: msgspec.Struct) -> Kind:
        """The kind of a built config struct."""
        kind = self._by_tag.get(str(type(spec).__struct_config__.tag))
        if kind is None:
            raise KeyError(f"no {self.section} kind for {type(spec).__name__}")
        return kind

    def __iter__(self) -> Any:
        return iter(self._by_tag.values())

    def __len__(self) -> int:
        return len(self._by_tag)

    @property
    def tags(self) -> list[str]:
        return list(self._by_tag)

    @property
    def structs(self) -> tuple[type[msgspec.Struct], ...]:
        return tuple(k.struct for k in self._by_tag.values())


@dataclass(frozen=True, slots=True)
class Kinds:
    """Everything the loader asks the domains: the registries and the domain checks."""

    sources: Registry
    actions: Registry
    domains: tuple[Domain, ...] = ()

    def registry(self, section: Section) -> Registry:
        return self.sources if section == "sources" else self.actions

    def each(self) -> Iterable[Kind]:
        yield from self.sources
        yield from self.actions

    def rules(self) -> dict[tuple[type, str], _Rule]:
        out: dict[tuple[type, str], _Rule] = {}
        for domain in self.domains:
            out.update(domain.rules)
        return out

    def table_checks(self) -> dict[type, TableCheck]:
        out: dict[type, TableCheck] = {}
        for kind in self.each():
            out.update(kind.table_checks)
        for domain in self.domains:
            out.update(domain.table_checks)
        return out


class Context:
    """What kinds and domain checks see of a document being loaded: the raw TOML data, the
    checked data (rejected values left out), where the file is, and the problem list."""

    def __init__(
        self,
        v: _Validator,
        *,
        raw: dict[str, Any],
        data: dict[str, Any],
        base_dir: Path,
        kinds: Kinds,
        build: Callable[[dict[str, Any]], Config | None],
    ) -> None:
        self.v = v
        self.raw = raw
        self.data = data
        self.base_dir = base_dir
        self.kinds = kinds
        self._build = build
        self.memo: dict[str, Any] = {}  # state a kind keeps across its entries in one load

    # reporting (the validator places each problem at its key or value)
    def report(
        self,
        path: Key,
        message: str,
        *,
        at: Literal["key", "value"] = "value",
        where: Key | None = None,
        warning: bool = False,
    ) -> None:
        self.v.report(path, message, at=at, where=where, warning=warning)

    def report_in_string(self, path: Key, message: str, column: int) -> None:
        """An error at ``column`` (1-based, 0 = unknown) inside the string value at ``path``."""
        line, col = self.v.pos.value(path)
        if column > 0:
            line, col = self.v.pos.in_string(path, column - 1) or (line, col)
        self.v.problems.append(Problem(self.v.file, _fmt_path(path), message, line, col))
        self.v.dirty.add(path)

    def clean(self, path: Key) -> bool:
        """No error has been reported at or below ``path``."""
        return self.v.clean(path)

    # the document
    def names(self, section: str) -> list[str] | None:
        """The names declared in a top-level table of the raw document, or None if it is not a
        table (already reported)."""
        table = self.raw.get(section, {})
        return list(table) if isinstance(table, dict) else None

    def entries(self, section: str) -> dict[str, Any]:
        entries = self.data.get(section, {})
        return entries if isinstance(entries, dict) else {}

    def kind_of(self, section: Section, table: object) -> Kind | None:
        if not isinstance(table, dict):
            return None
        return self.kinds.registry(section).get(table.get("type"))

    def devices(self) -> Devices:
        """Every device the checked sources declare, in order."""
        declared: list[Device] = []
        dynamic = False
        for sname, src in self.entries("sources").items():
            kind = self.kind_of("sources", src)
            if kind is None:
                continue
            found = kind.devices(sname, src)
            declared.extend(found.declared)
            dynamic = dynamic or found.dynamic
        return Devices(tuple(declared), dynamic)

    def missing_ref(self, what: str, name: str, declared: list[str]) -> str:
        listed = ", ".join(declared) if declared else "none"
        return f'no {what} named "{name}"; {_suggest(name, declared)}declared {what}s: {listed}'

    def build(self, data: dict[str, Any]) -> Config | None:
        """A ``Config`` from checked data (``None`` if the structs refuse it)."""
        return self._build(data)
