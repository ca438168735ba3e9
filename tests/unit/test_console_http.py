"""The console's HTTP server and pure helpers: bad requests answered, bodies bounded,
keep-alive, redaction of secrets, the trend ring, the SSE hub."""

from __future__ import annotations

import asyncio

from flux_edge.console.http import HttpServer, Request, Response
from flux_edge.console.live import Hub, Trends
from flux_edge.console.views import REDACTED, redact
from flux_edge.model import Measurement


async def _echo(req: Request) -> Response:
    return Response(200, f"{req.method} {req.path} {len(req.body)}".encode(), "text/plain")


async def _exchange(port: int, data: bytes, n: int = 1) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = []
    for _ in range(n):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        out.append(head + await reader.readexactly(length))
    writer.close()
    return out


def test_server_keep_alive_and_limits() -> None:
    async def go() -> None:
        server = HttpServer("127.0.0.1", 0, _echo)
        await server.start()
        try:
            two = await _exchange(server.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"POST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 2)
            assert two[0].endswith(b"GET /a 0") and b"keep-alive" in two[0]
            assert two[1].endswith(b"POST /b 3")
            (big,) = await _exchange(server.port, b"POST / HTTP/1.1\r\nContent-Length: "
                                     + str(2 << 20).encode() + b"\r\n\r\n")
            assert big.startswith(b"HTTP/1.1 413")
            (chunked,) = await _exchange(server.port, b"POST / HTTP/1.1\r\n"
                                         b"Transfer-Encoding: chunked\r\n\r\n")
            assert chunked.startswith(b"HTTP/1.1 411")
            (bad,) = await _exchange(server.port, b"NONSENSE\r\n\r\n")
            assert bad.startswith(b"HTTP/1.1 400")
            (long,) = await _exchange(server.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 9000
                                      + b"\r\n\r\n")
            assert long.startswith(b"HTTP/1.1 431")
        finally:
            await server.close()

    asyncio.run(go())


def test_redact() -> None:
    cfg = {"uplink": {"password": "s3cret", "username": "u", "tls": {"key_file": "/k.pem"}},
           "plugins": {"x": {"config": {"api_key": "abc", "token": "", "rate": 3}}}}
    out = redact(cfg)
    assert out["uplink"]["password"] == REDACTED and out["uplink"]["username"] == "u"
    assert out["uplink"]["tls"]["key_file"] == "/k.pem"  # a path, not a secret
    assert out["plugins"]["x"]["config"] == {"api_key": REDACTED, "token": "", "rate": 3}


def m(name: str, value: float | str, ts: float, quality: str = "good") -> Measurement:
    return Measurement(device="d", name=name, value=value, ts=ts, quality=quality)  # type: ignore


def test_trend_keeps_one_point_per_step() -> None:
    t = Trends(span=60, points=6)  # one point per 10 s
    t.add([m("x", float(i), float(i)) for i in range(100)])
    t.add([m("s", "text", 0.0), m("x", 1e9, 200.0, "bad")])
    assert [p[0] for p in t.of("d", "x")] == [40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
    assert t.of("d", "s") == []


def test_hub_does_nothing_without_clients() -> None:
    async def go() -> None:
        hub = Hub(flush_s=0.01)
        hub.measurements([m("x", 1.0, 1.0)])
        assert hub._timer is None
        c = hub.join()
        hub.measurements([m("x", 1.0, 1.0), m("x", 2.0, 2.0)])
        await asyncio.wait_for(c.event.wait(), 1)
        assert len(c.queue) == 1 and b'"value":2.0' in c.queue[0]  # coalesced: the latest
        hub.leave(c)
        assert not hub.clients

    asyncio.run(go())
