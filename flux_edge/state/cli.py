"""``flux-edge state info | check | migrate``: the daemon's state files, their schema versions,
sizes and integrity.

    flux-edge state info [-c FILE | --state-dir DIR] [--json]   versions, sizes, records
    flux-edge state check [...]      + PRAGMA integrity_check of every SQLite store; exit 1 if any
                                     fails or is newer than this flux-edge
    flux-edge state migrate [...]    migrate older stores now (backup first); the daemon does the
                                     same at start, this lets an operator do it while it is stopped

``info`` and ``check`` open files read-only and change nothing (safe while the daemon runs).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux_edge.errors import StateError
from flux_edge.state.versions import Schema, file_info, open_versioned

__all__ = ["add_state_parser"]


@dataclass(frozen=True)
class _File:
    path: Path
    schema: Schema | None  # None: not SQLite (audit log, actuator state)
    what: str


def _schemas() -> tuple[Schema, Schema]:
    from flux_edge.rules.state import RULE_STATE_SCHEMA
    from flux_edge.uplink.outbox import OUTBOX_SCHEMA

    return OUTBOX_SCHEMA, RULE_STATE_SCHEMA


def _files(args: argparse.Namespace) -> list[_File]:
    outbox, rules = _schemas()
    if args.state_dir:
        state = Path(args.state_dir)
        boxes = sorted(state.glob("outbox*.sqlite"))
        audit = [state / "audit.jsonl"]
    else:
        from flux_edge.actions.audit_cli import audit_path
        from flux_edge.kinds import load_config

        config = load_config(Path(args.config))
        state = Path(config.daemon.state_dir)
        boxes = []
        if config.uplink is not None:
            boxes.append(state / (config.uplink.outbox_file or "outbox.sqlite"))
            boxes += sorted(p for p in state.glob("outbox-*.sqlite") if p not in boxes)
        audit = [audit_path(config)]
    out = [_File(p, outbox, "uplink outbox") for p in boxes]
    out.append(_File(state / "rules.sqlite", rules, "rule state"))
    out += [_File(p, None, "audit log") for p in audit]
    out.append(_File(state / "safety.json", None, "actuator state"))
    return out


def _plain(f: _File) -> dict[str, Any]:
    info: dict[str, Any] = {"store": f.what, "path": str(f.path), "exists": f.path.exists()}
    if f.path.exists():
        info["bytes"] = f.path.stat().st_size
        if f.what == "audit log":
            rotated = sorted(f.path.parent.glob(f"{f.path.name}.*"))
            info["rotated_files"] = len(rotated)
            info["rotated_bytes"] = sum(p.stat().st_size for p in rotated)
    return info


def _collect(args: argparse.Namespace, full: bool) -> list[dict[str, Any]]:
    rows = []
    for f in _files(args):
        rows.append(_plain(f) if f.schema is None else file_info(f.path, f.schema, full=full))
    return rows


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _print(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return
    for r in rows:
        if not r.get("exists"):
            print(f"{r['store']:<15} {r['path']}: none")
            continue
        parts = [_size(r.get("bytes"))]
        if "wal_bytes" in r:
            parts[0] += f" (+{_size(r['wal_bytes'])} WAL)"
        if "version" in r:
            v, code = r.get("version"), r.get("code_version")
            parts.append(f"schema {v}" + ("" if v == code else f" (this flux-edge: {code})"))
        if r.get("records") is not None:
            parts.append(f"{r['records']} record(s)")
        if "integrity" in r:
            parts.append(f"integrity {r['integrity']}")
        if r.get("rotated_files"):
            parts.append(f"{r['rotated_files']} rotated ({_size(r['rotated_bytes'])})")
        print(f"{r['store']:<15} {r['path']}: " + ", ".join(parts))


def _bad(r: dict[str, Any]) -> str:
    if not r.get("exists") or "integrity" not in r:
        return ""
    if r["integrity"] != "ok":
        return f"{r['path']}: {r['integrity']} (the daemon moves it aside at start)"
    version, code = r.get("version"), r.get("code_version")
    if isinstance(version, int) and isinstance(code, int) and version > code:
        return f"{r['path']}: schema {version} is newer than this flux-edge's {code}"
    return ""


def cmd_state_info(args: argparse.Namespace) -> int:
    _print(_collect(args, full=False), args.json)
    return 0


def cmd_state_check(args: argparse.Namespace) -> int:
    rows = _collect(args, full=True)
    _print(rows, args.json)
    problems = [p for p in map(_bad, rows) if p]
    for p in problems:
        print(f"flux-edge: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_state_migrate(args: argparse.Namespace) -> int:
    failed = 0
    for f in _files(args):
        if f.schema is None or not f.path.exists():
            continue
        info = file_info(f.path, f.schema)
        problem = _bad(info)
        if problem:
            print(f"flux-edge: {problem}; not migrated", file=sys.stderr)
            failed += 1
            continue
        if info.get("version") == f.schema.version:
            print(f"{f.path}: schema {f.schema.version}, nothing to do")
            continue
        try:
            with _exclusive(f.path):
                opened = open_versioned(
                    f.path, f.schema,
                    lambda p: sqlite3.connect(p, timeout=1.0, isolation_level=None),
                )
                opened.db.close()
        except (StateError, sqlite3.Error, OSError) as exc:
            print(f"flux-edge: {f.path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{f.path}: migrated from schema {opened.migrated_from} to {f.schema.version} "
              f"(backup: {opened.backup})")
    return 1 if failed else 0


@contextlib.contextmanager
def _exclusive(path: Path) -> Any:
    """The outbox's lock file (held by a running daemon): migrate only a stopped one."""
    lock = Path(f"{path}.lock")
    if not lock.exists():
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise StateError(f"in use by a running flux-edge: stop it first ({exc})") from exc
        yield
    finally:
        os.close(fd)


def add_state_parser(sub: Any) -> None:
    """Add ``state info|check|migrate`` to the CLI's subparsers."""
    state = sub.add_parser("state", help="the daemon's state files: versions, sizes, integrity")
    ssub = state.add_subparsers(dest="state_command", required=True, metavar="SUBCOMMAND")
    for name, func, text in (
        ("info", cmd_state_info, "schema versions, sizes and records (read-only)"),
        ("check", cmd_state_check, "info + a full integrity check; exit 1 on a problem"),
        ("migrate", cmd_state_migrate, "migrate older stores now (the daemon must be stopped)"),
    ):
        p = ssub.add_parser(name, help=text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--config", "-c", metavar="FILE",
                           help="the daemon's config (default $FLUX_EDGE_CONFIG, else "
                           "/etc/flux-edge/flux-edge.toml)")
        where.add_argument("--state-dir", metavar="DIR", help="a state directory instead")
        p.add_argument("config_file", nargs="?", metavar="FILE", help="the same as --config")
        p.add_argument("--json", action="store_true", help="JSON instead of text")
        p.set_defaults(func=func, takes_config=True)


