"""State files and directories, created and opened the one safe way (issue #13, item 8).

- Files are created 0640 and directories 0750 whatever the umask (the group is the service's:
  an operator in group flux-edge reads the audit log; other users read nothing).
- A state file is never opened through a symbolic link: ``O_NOFOLLOW`` on the open itself for
  files we open (the audit log, lock files), and for SQLite databases (which open their own
  files) a check of the database and its ``-wal``, ``-shm`` and ``-journal`` companions just
  before, after creating the database file itself with ``O_NOFOLLOW`` when it is new. A
  symlink there is refused, never followed, with an error naming it and its target
  (``UnsafeStateFile``, an OSError: each store handles it as a storage fault). A link planted
  in the state directory could otherwise make the daemon append to, or create, a file of the
  attacker's choice with the service's rights.

Directories may be links (``/var/lib/flux-edge`` -> ``/data/flux-edge`` is a normal set-up).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from flux_edge.errors import FluxError

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "SQLITE_COMPANIONS",
    "UnsafeStateFile",
    "ensure_dir",
    "open_state_file",
    "prepare_sqlite",
]

FILE_MODE = 0o640
DIR_MODE = 0o750
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


class UnsafeStateFile(OSError, FluxError):
    """A state file is a symbolic link (or not a regular file). An OSError (errno ELOOP), so
    every store's handling of storage faults applies to it, with this message as the reason."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(errno.ELOOP, message, str(path))

    def __str__(self) -> str:
        return str(self.strerror)


def _refuse_link(path: Path) -> None:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    raise UnsafeStateFile(
        path,
        f"{path} is a symbolic link (to {target}): state files are never opened through a "
        "link; remove it (the daemon creates the file itself)",
    )


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and its missing parents with mode 0750 (whatever the umask); an existing
    directory is left as it is. Raises OSError."""
    p = Path(path)
    missing: list[Path] = []
    q = p
    while not q.exists():
        missing.append(q)
        if q.parent == q:
            break
        q = q.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, DIR_MODE)  # mkdir's mode is cut by the umask
    return p


def open_state_file(path: str | os.PathLike[str], flags: int, mode: int = FILE_MODE) -> int:
    """``os.open`` for a state file: never through a symbolic link (O_NOFOLLOW), close-on-exec,
    and a file it creates gets ``mode`` (0640) whatever the umask. Raises FluxError for a
    link, OSError otherwise."""
    p = Path(path)
    try:
        fd = os.open(p, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(p):  # the last component is a link
            _refuse_link(p)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeStateFile(p, f"{p} is not a regular file: a state file must be one")
        if flags & os.O_CREAT and st.st_size == 0 and stat.S_IMODE(st.st_mode) != mode \
                and st.st_uid == os.geteuid():
            os.fchmod(fd, mode)  # created now (or empty): the mode the umask cut
    except BaseException:
        os.close(fd)
        raise
    return fd


def prepare_sqlite(path: str | os.PathLike[str]) -> Path:
    """Before ``sqlite3.connect(path)``: refuse a symbolic link at the database or any of its
    companion files, and create a new database file 0640 (SQLite gives its -wal and -shm the
    database's mode). Raises FluxError for a link, OSError otherwise."""
    p = Path(path)
    for candidate in (p, *(Path(f"{p}{suffix}") for suffix in SQLITE_COMPANIONS)):
        if candidate.is_symlink():
            _refuse_link(candidate)
    fd = open_state_file(p, os.O_RDWR | os.O_CREAT)
    os.close(fd)
    return p
