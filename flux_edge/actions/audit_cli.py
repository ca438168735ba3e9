"""``flux-edge audit tail``: show the last audit records, optionally following new ones.

    2026-11-28 07:00:00.123Z  ALLOWED  burner_on  rule overheat  boiler.temperature=82.5 °C
        ok (read back true) 12.3 ms
    2026-11-28 07:00:05.001Z  BLOCKED  burner_off  rule cool  boiler.temperature=60 °C
        min_on: burner switched on 5 s ago, min_on is 30 s

(each record on one line; wrapped here).
``--json`` prints the raw lines. The last ``lines`` records are taken from the live file and, if it
holds fewer, the rotated ones (``.1``, ``.2``, ...). Following polls the file (every ``poll``
seconds) and notices a rotation (the path names a new file): what was appended to the old file
before the rename is printed first, then the new file from its start. Lines that do not parse
(a partial last line after a power cut) are shown as such, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from flux_edge.actions.audit import rotated_path
from flux_edge.config import Config

__all__ = ["add_audit_parser", "audit_path", "audit_tail", "cmd_audit_tail", "format_record"]

_MAX_ROTATED = 1000  # how far back rotated files are looked for


def format_record(line: str) -> str:
    """One audit JSON line -> one human-readable line."""
    try:
        rec = json.loads(line)
    except ValueError:
        return f"(unreadable record) {line}"
    if not isinstance(rec, dict):
        return f"(unreadable record) {line}"
    ts = str(rec.get("ts", "?")).replace("T", " ")
    decision = str(rec.get("decision", "?")).upper()
    parts = [ts, decision, str(rec.get("action", "?")), f"rule {rec.get('rule', '?')}"]
    cause = rec.get("cause")
    if isinstance(cause, dict):
        unit = f" {cause['unit']}" if cause.get("unit") else ""
        quality = cause.get("quality", "good")
        q = "" if quality == "good" else f" ({quality})"
        parts.append(f"{cause.get('device', '?')}.{cause.get('name', '?')}="
                     f"{_show(cause.get('value'))}{unit}{q}")
    params = rec.get("params")
    if isinstance(params, dict) and params.get("safety"):
        parts.append(f"safe state: {params['safety']}")
    outcome = rec.get("outcome")
    if rec.get("decision") == "blocked":
        parts.append(str(rec.get("reason", "")))
    elif isinstance(outcome, dict):
        verified = outcome.get("verified")
        read = f" (read back {_show(verified)})" if verified is not None else ""
        ms = outcome.get("latency_ms", 0)
        if outcome.get("ok"):
            parts.append(f"ok{read} {ms:g} ms")
        else:
            parts.append(f"FAILED {ms:g} ms: {outcome.get('error', '')}")
    if rec.get("suppressed"):
        parts.append(f"(+{rec['suppressed']} identical blocked attempt(s) not written)")
    return "  ".join(p for p in parts if p)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def _last_lines(path: Path, n: int, first: int = 0) -> list[str]:
    """The last ``n`` non-empty lines across the live file (``first = 0``) and its rotations."""
    out: deque[str] = deque()
    for i in range(first, _MAX_ROTATED):
        try:
            data = rotated_path(path, i).read_bytes()
        except FileNotFoundError:
            if i == 0:
                continue
            break
        lines = [x for x in data.decode("utf-8", "replace").split("\n") if x.strip()]
        for line in reversed(lines):
            if len(out) >= n:
                return list(out)
            out.appendleft(line)
    return list(out)


def audit_tail(
    path: Path,
    lines: int = 20,
    follow: bool = False,
    out: TextIO | None = None,
    *,
    raw: bool = False,
    poll: float = 0.2,
    stop: threading.Event | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the last ``lines`` records of the audit log at ``path`` (``raw``: the JSON lines).
    With ``follow``, keep printing new records until ``stop`` is set (or KeyboardInterrupt),
    across rotations. Returns the exit status: 0, or 1 when there is no audit log and not
    following."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    path = Path(path)
    stop = stop if stop is not None else threading.Event()

    def emit(line: str) -> None:
        out.write((line if raw else format_record(line)) + "\n")
        out.flush()

    # open the live file before reading history, so nothing appended in between is missed
    fh = _open(path)
    if fh is None and not follow and not rotated_path(path, 1).exists():
        err.write(f"no audit log at {path}\n")
        return 1
    start = fh.seek(0, os.SEEK_END) if fh is not None else 0
    if lines > 0:
        # no live file yet: history from rotated files; the live file is read whole once it appears
        history = _last_lines(path, lines, 1) if fh is None else _history(path, fh, start, lines)
        for line in history:
            emit(line)
    if not follow:
        if fh is not None:
            fh.close()
        return 0
    pending = b""
    try:
        while not stop.is_set():
            if fh is None:
                fh = _open(path)
                pending = b""
            if fh is not None:
                chunk = fh.read()
                if chunk:
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for line in complete:
                        if line.strip():
                            emit(line.decode("utf-8", "replace"))
                    continue  # read again at once: more may have come
                if _rotated(path, fh):
                    # the old file is complete (the writer renamed it): flush its last line
                    rest = pending + fh.read()
                    for line in rest.split(b"\n"):
                        if line.strip():
                            emit(line.decode("utf-8", "replace"))
                    old = os.fstat(fh.fileno())
                    fh.close()
                    fh = None
                    # files that were created and rotated away since (several rotations
                    # between two polls): newer than the one just read, older than the live one
                    for line in _missed(path, (old.st_ino, old.st_dev), err):
                        emit(line)
                    continue
            stop.wait(poll)
    except KeyboardInterrupt:
        pass
    finally:
        if fh is not None:
            fh.close()
    return 0


def _open(path: Path) -> Any:
    try:
        return path.open("rb")
    except FileNotFoundError:
        return None


def _history(path: Path, fh: Any, end: int, n: int) -> list[str]:
    """The last ``n`` lines up to ``end`` of the open live file, topped up from rotations."""
    fh.seek(0)
    data = fh.read(end)
    fh.seek(end)
    lines = [x for x in data.decode("utf-8", "replace").split("\n") if x.strip()]
    if len(lines) >= n:
        return lines[-n:]
    older = _last_lines(path, n - len(lines), first=1)
    return older + lines


def _missed(path: Path, old: tuple[int, int], err: TextIO) -> list[str]:
    """The lines of rotated files newer than the file ``old`` (inode, device), oldest first."""
    for i in range(1, _MAX_ROTATED):
        try:
            st = rotated_path(path, i).stat()
        except FileNotFoundError:
            break
        if (st.st_ino, st.st_dev) == old:
            out: list[str] = []
            for j in range(i - 1, 0, -1):
                try:
                    data = rotated_path(path, j).read_bytes()
                except FileNotFoundError:
                    continue
                out.extend(x for x in data.decode("utf-8", "replace").split("\n") if x.strip())
            return out
    if rotated_path(path, 1).exists():
        err.write("audit tail: the log rotated faster than it was followed; "
                  "some records may not be shown\n")
    return []


def _rotated(path: Path, fh: Any) -> bool:
    """Whether ``path`` now names a different file than the one ``fh`` reads."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False  # mid-rotation (renamed, not yet re-created): keep reading the old one
    old = os.fstat(fh.fileno())
    return (now.st_ino, now.st_dev) != (old.st_ino, old.st_dev)


# --- command line ---------------------------------------------------------------------------------


def audit_path(config: Config) -> Path:
    """Where the daemon writes its audit log: ``daemon.audit_file`` (relative to the config
    file's directory), default ``<state_dir>/audit.jsonl`` (state_dir as given, like the
    daemon uses it)."""
    if config.daemon.audit_file:
        return config.base_dir / config.daemon.audit_file
    return Path(config.daemon.state_dir) / "audit.jsonl"


def cmd_audit_tail(args: argparse.Namespace) -> int:
    """``flux-edge audit tail [-n N] [-f] [--json] (--config PATH | --file PATH)``."""
    if args.file:
        path = Path(args.file)
    else:
        from flux_edge.errors import ConfigError
        from flux_edge.kinds import load_config

        try:
            path = audit_path(load_config(args.config))
        except ConfigError as exc:
            sys.stderr.write(f"{exc}\n")
            return 78
    return audit_tail(path, args.lines, args.follow, raw=args.json)


def add_audit_parser(sub: Any) -> None:
    """Add ``audit tail`` to the CLI's subparsers (``sub`` from ``add_subparsers``)."""
    audit = sub.add_parser("audit", help="read the audit log of actuation attempts")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    tail = asub.add_parser("tail", help="show the last records; -f follows new ones")
    where = tail.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", metavar="FILE",
                       help="the daemon's config (finds its audit file; default "
                       "$FLUX_EDGE_CONFIG, else /etc/flux-edge/flux-edge.toml)")
    where.add_argument("--file", help="an audit file (audit.jsonl)")
    tail.add_argument("config_file", nargs="?", metavar="FILE", help="the same as --config")
    tail.set_defaults(takes_config=True)  # the CLI resolves FILE / --config / the default
    tail.add_argument("-n", "--lines", type=int, default=20, help="records to show (20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep showing new records")
    tail.add_argument("--json", action="store_true", help="print the raw JSON lines")
    tail.set_defaults(func=cmd_audit_tail)
