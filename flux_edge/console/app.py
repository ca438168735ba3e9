"""The console: its routes under /api/v1, the page and its assets, login and sessions, the live
stream (Server-Sent Events). docs/console.md lists every route.

Every request is authenticated: a session cookie (``fx_session``: HttpOnly, Secure,
SameSite=Strict) from ``POST /api/v1/login``, or ``Authorization: Bearer <token>`` for
scripts. Every state-changing request made with a session carries the session's CSRF token in
``X-CSRF-Token``; requests with a token need none (no ambient credential to abuse). Viewers
read; operators also act.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux_edge.console import operate, views
from flux_edge.console.auth import Authority, Principal
from flux_edge.console.checks import is_loopback
from flux_edge.console.http import HttpServer, Request, Response
from flux_edge.console.live import Hub, LogBuffer, Trends, frame
from flux_edge.errors import FluxError
from flux_edge.model import Measurement

if TYPE_CHECKING:
    from flux_edge.runtime.daemon import Daemon

log = logging.getLogger("flux_edge.console")

COOKIE = "fx_session"
STATUS_EVERY = 2.0  # seconds between two status events on a live stream
KEEPALIVE = 15.0
_ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
           "/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/app.css": ("app.css", "text/css; charset=utf-8")}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_ACT = re.compile(r"/api/v1/actuators/([^/]+)/(override|release)\Z")
_PLUG = re.compile(r"/api/v1/plugins/([^/]+)/retry\Z")


def _json(data: Any, status: int = 200, headers: list[tuple[str, str]] | None = None
          ) -> Response:
    return Response(status, json.dumps(data, default=str).encode(), "application/json",
                    headers or [])


def _error(status: int, message: str, **extra: Any) -> Response:
    return _json({"error": message, **extra}, status)


def local_token_path(state_dir: str) -> Path:
    return Path(state_dir) / "console" / "local.token"


class Console:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        cfg = daemon.config.console
        self.cfg = cfg
        state = Path(daemon.config.daemon.state_dir)
        self.dir = state / "console"
        users = Path(cfg.users_file) if cfg.users_file else self.dir / "users.json"
        self.auth = Authority(users, session_timeout=cfg.session_timeout,
                              idle_timeout=cfg.idle_timeout, attempts=cfg.login_attempts,
                              window=cfg.login_window)
        self.trends = Trends(cfg.trend, cfg.trend_points)
        self.hub = Hub()
        self.logbuf = LogBuffer(cfg.log_lines, self.hub)
        self.tls = cfg.tls == "on" or (cfg.tls == "auto" and not is_loopback(cfg.host))
        self.overrides: dict[str, dict[str, Any]] = getattr(daemon, "overrides", {})
        self.server: HttpServer | None = None
        self._assets: dict[str, bytes] = {}
        self._op_lock = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------------------

    def observe(self, source: str, ms: list[Measurement]) -> None:
        self.trends.add(ms)
        if self.hub.clients:
            self.hub.measurements(ms)

    async def start(self) -> None:
        ctx = None
        headers = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                   ("X-Frame-Options", "DENY"), ("Cache-Control", "no-store")]
        if self.tls:
            from flux_edge.console.tls import fingerprint, self_signed, server_context

            if self.cfg.cert_file:
                cert = Path(self.cfg.cert_file)
                key = Path(self.cfg.key_file) if self.cfg.key_file else None
            else:
                cert, key = await asyncio.to_thread(self_signed, self.dir, self.cfg.host)
            ctx = server_context(cert, key)
            headers.append(("Strict-Transport-Security", "max-age=31536000"))
            log.info("console certificate SHA-256 fingerprint %s", fingerprint(cert))
        self.auth.users()  # a file open to others is refused now, not at the first login
        if not self.auth.users()["users"] and not self.auth.users()["tokens"]:
            log.warning("console: no users yet in %s: add one with `flux-edge console user "
                        "add NAME --role operator`", self.auth.path)
        self._write_local_token()
        self.server = HttpServer(self.cfg.host, self.cfg.port, self.handle, ssl_context=ctx,
                                 base_headers=headers)
        await self.server.start()
        self.hub.bind()
        if self.cfg.log_lines:
            logging.getLogger().addHandler(self.logbuf)
        observers = self.daemon.observers
        if observers is not None and self.observe not in observers.measurements:
            observers.measurements.append(self.observe)
        self.pipeline_changed()
        scheme = "https" if self.tls else "http"
        log.info("console on %s://%s:%d/", scheme, self.cfg.host, self.server.port)

    def pipeline_changed(self) -> None:
        """A new pipeline (start, reload): held actuators stay held."""
        if self.daemon.pipeline is not None:
            operate.hold(self.daemon.pipeline, self.overrides)

    async def close(self) -> None:
        logging.getLogger().removeHandler(self.logbuf)
        observers = self.daemon.observers
        if observers is not None and self.observe in observers.measurements:
            observers.measurements.remove(self.observe)
        if self.server is not None:
            await self.server.close()
            self.server = None

    def _write_local_token(self) -> None:
        """A viewer token only this machine's service user (and root) can read, for
        `flux-edge status`; a new one each start."""
        import secrets

        token = "fxl_" + secrets.token_urlsafe(32)
        path = local_token_path(self.daemon.config.daemon.state_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            tmp = path.with_name(".local.token.tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("console: cannot write %s (%s): `flux-edge status` needs --token",
                        path, exc.strerror)
            return
        self.auth.local_token = token

    # --- requests ------------------------------------------------------------------------------

    def _who(self, req: Request) -> tuple[Principal | None, str]:
        """(principal, the session's CSRF token or "" for a token)."""
        authz = req.headers.get("authorization", "")
        if authz.lower().startswith("bearer "):
            return self.auth.check_token(authz[7:].strip()), ""
        sid = req.cookie(COOKIE)
        if sid:
            s = self.auth.session(sid)
            if s is not None:
                return Principal(s.user, s.role, "session"), s.csrf
        return None, ""

    def _same_origin(self, req: Request) -> bool:
        origin = req.headers.get("origin")
        if origin is None:  # not sent by browsers for same-origin GETs; the CSRF token decides
            return True
        host = req.headers.get("host", "")
        return origin in (f"https://{host}", f"http://{host}")

    async def handle(self, req: Request) -> Response:
        path = req.path
        if path in _ASSETS and req.method in ("GET", "HEAD"):
            return self._asset(path)
        if not path.startswith("/api/v1/"):
            return _error(404, "not found")
        if self.daemon.pipeline is not None:
            operate.hold(self.daemon.pipeline, self.overrides)
        if path == "/api/v1/login" and req.method == "POST":
            return await self._login(req)
        who, csrf = self._who(req)
        if who is None:
            return _error(401, "log in first (POST /api/v1/login) or send a token")
        if req.method in ("GET", "HEAD"):
            return self._read(req, who, csrf)
        if req.method != "POST":
            return _error(405, "only GET and POST")
        if not self._same_origin(req):
            return _error(403, "cross-origin request refused")
        if who.via == "session":
            sent = req.headers.get("x-csrf-token", "")
            if not sent or not hmac.compare_digest(sent, csrf):
                return _error(403, "missing or wrong CSRF token (X-CSRF-Token)")
        if path == "/api/v1/logout":
            self.auth.end(req.cookie(COOKIE))
            return _json({"ok": True}, headers=[("Set-Cookie", self._cookie("", 0))])
        if path == "/api/v1/config/check":
            body = self._body(req)
            ok, problems = operate.check_text(self.daemon, str(body.get("text", "")))
            return _json({"ok": ok, "problems": problems})
        if not who.operator:
            log.warning("console: %s (viewer) tried %s", who.name, path)
            return _error(403, f"{who.name} is a viewer: operator role needed")
        return await self._operate(req, who)

    def _body(self, req: Request) -> dict[str, Any]:
        try:
            data = json.loads(req.body or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _cookie(self, value: str, max_age: int) -> str:
        return (f"{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; "
                "SameSite=Strict")

    async def _login(self, req: Request) -> Response:
        if not self._same_origin(req):
            return _error(403, "cross-origin request refused")
        if not req.headers.get("content-type", "").startswith("application/json"):
            return _error(415, "send JSON: {\"user\": ..., \"password\": ...}")
        body = self._body(req)
        user, password = str(body.get("user", "")), str(body.get("password", ""))
        keys = (f"ip:{req.client}", f"user:{user}")
        wait = self.auth.limiter.retry_after(*keys)
        if wait > 0:
            log.warning("console: login for %r from %s refused: too many failures", user,
                        req.client)
            return _json({"error": f"too many failed logins: try again in {wait:.0f} s",
                          "retry_after_s": round(wait)}, 429,
                         [("Retry-After", str(max(int(wait), 1)))])
        try:
            role = await asyncio.to_thread(self.auth.check_password, user, password)
        except FluxError as exc:
            log.error("console: %s", exc)
            return _error(503, "the users file cannot be read: see the daemon's log")
        if role is None:
            self.auth.limiter.failed(*keys)
            log.warning("console: failed login for %r from %s", user, req.client)
            return _error(401, "wrong user name or password")
        self.auth.limiter.succeeded(f"user:{user}")
        s = self.auth.new_session(user, role)
        log.info("console: %s (%s) logged in from %s", user, role, req.client)
        return _json({"user": user, "role": role, "csrf": s.csrf},
                     headers=[("Set-Cookie", self._cookie(s.id, int(self.cfg.session_timeout)))])

    def _read(self, req: Request, who: Principal, csrf: str) -> Response:
        d = self.daemon
        path = req.path[len("/api/v1/"):]
        if path == "session":
            return _json({"user": who.name, "role": who.role, "csrf": csrf, "via": who.via})
        if path == "events":
            return self._events(req)
        if path == "config/file":
            if not who.operator:
                return _error(403, "operator role needed to read the config file")
            try:
                text = Path(d.config.path).read_text()
            except OSError as exc:
                return _error(500, f"cannot read {d.config.path}: {exc.strerror}")
            return _json({"path": d.config.path, "text": text})
        getters: dict[str, Any] = {
            "summary": lambda: views.summary(d),
            "devices": lambda: views.devices(d, self.trends),
            "rules": lambda: views.rules(d),
            "actuators": lambda: views.actuators(d),
            "audit": lambda: views.audit(d, int(req.query.get("limit", "100") or 100),
                                         req.query.get("actuator", "")),
            "plugins": lambda: views.plugins(d),
            "uplink": lambda: views.uplink(d),
            "config": lambda: views.config(d),
            "logs": lambda: views.logs(self.logbuf, int(req.query.get("after", "0") or 0)),
            "status": lambda: views.status(d),
        }
        get = getters.get(path)
        if get is None:
            return _error(404, f"no such resource: /api/v1/{path}")
        try:
            return _json(get())
        except ValueError as exc:
            return _error(400, str(exc))

    async def _operate(self, req: Request, who: Principal) -> Response:
        body = self._body(req)
        reason = str(body.get("reason", ""))
        d = self.daemon
        try:
            async with self._op_lock:
                m = _ACT.match(req.path)
                if m and m.group(2) == "override":
                    out = await operate.override(d, self.overrides, m.group(1),
                                                 state=str(body.get("state", "")),
                                                 reason=reason, user=who.name)
                elif m:
                    out = operate.release(d, self.overrides, m.group(1), reason, who.name)
                elif (m := _PLUG.match(req.path)) is not None:
                    out = operate.retry_plugin(d, m.group(1), reason, who.name)
                elif req.path == "/api/v1/config/apply":
                    out = await operate.apply_text(d, str(body.get("text", "")), reason,
                                                   who.name)
                    self.pipeline_changed()
                else:
                    return _error(404, "no such action")
        except operate.OperateError as exc:
            log.warning("console: %s: %s refused: %s", who.name, req.path, exc)
            return _error(exc.status, str(exc), **exc.extra)
        log.info("console: %s: %s done (%s)", who.name, req.path, reason)
        return _json(out)

    def _asset(self, path: str) -> Response:
        name, ctype = _ASSETS[path]
        body = self._assets.get(name)
        if body is None:
            body = resources.files("flux_edge.console").joinpath("static", name).read_bytes()
            self._assets[name] = body
        return Response(200, body, ctype, [("Content-Security-Policy", _CSP)])

    # --- the live stream -----------------------------------------------------------------------

    def _events(self, req: Request) -> Response:
        if len(self.hub.clients) >= self.cfg.max_clients:
            return _error(503, f"{self.cfg.max_clients} live streams already open")
        client = self.hub.join()
        d = self.daemon

        async def stream(writer: asyncio.StreamWriter) -> None:
            loop = asyncio.get_running_loop()
            next_status = loop.time()
            last_write = loop.time()
            try:
                writer.write(b"retry: 2000\n\n")
                while True:
                    now = loop.time()
                    if now >= next_status:
                        client.queue.append(frame("status", views.status(d)))
                        next_status = now + STATUS_EVERY
                    while client.queue:
                        writer.write(client.queue.popleft())
                        last_write = now
                    if now - last_write >= KEEPALIVE:
                        writer.write(b": keep-alive\n\n")
                        last_write = now
                    await writer.drain()
                    client.event.clear()
                    try:
                        async with asyncio.timeout(max(next_status - loop.time(), 0.01)):
                            await client.event.wait()
                    except TimeoutError:
                        pass
            except (ConnectionError, OSError):
                pass
            finally:
                self.hub.leave(client)

        return Response(200, b"", "text/event-stream", [("X-Accel-Buffering", "no")],
                        stream=stream)

