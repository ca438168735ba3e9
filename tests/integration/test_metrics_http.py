"""Prometheus exposition and the metrics/healthz HTTP server.

The writer's output is read back by a strict parser of text format 0.0.4 written here (not the
writer's code run backwards), with hypothesis supplying hostile label values and help texts.
The server runs on 127.0.0.1 (port 0) in an event loop on a thread of its own; the tests are
its clients, speaking real HTTP through http.client and raw sockets.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_edge.errors import FluxError
from flux_edge.runtime import metrics
from flux_edge.runtime.metrics import CONTENT_TYPE, MetricsServer, MetricsWriter

# --- a strict reader of the text format ---------------------------------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|NaN|[+-]Inf")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


@dataclass
class Family:
    name: str
    help: str
    type: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


class ParseError(AssertionError):
    pass


def _unescape(text: str, specials: dict[str, str]) -> str:
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text) or text[i + 1] not in specials:
                raise ParseError(f"bad escape in {text!r}")
            out.append(specials[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _labels(line: str, pos: int) -> tuple[dict[str, str], int]:
    labels: dict[str, str] = {}
    pos += 1  # "{"
    while line[pos] != "}":
        m = _LABEL.match(line, pos)
        if not m:
            raise ParseError(f"bad label name at {pos}: {line!r}")
        if line[m.end() : m.end() + 2] != '="':
            raise ParseError(f'expected =" after label name: {line!r}')
        pos = m.end() + 2
        value = []
        while line[pos] != '"':
            if line[pos] == "\\":
                nxt = line[pos + 1]
                if nxt not in '\\"n':
                    raise ParseError(f"bad escape \\{nxt} in {line!r}")
                value.append({"\\": "\\", '"': '"', "n": "\n"}[nxt])
                pos += 2
            else:
                value.append(line[pos])
                pos += 1
        if m.group() in labels:
            raise ParseError(f"label {m.group()} twice: {line!r}")
        labels[m.group()] = "".join(value)
        pos += 1
        if line[pos] == ",":
            pos += 1
        elif line[pos] != "}":
            raise ParseError(f"expected , or }} at {pos}: {line!r}")
    return labels, pos + 1


def parse_exposition(text: str) -> dict[str, Family]:
    """Every family in ``text``; raises ParseError on anything format 0.0.4 does not allow."""
    if text and not text.endswith("\n"):
        raise ParseError("text does not end with a newline")
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text.split("\n")[:-1]:
        if line.startswith("# HELP "):
            name, sep, rest = line[7:].partition(" ")
            if not sep or not _NAME.fullmatch(name) or name in families:
                raise ParseError(f"bad HELP line {line!r}")
            current = families[name] = Family(name, _unescape(rest, {"\\": "\\", "n": "\n"}))
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            if current is None or current.name != name or kind not in _TYPES or current.samples:
                raise ParseError(f"bad TYPE line {line!r}")
            current.type = kind
        else:
            m = _NAME.match(line)
            if not m or current is None:
                raise ParseError(f"bad sample line {line!r}")
            name, pos = m.group(), m.end()
            allowed = {current.name}
            if current.type == "histogram":
                allowed = {current.name + s for s in ("_bucket", "_sum", "_count")}
            if name not in allowed:
                raise ParseError(f"sample {name} outside its family {current.name}")
            labels: dict[str, str] = {}
            if line[pos : pos + 1] == "{":
                labels, pos = _labels(line, pos)
            if line[pos : pos + 1] != " " or not _VALUE.fullmatch(line[pos + 1 :]):
                raise ParseError(f"bad value in {line!r}")
            current.samples.append((name, labels, float(line[pos + 1 :])))
    return families


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# --- the writer ---------------------------------------------------------------------------------


def test_writer_output_is_exact() -> None:
    w = MetricsWriter()
    w.counter(
        "flux_messages_total",
        "Messages per stage.",
        [({"stage": "plugins"}, 12), ({"stage": "rules"}, 3.0)],
    )
    w.gauge("flux_loop_lag_seconds", "Event-loop lag.", [({}, 0.0125)])
    w.histogram(
        "flux_plugin_call_seconds",
        "Plugin call wall time.",
        [0.001, 0.01],
        [({"plugin": "a"}, [2, 0, 1], 1.5, 3), ({}, [0, 0, 0], 0.0, 0)],
    )
    assert w.text() == (
        "# HELP flux_messages_total Messages per stage.\n"
        "# TYPE flux_messages_total counter\n"
        'flux_messages_total{stage="plugins"} 12\n'
        'flux_messages_total{stage="rules"} 3\n'
        "# HELP flux_loop_lag_seconds Event-loop lag.\n"
        "# TYPE flux_loop_lag_seconds gauge\n"
        "flux_loop_lag_seconds 0.0125\n"
        "# HELP flux_plugin_call_seconds Plugin call wall time.\n"
        "# TYPE flux_plugin_call_seconds histogram\n"
        'flux_plugin_call_seconds_bucket{plugin="a",le="0.001"} 2\n'
        'flux_plugin_call_seconds_bucket{plugin="a",le="0.01"} 2\n'
        'flux_plugin_call_seconds_bucket{plugin="a",le="+Inf"} 3\n'
        'flux_plugin_call_seconds_sum{plugin="a"} 1.5\n'
        'flux_plugin_call_seconds_count{plugin="a"} 3\n'
        'flux_plugin_call_seconds_bucket{le="0.001"} 0\n'
        'flux_plugin_call_seconds_bucket{le="0.01"} 0\n'
        'flux_plugin_call_seconds_bucket{le="+Inf"} 0\n'
        "flux_plugin_call_seconds_sum 0\n"
        "flux_plugin_call_seconds_count 0\n"
    )
    parse_exposition(w.text())
    assert MetricsWriter().text() == ""


def test_special_values_and_escapes() -> None:
    w = MetricsWriter()
    w.gauge(
        "g",
        'back\\slash "quoted"\nsecond line',
        [
            ({"v": 'a\\b"c\nd'}, math.nan),
            ({"v": "inf"}, math.inf),
            ({"v": "-inf"}, -math.inf),
            ({"v": "big"}, 1e300),
        ],
    )
    lines = w.text().splitlines()
    assert lines[0] == '# HELP g back\\\\slash "quoted"\\nsecond line'
    assert lines[2] == 'g{v="a\\\\b\\"c\\nd"} NaN'
    assert lines[3:] == ['g{v="inf"} +Inf', 'g{v="-inf"} -Inf', 'g{v="big"} 1e+300']


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: w.gauge("1bad", "", []), "invalid metric name '1bad'"),
        (lambda w: w.gauge("bad-name", "", []), "invalid metric name"),
        (lambda w: w.gauge("g", "", [({"bad-label": "x"}, 1)]), "invalid label name"),
        (lambda w: w.gauge("g", "", [({"__reserved": "x"}, 1)]), "invalid label name"),
        (lambda w: w.gauge("g", "", [({"a": "x"}, 1), ({"a": "x"}, 2)]), "two samples"),
        (lambda w: (w.gauge("g", "", []), w.counter("g", "", [])), "written twice"),
        (lambda w: w.histogram("h", "", [2, 1], []), "increasing"),
        (lambda w: w.histogram("h", "", [1, math.inf], []), "finite"),
        (lambda w: w.histogram("h", "", [1], [({}, [1], 0.0, 1)]), "1 bucket counts"),
        (lambda w: w.histogram("h", "", [1], [({}, [1, 1], 0.0, 3)]), "not the sum"),
        (lambda w: w.histogram("h", "", [1], [({"le": "x"}, [0, 0], 0.0, 0)]), "named le"),
    ],
)
def test_writer_refuses_what_the_format_forbids(
    call: Callable[[MetricsWriter], object], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        call(MetricsWriter())


label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True).filter(
    lambda s: not s.startswith("__")
)
label_sets = st.dictionaries(label_names, st.text(), max_size=4)
values = st.one_of(st.floats(), st.integers(-(2**53), 2**53))


@given(
    help_text=st.text(),
    samples=st.lists(st.tuples(label_sets, values), max_size=5, unique_by=lambda s: str(s[0])),
)
def test_any_label_value_round_trips(
    help_text: str, samples: list[tuple[dict[str, str], float]]
) -> None:
    w = MetricsWriter()
    w.gauge("flux_g", help_text, samples)
    w.counter("flux_c_total", help_text, samples)
    fams = parse_exposition(w.text())
    for name, kind in (("flux_g", "gauge"), ("flux_c_total", "counter")):
        fam = fams[name]
        assert fam.help == help_text and fam.type == kind
        assert len(fam.samples) == len(samples)
        for (got_name, got_labels, got_value), (labels, value) in zip(
            fam.samples, samples, strict=True
        ):
            assert got_name == name and got_labels == labels
            assert same(got_value, float(value))


@given(
    bounds=st.lists(st.floats(allow_nan=False, allow_infinity=False), unique=True, max_size=6).map(
        sorted
    ),
    labels=label_sets.filter(lambda d: "le" not in d),
    data=st.data(),
)
def test_histograms_parse_back(
    bounds: list[float], labels: dict[str, str], data: st.DataObject
) -> None:
    counts = data.draw(
        st.lists(st.integers(0, 10**9), min_size=len(bounds) + 1, max_size=len(bounds) + 1)
    )
    total = data.draw(st.floats(allow_nan=False, allow_infinity=False))
    w = MetricsWriter()
    w.histogram("flux_h_seconds", "h", bounds, [(labels, counts, total, sum(counts))])
    fam = parse_exposition(w.text())["flux_h_seconds"]
    buckets = [s for s in fam.samples if s[0] == "flux_h_seconds_bucket"]
    les = [float(s[1]["le"]) for s in buckets]
    assert les == [*bounds, math.inf]
    assert all({k: v for k, v in s[1].items() if k != "le"} == labels for s in buckets)
    cumulative = [s[2] for s in buckets]
    assert cumulative == [float(sum(counts[: i + 1])) for i in range(len(counts))]
    assert fam.samples[-2] == ("flux_h_seconds_sum", labels, total)
    assert fam.samples[-1] == ("flux_h_seconds_count", labels, float(sum(counts)))


# --- the HTTP server ----------------------------------------------------------------------------


class Served:
    """A MetricsServer on 127.0.0.1:0 in an event loop on its own thread."""

    def __init__(self) -> None:
        self.body = "# HELP up Up.\n# TYPE up gauge\nup 1\n"
        self.fail: Exception | None = None
        self.healthy = True
        self.renders = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = MetricsServer("127.0.0.1", 0, self.render, self.health)
        self.call(self.server.start())
        self.port = self.server.port

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def render(self) -> str:
        self.renders += 1
        if self.fail is not None:
            raise self.fail
        return self.body

    def health(self) -> tuple[bool, dict[str, object]]:
        return self.healthy, {"healthy": self.healthy, "problems": [] if self.healthy else ["x"]}

    def request(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def raw(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return s

    def close(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.close()


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.integration
def test_metrics(served: Served) -> None:
    assert served.port > 0
    status, headers, body = served.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8" == CONTENT_TYPE
    assert headers["connection"] == "close"
    assert body.decode() == served.body
    assert parse_exposition(body.decode())["up"].samples == [("up", {}, 1.0)]
    status, headers, body = served.request("HEAD", "/metrics")
    assert status == 200 and body == b""
    assert headers["content-length"] == str(len(served.body))
    status, _, body = served.request("GET", "/metrics?debug=1")
    assert status == 200 and body.decode() == served.body


@pytest.mark.integration
def test_healthz(served: Served) -> None:
    status, headers, body = served.request("GET", "/healthz")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"healthy": True, "problems": []}
    served.healthy = False
    status, _, body = served.request("GET", "/healthz")
    assert status == 503
    assert json.loads(body) == {"healthy": False, "problems": ["x"]}
    status, _, body = served.request("HEAD", "/healthz")
    assert status == 503 and body == b""


@pytest.mark.integration
def test_unknown_paths_and_methods(served: Served) -> None:
    assert served.request("GET", "/")[0] == 404
    assert served.request("GET", "/metrics/extra")[0] == 404
    status, headers, _ = served.request("POST", "/metrics")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert served.request("DELETE", "/healthz")[0] == 405
    with served.raw() as s:
        s.sendall(b"garbage\r\n\r\n")
        assert status_of(read_all(s)) == 400
    assert served.renders == 0


@pytest.mark.integration
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n",  # one huge header
        b"GET /metrics HTTP/1.1\r\n" + b"X-Many: 0123456789\r\n" * 600 + b"\r\n",  # 12 KiB of them
        b"GET /" + b"m" * 9000 + b" HTTP/1.1\r\n\r\n",  # a huge request line
    ],
)
def test_oversized_requests_are_refused(served: Served, request_bytes: bytes) -> None:
    with served.raw() as s:
        s.sendall(request_bytes)
        response = read_all(s)
    assert status_of(response) == 431, response[:200]
    assert served.renders == 0
    assert served.request("GET", "/metrics")[0] == 200  # and the server is fine


@pytest.mark.integration
def test_a_slow_client_does_not_block_others(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 1.0)
    with served.raw() as slow:
        slow.sendall(b"GET /metr")  # ... and nothing more
        t0 = time.monotonic()
        for _ in range(5):
            assert served.request("GET", "/metrics")[0] == 200
        assert time.monotonic() - t0 < 1.0  # not waiting for the slow one
        assert read_all(slow) == b""  # closed by the server after READ_TIMEOUT, no answer
        assert 0.9 <= time.monotonic() - t0 < 3.0


@pytest.mark.integration
def test_connection_limit(served: Served) -> None:
    idle = [served.raw() for _ in range(metrics.MAX_CONNECTIONS)]
    try:
        # wait until the server has taken every one of them
        deadline = time.monotonic() + 5
        while len(served.server._tasks) < metrics.MAX_CONNECTIONS:
            assert time.monotonic() < deadline, len(served.server._tasks)
            time.sleep(0.01)
        assert served.request("GET", "/metrics")[0] == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while served.server._tasks:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert served.request("GET", "/metrics")[0] == 200


@pytest.mark.integration
def test_render_failure_gives_500_and_the_server_lives_on(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.fail = RuntimeError("counter source went away")
    status, _, body = served.request("GET", "/metrics")
    assert status == 500 and b"see the daemon's log" in body
    assert "rendering the metrics failed" in caplog.text
    assert "counter source went away" in caplog.text  # the traceback is logged
    served.fail = None
    status, _, body = served.request("GET", "/metrics")
    assert status == 200 and body.decode() == served.body


@pytest.mark.integration
def test_health_failure_gives_500(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> tuple[bool, dict[str, object]]:
        raise KeyError("stages")

    served.server._health = broken
    assert served.request("GET", "/healthz")[0] == 500
    assert "the health check failed" in caplog.text


@pytest.mark.integration
def test_a_port_in_use_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer("127.0.0.1", port, str, lambda: (True, {}))
        with pytest.raises(FluxError) as ei:
            asyncio.run(server.start())
    text = str(ei.value)
    assert text.startswith(f"metrics.host/metrics.port: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in text


@pytest.mark.integration
def test_close_drops_connections_and_stops_listening() -> None:
    s = Served()
    port = s.port
    with s.raw() as idle:
        idle.sendall(b"GET /metrics HTTP/1.1\r\n")  # headers never finished
        deadline = time.monotonic() + 5
        while not s.server._tasks:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        s.close()
        assert time.monotonic() - t0 < 2.0  # did not wait for the idle client
        assert read_all(idle) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
