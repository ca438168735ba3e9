"""Who may use the console: the users file, scrypt password hashes, tokens for scripts,
sessions with their CSRF tokens, and login rate limits.

The users file (default ``<state_dir>/console/users.json``) is JSON::

    {"version": 1,
     "users": {"alice": {"role": "operator", "hash": "scrypt$16384$8$1$<salt>$<key>", ...}},
     "tokens": {"<sha256 of the token>": {"name": "grafana", "role": "viewer", ...}}}

It is written 0600 and refused when group or others can read or write it. There is no default
user and no default password: ``flux-edge console user add NAME --role operator``. Tokens are
random 256-bit strings, so a SHA-256 digest is enough to keep them; passwords get scrypt
(N=2^14, r=8, p=1: 16 MiB and ~50 ms a check, run off the event loop).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flux_edge.errors import FluxError

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")
MIN_PASSWORD = 10
_N, _R, _P = 1 << 14, 8, 1
_MAXMEM = 64 * 1024 * 1024
TOKEN_PREFIX = "fxe_"


class ConsoleAuthError(FluxError):
    """The users file is missing, unreadable, too open or malformed; a bad user or password."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM, dklen=32)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        algo, n, r, p, salt, key = encoded.split("$")
        if algo != "scrypt":
            return False
        want = _unb64(key)
        got = hashlib.scrypt(
            password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
            maxmem=_MAXMEM, dklen=len(want),
        )
    except ValueError:
        return False
    return hmac.compare_digest(got, want)


_DUMMY = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + _b64(b"\0" * 32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: a logged-in user or a token's name."""

    name: str
    role: Role
    via: Literal["session", "token"]

    @property
    def operator(self) -> bool:
        return self.role == "operator"


# --- the users file --------------------------------------------------------------------------


def _empty() -> dict[str, Any]:
    return {"version": 1, "users": {}, "tokens": {}}


def read_users(path: Path, *, strict: bool = True) -> dict[str, Any]:
    """The users file's content ({} sections when it does not exist). ``strict``: refuse a
    file group or others may read or write (ConsoleAuthError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _empty()
    except OSError as exc:
        raise ConsoleAuthError(f"console users file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if strict and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConsoleAuthError(
                f"console users file {path} is open to group or others "
                f"(mode {stat.S_IMODE(mode):o}): chmod 600 {path}"
            )
        raw = f.read()
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise ConsoleAuthError(f"console users file {path}: not valid JSON ({exc})") from exc
    data.setdefault("users", {})
    data.setdefault("tokens", {})
    return data


def write_users(path: Path, data: dict[str, Any]) -> None:
    """Replace the users file atomically, mode 0600. Run as root beside a directory owned by
    the service user, the file is given to that user (the daemon must read it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        parent = path.parent.stat()
        if os.geteuid() == 0 and parent.st_uid != 0:
            os.chown(tmp, parent.st_uid, parent.st_gid)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def add_user(path: Path, name: str, role: Role, password: str) -> None:
    if not name or not all(c.isalnum() or c in "._-@" for c in name) or len(name) > 64:
        raise ConsoleAuthError(f"user name {name!r}: use letters, digits and . _ - @ (64 at most)")
    if role not in ROLES:
        raise ConsoleAuthError(f"role {role!r}: one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise ConsoleAuthError(f"a password needs at least {MIN_PASSWORD} characters")
    data = read_users(path)
    data["users"][name] = {"role": role, "hash": hash_password(password), "created": time.time()}
    write_users(path, data)


def remove_user(path: Path, name: str) -> bool:
    data = read_users(path)
    found = data["users"].pop(name, None) is not None
    if found:
        write_users(path, data)
    return found


def add_token(path: Path, name: str, role: Role) -> str:
    """A new token for scripts; only its digest is kept, so it is shown once."""
    if role not in ROLES:
        raise ConsoleAuthError(f"role {role!r}: one of {', '.join(ROLES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    data = read_users(path)
    data["tokens"] = {d: t for d, t in data["tokens"].items() if t.get("name") != name}
    data["tokens"][token_digest(token)] = {"name": name, "role": role, "created": time.time()}
    write_users(path, data)
    return token


def remove_token(path: Path, name: str) -> bool:
    data = read_users(path)
    kept = {d: t for d, t in data["tokens"].items() if t.get("name") != name}
    found = len(kept) != len(data["tokens"])
    if found:
        data["tokens"] = kept
        write_users(path, data)
    return found


# --- sessions and rate limits ----------------------------------------------------------------


@dataclass(slots=True)
class Session:
    id: str
    user: str
    role: Role
    csrf: str
    created: float
    seen: float


@dataclass(slots=True)
class LoginLimiter:
    """At most ``attempts`` failed logins per key (client address, user name) per ``window``
    seconds; then refused until the oldest failure leaves the window."""

    attempts: int
    window: float
    clock: Callable[[], float] = time.monotonic
    _fails: dict[str, deque[float]] = field(default_factory=dict)

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login for these keys may be tried again (0: now)."""
        now = self.clock()
        wait = 0.0
        for key in keys:
            q = self._fails.get(key)
            if q is None:
                continue
            while q and now - q[0] >= self.window:
                q.popleft()
            if not q:
                del self._fails[key]
            elif len(q) >= self.attempts:
                wait = max(wait, q[0] + self.window - now)
        return wait

    def failed(self, *keys: str) -> None:
        now = self.clock()
        for key in keys:
            self._fails.setdefault(key, deque(maxlen=self.attempts)).append(now)
        if len(self._fails) > 10_000:  # a spray of addresses: forget the quietest
            for key in list(self._fails)[:5000]:
                del self._fails[key]

    def succeeded(self, key: str) -> None:
        self._fails.pop(key, None)


class Authority:
    """Checks passwords and tokens against the users file (re-read when it changes) and keeps
    the sessions (in memory: a restart logs everybody out)."""

    MAX_SESSIONS = 256

    def __init__(
        self,
        path: Path,
        *,
        session_timeout: float,
        idle_timeout: float,
        attempts: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.session_timeout = session_timeout
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.limiter = LoginLimiter(attempts, window, clock)
        self.sessions: dict[str, Session] = {}
        self._data: dict[str, Any] = _empty()
        self._stamp: tuple[int, int] | None = None
        self.local_token = ""  # a viewer token for `flux-edge status` on this machine

    def users(self) -> dict[str, Any]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            self._data = read_users(self.path)
            self._stamp = stamp
        return self._data

    def check_password(self, user: str, password: str) -> Role | None:
        """The user's role if the password is right (slow: call it off the loop)."""
        entry = self.users()["users"].get(user)
        if not isinstance(entry, dict):
            verify_password(password, _DUMMY)  # the same time for an unknown user
            return None
        if not verify_password(password, str(entry.get("hash", ""))):
            return None
        role = entry.get("role")
        return role if role in ROLES else None

    def check_token(self, token: str) -> Principal | None:
        if self.local_token and hmac.compare_digest(token, self.local_token):
            return Principal("local", "viewer", "token")
        entry = self.users()["tokens"].get(token_digest(token))
        if not isinstance(entry, dict) or entry.get("role") not in ROLES:
            return None
        return Principal(str(entry.get("name", "token")), entry["role"], "token")

    def new_session(self, user: str, role: Role) -> Session:
        now = self.clock()
        if len(self.sessions) >= self.MAX_SESSIONS:
            oldest = min(self.sessions.values(), key=lambda s: s.seen)
            del self.sessions[oldest.id]
        s = Session(secrets.token_urlsafe(32), user, role, secrets.token_urlsafe(32), now, now)
        self.sessions[s.id] = s
        return s

    def session(self, sid: str) -> Session | None:
        s = self.sessions.get(sid)
        if s is None:
            return None
        now = self.clock()
        if now - s.created > self.session_timeout or now - s.seen > self.idle_timeout:
            del self.sessions[sid]
            return None
        # the user may have been removed or given another role since the login
        entry = self.users()["users"].get(s.user)
        if not isinstance(entry, dict) or entry.get("role") != s.role:
            del self.sessions[sid]
            return None
        s.seen = now
        return s

    def end(self, sid: str) -> None:
        self.sessions.pop(sid, None)
