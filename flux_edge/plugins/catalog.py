"""The plugin catalog: ``flux-edge plugin list | info NAME | verify``.

The catalog is every .wasm module in the plugin directories, in lookup order: the directories of
``--dir``, then the config's ``daemon.plugin_dirs`` (``--config``, relative to the config file),
then the plugins shipped with flux-edge (``flux_edge/plugins/bundled``, which the image installs
with the package). A name found twice is served by the first directory, as the daemon would load
it; the later copies are listed as shadowed. Everything is read from the modules' manifests
(:mod:`flux_edge.plugins.manifest`): nothing is instantiated.

``verify`` checks each module's manifest (present, valid, its name the file's, ABI 1, kinds that
match the exports), the bundled modules against ``bundled/SHA256SUMS`` (written by
plugins/build-all.sh), and with ``--config`` each declared plugin's ``sha256`` pin and its
``config`` table against the manifest's schema.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from flux_edge.config.plugin_files import bundled_plugin_dir, file_sha256, pin_mismatch
from flux_edge.config.values import _fmt_path
from flux_edge.plugins.checks import plugin_config_issues
from flux_edge.plugins.manifest import (
    ABI_VERSION,
    Manifest,
    ManifestError,
    check_exports,
    manifest_of,
    read_module,
)

SUMS_FILE = "SHA256SUMS"
_ABI_EXPORTS = ("memory", "flux_abi_version", "flux_alloc", "flux_dealloc", "flux_init")


@dataclass(frozen=True)
class Entry:
    """One module of the catalog."""

    name: str  # the file's stem: the name a config's [plugins.NAME] / module = ... finds
    path: Path
    origin: str  # "bundled" or the directory as given
    manifest: Manifest | None
    problems: tuple[str, ...]  # what verify reports about the module itself
    shadowed_by: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _inspect(path: Path, origin: str, sums: Mapping[str, str]) -> Entry:
    name = path.stem
    problems: list[str] = []
    manifest: Manifest | None = None
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Entry(name, path, origin, None, (f"cannot read: {exc.strerror or exc}",))
    try:
        module = read_module(data)
        manifest = manifest_of(data)
    except ManifestError as exc:
        return Entry(name, path, origin, None, (str(exc),))
    if manifest is None:
        problems.append("no manifest: rebuild it with `flux-edge plugin build`")
    else:
        if manifest.name != name:
            problems.append(f'the manifest names "{manifest.name}", the file "{name}.wasm"')
        if manifest.abi != ABI_VERSION:
            problems.append(f"ABI version {manifest.abi}; this flux-edge speaks {ABI_VERSION}")
        problems += check_exports(manifest, module)
    missing = [e for e in _ABI_EXPORTS if e not in module.exports]
    if missing:
        problems.append(f"missing ABI export(s): {', '.join(missing)}")
    if origin == "bundled" and sums:
        want = sums.get(path.name)
        if want is None:
            problems.append(f"not listed in {SUMS_FILE}: not a file flux-edge shipped")
        elif file_sha256(path) != want:
            problems.append(
                f"sha256 differs from {SUMS_FILE}: the shipped file was replaced or damaged; "
                "reinstall flux-edge"
            )
    return Entry(name, path, origin, manifest, tuple(problems))


def read_sums(directory: Path) -> dict[str, str]:
    """``SHA256SUMS`` (``sha256sum`` format) of a directory, file name -> digest; {} if none."""
    try:
        text = (directory / SUMS_FILE).read_text(encoding="utf-8")
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        digest, _, fname = line.partition("  ")
        if len(digest) == 64 and fname:
            out[fname.lstrip("*")] = digest.lower()
    return out


def write_sums(directory: Path) -> Path:
    """Write ``SHA256SUMS`` for the .wasm files of ``directory`` (plugins/build-all.sh)."""
    lines = [f"{file_sha256(p)}  {p.name}\n" for p in sorted(directory.glob("*.wasm"))]
    out = directory / SUMS_FILE
    out.write_text("".join(lines), encoding="utf-8")
    return out


def catalog(dirs: Sequence[tuple[Path, str]]) -> list[Entry]:
    """Every module in ``dirs`` ((directory, origin label), in lookup order), then the bundled
    ones; shadowed copies keep ``shadowed_by``. Sorted by name, the served copy first."""
    seen: dict[str, Path] = {}
    entries: list[Entry] = []
    for directory, origin in [*dirs, (bundled_plugin_dir(), "bundled")]:
        if not directory.is_dir():
            continue
        sums = read_sums(directory) if origin == "bundled" else {}
        for path in sorted(directory.glob("*.wasm")):
            entry = _inspect(path, origin, sums)
            first = seen.setdefault(entry.name, path)
            if first != path:
                entry = Entry(**{**entry.__dict__, "shadowed_by": first})
            entries.append(entry)
    order = {e.path: i for i, e in enumerate(entries)}
    return sorted(entries, key=lambda e: (e.name, e.shadowed_by is not None, order[e.path]))


# --- the config ---------------------------------------------------------------------------------


def _load_raw(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(
            f"error: {path}: invalid TOML ({exc}); run flux-edge check-config {path}"
        ) from exc


def _dirs(args: argparse.Namespace) -> tuple[list[tuple[Path, str]], dict[str, Any] | None]:
    dirs = [(Path(d).expanduser(), d) for d in args.dir or ()]
    raw = None
    if args.config:
        cfg = Path(args.config)
        raw = _load_raw(cfg)
        daemon = raw.get("daemon", {})
        plugin_dirs = daemon.get("plugin_dirs", ["plugins"]) if isinstance(daemon, dict) else []
        for d in plugin_dirs if isinstance(plugin_dirs, list) else []:
            if isinstance(d, str):
                p = Path(d).expanduser()
                dirs.append((p if p.is_absolute() else cfg.parent / p, d))
    return dirs, raw


# --- output -------------------------------------------------------------------------------------


def _kind(m: Manifest | None) -> str:
    return "/".join(m.kinds) if m else "?"


def cmd_list(args: argparse.Namespace) -> int:
    out = sys.stdout
    dirs, _raw = _dirs(args)
    entries = catalog(dirs)
    if args.json:
        rows = [
            {
                "name": e.name,
                "path": str(e.path),
                "origin": e.origin,
                "served": e.shadowed_by is None,
                "ok": e.ok,
                "problems": list(e.problems),
                "manifest": e.manifest.to_json() if e.manifest else None,
            }
            for e in entries
        ]
        json.dump(rows, out, ensure_ascii=False, indent=2)
        out.write("\n")
        return 0
    if not entries:
        print(
            "no plugins found (looked in: "
            + ", ".join(str(d) for d, _ in [*dirs, (bundled_plugin_dir(), "")])
            + ")",
            file=out,
        )
        return 0
    table = [("NAME", "VERSION", "KIND", "FROM", "DESCRIPTION")]
    for e in entries:
        m = e.manifest
        origin = e.origin + (" (shadowed)" if e.shadowed_by else "") + ("" if e.ok else " (!)")
        table.append(
            (e.name, m.version if m else "?", _kind(m), origin, m.description if m else "")
        )
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)), row[4], file=out)
    if any(not e.ok for e in entries):
        print("(!): `flux-edge plugin verify` says what is wrong", file=out)
    return 0


def options(
    schema: Mapping[str, Any], prefix: str = ""
) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    """(key path, schema, required) of every option in a config schema, depth first; the
    options of a list of tables appear as ``list[].key``."""
    required = set(schema.get("required") or ())
    for key, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{key}"
        yield path, sub, key in required
        if isinstance(sub.get("properties"), Mapping):
            yield from options(sub, path + ".")
        items = sub.get("items")
        if isinstance(items, Mapping) and isinstance(items.get("properties"), Mapping):
            yield from options(items, path + "[].")


def _value(v: object) -> str:
    return json.dumps(v, ensure_ascii=False)


def describe_type(schema: Mapping[str, Any]) -> str:
    tp = schema.get("type", "any")
    types = tp if isinstance(tp, list) else [tp]
    words = {"object": "table", "boolean": "bool", "array": "list"}
    out = " or ".join(words.get(str(t), str(t)) for t in types)
    items = schema.get("items")
    if "array" in types and isinstance(items, Mapping) and "type" in items:
        out = out.replace("list", f"list of {describe_type(items)}", 1)
    return out


def constraints(schema: Mapping[str, Any]) -> str:
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(_value(e) for e in schema["enum"]))
    items = schema.get("items")
    if isinstance(items, Mapping) and "enum" in items:
        parts.append("each one of " + ", ".join(_value(e) for e in items["enum"]))
    for key, word in (
        ("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
    ):  # fmt: skip
        if key in schema:
            parts.append(f"{word} {_value(schema[key])}")
    for key, word in (("minLength", "characters"), ("minItems", "elements")):
        if schema.get(key) == 1:
            parts.append("not empty")
        elif key in schema:
            parts.append(f"at least {schema[key]} {word}")
    for key, word in (("maxLength", "characters"), ("maxItems", "elements")):
        if key in schema:
            parts.append(f"at most {schema[key]} {word}")
    return "; ".join(parts)


def cmd_info(args: argparse.Namespace) -> int:
    out = sys.stdout
    dirs, _raw = _dirs(args)
    entries = [e for e in catalog(dirs) if e.name == args.name]
    if not entries:
        names = sorted({e.name for e in catalog(dirs)})
        import difflib

        close = difflib.get_close_matches(args.name, names, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        print(
            f'error: no plugin named "{args.name}"{hint}; plugins: {", ".join(names) or "none"}',
            file=sys.stderr,
        )
        return 1
    e = entries[0]
    m = e.manifest
    if args.json:
        json.dump(
            {"path": str(e.path), "sha256": file_sha256(e.path), "problems": list(e.problems),
             "manifest": m.to_json() if m else None},
            out, ensure_ascii=False, indent=2,
        )  # fmt: skip
        out.write("\n")
        return 0
    print(
        f"{e.name} {m.version if m else '?'} ({_kind(m)} plugin, ABI {m.abi if m else '?'})",
        file=out,
    )
    if m:
        print(f"  {m.description}", file=out)
        print(f"license: {m.license or 'not given'}", file=out)
        if m.homepage:
            print(f"homepage: {m.homepage}", file=out)
    print(f"file:    {e.path} ({e.origin})", file=out)
    print(
        f'sha256:  {file_sha256(e.path)}   (pin it: sha256 = "..." in [plugins.{e.name}])', file=out
    )
    for other in entries[1:]:
        print(f"shadows: {other.path}", file=out)
    for problem in e.problems:
        print(f"problem: {problem}", file=out)
    if m:
        opts = list(options(m.config))
        print("config:" if opts else "config: (no options)", file=out)
        for path, sub, required in opts:
            line = f"  {path} ({describe_type(sub)}"
            line += (
                ", required)"
                if required
                else (f", default {_value(sub['default'])})" if "default" in sub else ")")
            )
            extra = constraints(sub)
            desc = sub.get("description", "")
            print(line + (f": {desc}" if desc else "") + (f" [{extra}]" if extra else ""), file=out)
        if m.example:
            print("example:", file=out)
            for row in m.example.rstrip().splitlines():
                print(f"  {row}", file=out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    out = sys.stdout
    dirs, raw = _dirs(args)
    entries = catalog(dirs)
    failures = 0
    for e in entries:
        if e.shadowed_by is not None and e.ok:
            continue
        status = "ok" if e.ok else "FAIL"
        failures += not e.ok
        label = f"{e.path}" + (f" (shadowed by {e.shadowed_by})" if e.shadowed_by else "")
        print(f"{status:4}  {label}", file=out)
        for problem in e.problems:
            print(f"      {problem}", file=out)
    if raw is not None:
        failures += _verify_config(Path(args.config), raw, entries, out)
    print(f"{len(entries)} module(s), {failures} problem(s)", file=out)
    return 1 if failures else 0


def _verify_config(cfg: Path, raw: dict[str, Any], entries: list[Entry], out: TextIO) -> int:
    plugins = raw.get("plugins", {})
    if not isinstance(plugins, dict):
        return 0
    served = {e.name: e.path for e in entries if e.shadowed_by is None}
    failures = 0
    for name, table in plugins.items():
        if not isinstance(table, dict):
            continue
        where = _fmt_path(("plugins", name))
        file, module = table.get("file"), table.get("module")
        path: Path | None
        if isinstance(file, str) and file:
            given = Path(file).expanduser()
            given = given if given.is_absolute() else cfg.parent / given
            path = given if given.is_file() else None
        else:
            path = served.get(module if isinstance(module, str) and module else name)
        if path is None:
            print(f"FAIL  {cfg}: {where}: its .wasm file is not found", file=out)
            failures += 1
            continue
        problems = []
        pin = table.get("sha256")
        if isinstance(pin, str) and pin:
            mismatch = pin_mismatch(name, path, pin)
            if mismatch:
                problems.append(f"{where}.sha256: {mismatch}")
        for key, message, _at, warning in plugin_config_issues(name, path, table.get("config", {})):
            if not warning:
                problems.append(f"{_fmt_path(('plugins', name, *key))}: {message}")
        pinned = " (pinned)" if isinstance(pin, str) and pin and not problems else ""
        print(f"{'FAIL' if problems else 'ok':4}  {cfg}: {where} -> {path}{pinned}", file=out)
        for p in problems:
            print(f"      {p}", file=out)
        failures += len(problems)
    return failures


# --- argparse -------------------------------------------------------------------------------------


def add_catalog_parsers(psub: Any) -> None:
    """Add ``list``, ``info`` and ``verify`` to the ``flux-edge plugin`` subcommands."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            action="append",
            metavar="DIR",
            help="a plugin directory searched before the others (repeatable)",
        )
        p.add_argument("--config", metavar="FILE",
                       help="also search this config's daemon.plugin_dirs (verify: and check its "
                            "plugins' sha256 pins and config tables)")  # fmt: skip

    p_list = psub.add_parser("list", help="list the plugins found (shipped and configured)")
    common(p_list)
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=cmd_list)
    p_info = psub.add_parser("info", help="a plugin's manifest: options, sha256, example")
    p_info.add_argument("name")
    common(p_info)
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_info.set_defaults(func=cmd_info)
    p_verify = psub.add_parser(
        "verify", help="check every plugin's manifest, the shipped checksums and (--config) pins"
    )
    common(p_verify)
    p_verify.set_defaults(func=cmd_verify)
