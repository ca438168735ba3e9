"""A small HTTP/1.1 server for the console: keep-alive, optional TLS, request bodies up to
1 MiB (Content-Length only), streamed answers (Server-Sent Events).

Hardened like the metrics server (runtime/metrics.py): the request head is limited to 8 KiB,
a request must arrive within 10 s, an idle keep-alive connection is closed after 15 s, at most
64 connections are served at once. Stdlib only: the whole console costs less memory than
importing an HTTP framework would.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from flux_edge.errors import FluxError

log = logging.getLogger("flux_edge.console")

MAX_HEAD = 8192
MAX_BODY = 1 << 20
REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 15.0
MAX_CONNECTIONS = 64
MAX_REQUESTS = 1000  # per connection

REASONS = {
    200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 411: "Length Required",
    413: "Payload Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    client: str

    def cookie(self, name: str) -> str:
        for part in self.headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return ""


Stream = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    ctype: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: Stream | None = None  # written after the head; the connection closes after it


Handler = Callable[[Request], Awaitable[Response]]


class _Bad(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class HttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        base_headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self._handler = handler
        self._ssl = ssl_context
        self._base = base_headers or []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._streams: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()  # waiting for a keep-alive request

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self._port, limit=MAX_HEAD, ssl=self._ssl,
                backlog=MAX_CONNECTIONS,
                ssl_handshake_timeout=REQUEST_TIMEOUT if self._ssl else None,
            )
        except OSError as exc:
            raise FluxError(
                f"console.host/console.port: cannot listen on {self.host}:{self._port}: "
                f"{exc.strerror or exc}; choose another [console] port or host"
            ) from exc

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self, grace: float = 2.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._closing = True
        # live streams end now; a request being answered (the config apply that asked for
        # this restart) gets ``grace`` seconds to finish its answer
        for task in self._streams:
            task.cancel()
        busy = [t for t in self._tasks if t not in self._streams and t not in self._idle]
        if busy and grace > 0:
            await asyncio.wait(busy, timeout=grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        busy = len(self._tasks) >= MAX_CONNECTIONS
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) else "local"
        try:
            if busy:
                await self._write(writer, Response(503, b"too many connections\n", "text/plain"),
                                  close=True)
                return
            for n in range(MAX_REQUESTS):
                try:
                    self._idle.add(task)
                    try:
                        async with asyncio.timeout(IDLE_TIMEOUT if n else REQUEST_TIMEOUT):
                            first = await reader.readuntil(b"\n")
                    finally:
                        self._idle.discard(task)
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        req, keep = await self._read(first, reader, client)
                except _Bad as bad:
                    await self._write(writer, Response(bad.status, f"{bad}\n".encode(),
                                                       "text/plain"), close=True)
                    return
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                try:
                    resp = await self._handler(req)
                except Exception:
                    log.exception("console: %s %s failed", req.method, req.path)
                    resp = Response(500, b'{"error":"internal error: see the daemon\'s log"}')
                keep = (keep and resp.stream is None and n + 1 < MAX_REQUESTS
                        and not self._closing)
                await self._write(writer, resp, close=not keep, head=req.method == "HEAD")
                if resp.stream is not None:
                    self._streams.add(task)
                    await resp.stream(writer)
                    return
                if not keep:
                    return
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # close(): end normally, or asyncio's stream callback (3.11) logs the cancellation
            # as an unhandled exception
            if not self._closing:
                raise
        finally:
            self._tasks.discard(task)
            self._streams.discard(task)
            self._idle.discard(task)
            writer.close()
            with suppress(OSError, ssl.SSLError, asyncio.CancelledError):
                await writer.wait_closed()

    @staticmethod
    async def _read(first: bytes, reader: asyncio.StreamReader, client: str
                    ) -> tuple[Request, bool]:
        parts = first.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Bad(400, "malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        size = len(first)
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise _Bad(431, "headers longer than 8 KiB") from None
            size += len(line)
            if size > MAX_HEAD:
                raise _Bad(431, "headers longer than 8 KiB")
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise _Bad(400, "malformed header")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if "transfer-encoding" in headers:
            raise _Bad(411, "send a Content-Length, not a chunked body")
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise _Bad(400, "bad Content-Length")
        if int(length) > MAX_BODY:
            raise _Bad(413, "request body larger than 1 MiB")
        if int(length):
            body = await reader.readexactly(int(length))
        path, _, qs = target.partition("?")
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return Request(method, unquote(path), dict(parse_qsl(qs)), headers, body, client), keep

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, *, close: bool,
                     head: bool = False) -> None:
        lines = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Error')}",
                 f"Content-Type: {resp.ctype}"]
        if resp.stream is None:
            lines.append(f"Content-Length: {len(resp.body)}")
        lines += [f"{k}: {v}" for k, v in (*self._base, *resp.headers)]
        lines.append("Connection: close" if close else "Connection: keep-alive")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head and resp.stream is None:
            writer.write(resp.body)
        await writer.drain()
