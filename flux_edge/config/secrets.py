"""Secrets in the configuration: passwords and TLS keys kept out of the TOML (issue #13, item 8).

A field marked ``SECRET`` (a password) takes one of::

    password = "s3cret"                       # in the TOML (a warning if others can read it)
    password = { file = "/etc/flux-edge/up.pass" }   # the file's text, one trailing newline off
    password = { credential = "uplink-password" }    # systemd: LoadCredential=uplink-password:

``SECRET_PATH`` (a TLS key or certificate file) takes a path or ``{ credential = "name" }``,
which becomes ``$CREDENTIALS_DIRECTORY/name`` (systemd's ``LoadCredential=`` /
``LoadCredentialEncrypted=``, readable by the service alone).

A secret's value never appears in a problem: a value of the wrong type is described by its type
only ("got an integer"), a file's content never, its path and the OS error only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from flux_edge.config.values import Key, _check_name

__all__ = [
    "MAX_SECRET_BYTES",
    "SECRET_HELP",
    "exposed",
    "resolve_secret",
    "secret_file",
    "type_name",
]

MAX_SECRET_BYTES = 64 * 1024
SECRET_HELP = 'a string, { file = "/path/to/file" } or { credential = "name" } (systemd)'
SECRET_PATH_HELP = 'a path or { credential = "name" } (systemd LoadCredential=)'


def type_name(value: object) -> str:
    """What a value is, without showing it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def credentials_dir() -> Path | None:
    d = os.environ.get("CREDENTIALS_DIRECTORY", "")
    return Path(d) if d else None


def _credential_path(name: object) -> tuple[Path | None, str]:
    if not isinstance(name, str) or not name:
        return None, f"credential: expected a credential name, got {type_name(name)}"
    if problem := _check_name(name):
        return None, f"credential {name!r}: {problem}"
    directory = credentials_dir()
    if directory is None:
        return None, (
            f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set: systemd sets it for a "
            f"unit with LoadCredential={name}:/path/to/secret (to check the file by hand: "
            "CREDENTIALS_DIRECTORY=/dir/holding/it flux-edge check-config FILE)"
        )
    path = directory / name
    if not path.is_file():
        return None, f"credential {name!r}: no file {path} (is LoadCredential={name}:... set?)"
    return path, ""


def exposed(path: Path) -> int | None:
    """The mode of a secret file every user can read (None: it is not, or cannot be seen)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return stat.S_IMODE(mode) if mode & stat.S_IROTH else None


def _read(path: Path) -> tuple[str | None, str]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read the secret file {path}: {exc.strerror or type(exc).__name__}"
    if len(data) > MAX_SECRET_BYTES:
        return None, f"the secret file {path} is larger than {MAX_SECRET_BYTES // 1024} KiB"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"the secret file {path} is not UTF-8 text"
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return text, ""


def secret_file(value: Any, base_dir: Path) -> Path | None:
    """The file a ``{ file = ... }`` secret names (None for other forms)."""
    if isinstance(value, dict) and isinstance(value.get("file"), str) and value["file"]:
        raw = Path(value["file"])
        return raw if raw.is_absolute() else base_dir / raw
    return None


def resolve_secret(
    value: Any, path: Key, base_dir: Path, *, as_path: bool
) -> tuple[str | None, str, bool]:
    """``(resolved, problem, literal)``: the secret's value (or, ``as_path``, its file's path),
    else None and the problem; ``literal``: it was written in the TOML itself."""
    help_ = SECRET_PATH_HELP if as_path else SECRET_HELP
    if isinstance(value, str):
        return value, "", bool(value) and not as_path
    if not isinstance(value, dict):
        return None, f"expected {help_}, got {type_name(value)}", False
    allowed = {"credential"} if as_path else {"file", "credential"}
    keys = set(value)
    if len(keys) != 1 or not keys <= allowed:
        shown = ", ".join(sorted(repr(k) for k in keys)) or "no key"
        return None, f"expected {help_}: a table with one key of {sorted(allowed)}, got {shown}", \
            False
    (kind,) = keys
    if kind == "credential":
        cpath, problem = _credential_path(value["credential"])
        if cpath is None:
            return None, problem, False
        if as_path:
            return str(cpath), "", False
        text, problem = _read(cpath)
        return text, problem, False
    raw = value["file"]
    if not isinstance(raw, str) or not raw:
        return None, f"file: expected a path, got {type_name(raw)}", False
    fpath = Path(raw) if Path(raw).is_absolute() else base_dir / raw
    text, problem = _read(fpath)
    return text, problem, False
