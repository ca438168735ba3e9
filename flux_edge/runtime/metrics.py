"""Prometheus metrics (text exposition format 0.0.4) and /healthz over a tiny asyncio HTTP server.

No dependency: the format is a few lines of text per metric family, and the server answers two
paths to local scrapers. It is written to survive bad clients: request line and headers are
limited to 8 KiB, a connection gets 5 s in all, at most 16 are served at once, and a failing
``render()`` gives one 500 answer, not a dead endpoint.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress

from flux_edge.errors import FluxError

log = logging.getLogger("flux_edge.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 8192  # bytes of request line + headers
READ_TIMEOUT = 5.0  # seconds one connection may take, reading the request and writing the answer
MAX_CONNECTIONS = 16
LINGER_MAX = 1 << 20  # bytes of a refused request read and dropped before closing

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

Labels = Mapping[str, str]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a fraction, NaN, +Inf, -Inf."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class MetricsWriter:
    """Builds one exposition text, family by family. Names and label names are checked (a bad
    one is a programming error: ValueError); label values and help texts may be any text."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._families: set[str] = set()

    def counter(self, name: str, help: str, samples: Iterable[tuple[Labels, float]]) -> None:
        """A counter. ``name`` is used as given: pass the ``..._total`` name."""
        self._simple(name, "counter", help, samples)

    def gauge(self, name: str, help: str, samples: Iterable[tuple[Labels, float]]) -> None:
        self._simple(name, "gauge", help, samples)

    def histogram(
        self,
        name: str,
        help: str,
        bounds: Sequence[float],
        samples: Iterable[tuple[Labels, Sequence[int], float, int]],
    ) -> None:
        """A histogram with upper bucket ``bounds`` (finite, increasing). Each sample is
        (labels, per-bucket counts NOT cumulative with len(bounds)+1 entries, the last being
        the overflow above the largest bound, sum, count); count must equal sum(counts)."""
        self._head(name, "histogram", help)
        if any(not math.isfinite(b) for b in bounds) or any(
            a >= b for a, b in itertools.pairwise(bounds)
        ):
            raise ValueError(f"metric {name}: bucket bounds must be finite and increasing")
        les = [format_value(float(b)) for b in bounds] + ["+Inf"]
        seen: set[tuple[tuple[str, str], ...]] = set()
        out = self._lines
        for labels, counts, total, count in samples:
            if "le" in labels:
                raise ValueError(f"metric {name}: a histogram cannot have a label named le")
            if len(counts) != len(les):
                raise ValueError(
                    f"metric {name}: {len(counts)} bucket counts for {len(bounds)} bounds "
                    f"(expected {len(les)}: one more for the overflow)"
                )
            if sum(counts) != count:
                raise ValueError(
                    f"metric {name}: count {count} is not the sum of the bucket counts"
                )
            base = self._labels(name, labels, seen)
            sep = "," if base else ""
            cumulative = 0
            for le, n in zip(les, counts, strict=True):
                cumulative += n
                out.append(f'{name}_bucket{{{base}{sep}le="{le}"}} {cumulative}')
            braces = f"{{{base}}}" if base else ""
            out.append(f"{name}_sum{braces} {format_value(total)}")
            out.append(f"{name}_count{braces} {count}")

    def text(self) -> str:
        """The exposition so far (ends with a newline unless empty)."""
        return "\n".join(self._lines) + "\n" if self._lines else ""

    # --- helpers --------------------------------------------------------------------------------

    def _simple(
        self, name: str, kind: str, help: str, samples: Iterable[tuple[Labels, float]]
    ) -> None:
        self._head(name, kind, help)
        seen: set[tuple[tuple[str, str], ...]] = set()
        out = self._lines
        for labels, value in samples:
            base = self._labels(name, labels, seen)
            braces = f"{{{base}}}" if base else ""
            out.append(f"{name}{braces} {format_value(value)}")

    def _head(self, name: str, kind: str, help: str) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}: use [a-zA-Z_:][a-zA-Z0-9_:]*")
        if name in self._families:
            raise ValueError(f"metric {name} is written twice")
        self._families.add(name)
        self._lines.append(f"# HELP {name} {_escape_help(help)}")
        self._lines.append(f"# TYPE {name} {kind}")

    @staticmethod
    def _labels(name: str, labels: Labels, seen: set[tuple[tuple[str, str], ...]]) -> str:
        key = tuple(labels.items())
        if key in seen:
            raise ValueError(f"metric {name}: two samples with the labels {dict(labels)!r}")
        seen.add(key)
        parts = []
        for label, value in key:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"metric {name}: invalid label name {label!r}")
            parts.append(f'{label}="{_escape_label(value)}"')
        return ",".join(parts)


# --- the HTTP server ----------------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class MetricsServer:
    """Serves ``GET /metrics`` (``render()``) and ``GET /healthz`` (``health()`` -> (healthy,
    JSON body): 200 or 503). HEAD works on both. One request per connection."""

    def __init__(
        self,
        host: str,
        port: int,
        render: Callable[[], str],
        health: Callable[[], tuple[bool, dict[str, object]]],
    ) -> None:
        self._host = host
        self._port = port
        self._render = render
        self._health = health
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen. Raises FluxError naming metrics.host/metrics.port when it cannot."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=MAX_HEAD, backlog=MAX_CONNECTIONS
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise FluxError(
                f"metrics.host/metrics.port: cannot listen on {self._host}:{self._port}: "
                f"{reason}; choose another [metrics] port or host, or set enabled = false"
            ) from exc
        log.info("metrics on http://%s:%d/metrics and /healthz", self._host, self.port)

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop listening and drop the connections being served."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # --- one connection -------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        busy = len(self._tasks) >= MAX_CONNECTIONS
        self._tasks.add(task)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                if busy:
                    await self._answer(writer, 503, "text/plain", b"too many connections\n")
                    return
                try:
                    method, path = await self._read_request(reader)
                except _BadRequest as bad:
                    await self._answer(writer, bad.status, "text/plain", f"{bad}\n".encode())
                    await self._linger(reader, writer)
                    return
                status, ctype, body = self._route(method, path)
                await self._answer(
                    writer, status, ctype, body, head=method == "HEAD", allow=status == 405
                )
        except (TimeoutError, ConnectionError):
            pass  # a slow or vanished client: nothing to answer
        finally:
            self._tasks.discard(task)
            writer.close()
            with suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After refusing a request we did not read in full: close our side, then read and drop
        what the client still sends, so that closing does not reset the connection (a reset
        can destroy our answer before the client reads it). Bounded by the connection's time
        limit and by LINGER_MAX bytes."""
        if writer.can_write_eof():
            writer.write_eof()
        dropped = 0
        while dropped < LINGER_MAX:
            chunk = await reader.read(65536)
            if not chunk:
                return
            dropped += len(chunk)

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
        size = 0
        lines: list[bytes] = []
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise _BadRequest(431, "request line or headers longer than 8 KiB") from None
            except asyncio.IncompleteReadError as exc:
                if not exc.partial and not lines:
                    raise ConnectionResetError("no request") from None
                raise _BadRequest(400, "request ended before its headers did") from None
            size += len(line)
            if size > MAX_HEAD:
                raise _BadRequest(431, "request line and headers longer than 8 KiB")
            if line in (b"\r\n", b"\n"):
                break
            lines.append(line)
        if not lines:
            raise _BadRequest(400, "empty request")
        parts = lines[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest(400, "malformed request line")
        method, target = parts[0], parts[1]
        return method, target.split("?", 1)[0]

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path not in ("/metrics", "/healthz"):
            return 404, "text/plain", b"not found: try /metrics or /healthz\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if path == "/metrics":
            try:
                text = self._render()
            except Exception:
                log.exception("rendering the metrics failed")
                return 500, "text/plain", b"rendering the metrics failed: see the daemon's log\n"
            return 200, CONTENT_TYPE, text.encode("utf-8", "replace")
        try:
            healthy, body = self._health()
            data = json.dumps(body, default=str).encode()
        except Exception:
            log.exception("the health check failed")
            return 500, "text/plain", b"the health check failed: see the daemon's log\n"
        return (200 if healthy else 503), "application/json", data + b"\n"

    @staticmethod
    async def _answer(
        writer: asyncio.StreamWriter,
        status: int,
        ctype: str,
        body: bytes,
        *,
        head: bool = False,
        allow: bool = False,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if allow:
            lines.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(body)
        await writer.drain()
