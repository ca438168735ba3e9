"""Load tools of the MQTT pipeline benchmark (bench/mqtt_pipeline.py): a device simulator and a
collector, each a separate process, both speaking MQTT 3.1.1 over raw sockets.

Why raw sockets: the machine has 2 cores shared by the brokers, the system under test and these
tools; a paho client costs 20-30 us per message in Python, a hand-built PUBLISH on a socket a few
microseconds, so the tools steal as little CPU as possible from what is measured.

    python bench/_mqtt_load.py gen --port P --qos Q --devices N --rate R --seconds S --out FILE
            [--window W]
        connects N device connections, prints "ready", waits for a line on stdin, then publishes
        {"seq": n, "temp": t, "sent": unix_time} on site/dNN/telemetry, round-robin over the
        devices: paced at R msg/s in total (R = 0: as fast as it can). QoS 1 keeps at most
        WINDOW unacknowledged publishes per connection. With --window, at most W messages are
        outstanding (sent, not yet seen upstream: the driver feeds the collector's count to
        stdin), so a saturated system gets a bounded backlog. Every 10th message of a device
        (seq % 10 == 0) is hot: temp = 81 + seq, so the command it causes names its seq.
        Writes {device: [send time of seq 1, 2, ...]} to FILE (pickle) and a JSON summary line
        to stdout.
    python bench/_mqtt_load.py collect --in-port P --up-port P2 --out FILE
        subscribes (QoS 1) to site/+/cmd on the devices' broker and to # on the upstream broker,
        prints "ready", then every 20 ms (when it changed) a JSON progress line {"up": unique
        messages seen upstream, "cmd": unique commands, "dup": duplicates, "last": time of the
        last new one};
        on EOF on stdin writes {"up": {device: {seq: first receive time}}, "cmd": {...},
        "dup_up": n, "dup_cmd": n, "other": n} to FILE (pickle).

Upstream payloads understood: the daemon's records (objects with "device", "name", "value"; a
JSON array of them in batch format; the record named "seq" identifies the message) and the
naive script's forwarded telemetry (an object with "seq" and "temp" on up/naive/<device>).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import select
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"
WINDOW = 500  # QoS 1: unacknowledged publishes per device connection


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


Handler = Callable[[bytes, bytes, float], None]


class RawMqtt:
    """A minimal MQTT 3.1.1 client (bench only): blocking sends, non-blocking reads."""

    def __init__(self, port: int, client_id: str, keepalive: int = 600) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = _str(b"MQTT") + bytes([4, 0x02]) + keepalive.to_bytes(2, "big")
        body += _str(client_id.encode())
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        ack = self._read_exact(4)
        if ack[0] != 0x20 or ack[3] != 0:
            raise RuntimeError(f"CONNACK refused: {ack!r}")
        self.sock.settimeout(None)  # blocking sends; poll() reads with MSG_DONTWAIT
        self.buf = bytearray()
        self.next_id = 0
        self.unacked = 0
        self.suback = False

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RuntimeError("broker closed the connection")
            data += chunk
        return data

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    def subscribe(self, topic: str, qos: int) -> None:
        body = self.packet_id().to_bytes(2, "big") + _str(topic.encode()) + bytes([qos])
        self.sock.sendall(b"\x82" + _varint(len(body)) + body)

    def publish(self, topic: bytes, payload: bytes, qos: int) -> None:
        if qos:
            var = _str(topic) + self.packet_id().to_bytes(2, "big")
            self.unacked += 1
        else:
            var = _str(topic)
        pkt = bytes([0x30 | (qos << 1)]) + _varint(len(var) + len(payload)) + var + payload
        self.sock.sendall(pkt)

    def poll(self, on_publish: Handler | None = None) -> bool:
        """Read what the socket has; parse whole packets; ack QoS 1 publishes. False on EOF."""
        try:
            while True:
                chunk = self.sock.recv(1 << 18, socket.MSG_DONTWAIT)
                if not chunk:
                    return False
                self.buf += chunk
                if len(chunk) < 1 << 18:
                    break
        except BlockingIOError:
            pass
        now = time.time()
        buf = self.buf
        pos = 0
        acks = bytearray()
        n = len(buf)
        while pos + 2 <= n:
            head = buf[pos]
            mult, length, i, complete = 1, 0, pos + 1, False
            while i < n and i < pos + 5:
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    complete = True
                    break
            if not complete or i + length > n:
                break
            end = i + length
            kind = head >> 4
            if kind == 3:
                qos = (head >> 1) & 3
                tlen = int.from_bytes(buf[i:i + 2], "big")
                topic = bytes(buf[i + 2:i + 2 + tlen])
                j = i + 2 + tlen
                if qos:
                    acks += b"\x40\x02" + buf[j:j + 2]
                    j += 2
                if on_publish is not None:
                    on_publish(topic, bytes(buf[j:end]), now)
            elif kind == 4:
                self.unacked -= 1
            elif kind == 9:
                self.suback = True
            pos = end
        del buf[:pos]
        if acks:
            self.sock.sendall(acks)
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")
        self.sock.close()


def device_names(n: int) -> list[str]:
    return [f"d{i:02d}" for i in range(n)]


class Gate:
    """Closed-loop load (--window): at most ``window`` messages published but not yet seen
    upstream. The driver writes the collector's upstream count to our stdin, one line each time
    it changes. A message that is never delivered (QoS 0 loss) would hold the gate shut: after
    ``patience`` seconds without news while shut, what is outstanding is written off as lost."""

    def __init__(self, window: int, patience: float = 1.0) -> None:
        self.window = window
        self.patience = patience
        self.delivered = 0
        self.written_off = 0
        self.fd = sys.stdin.fileno()
        os.set_blocking(self.fd, False)
        self._buf = b""
        self._news = time.monotonic()

    def read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        lines = (self._buf + data).split(b"\n")
        self._buf = lines.pop()
        if lines and lines[-1].strip():
            self.delivered = int(lines[-1])
            self._news = time.monotonic()

    def shut(self, sent: int) -> bool:
        if sent - self.delivered - self.written_off < self.window:
            return False
        if time.monotonic() - self._news > self.patience:
            self.written_off = sent - self.delivered
            self._news = time.monotonic()
            return False
        return True


def generate(args: argparse.Namespace) -> None:
    names = device_names(args.devices)
    conns = [RawMqtt(args.port, f"dev-{d}") for d in names]
    topics = [f"site/{d}/telemetry".encode() for d in names]
    sent: list[list[float]] = [[] for _ in names]
    print("ready", flush=True)
    sys.stdin.readline()
    gate = Gate(args.window) if args.window else None
    qos, rate, ndev = args.qos, args.rate, len(names)
    start = time.perf_counter()
    stop = start + args.seconds
    i = 0
    gated = 0.0
    now = start
    while now < stop:
        if rate:
            due = start + i / rate
            if due > now:
                time.sleep(due - now)
        if gate is not None and i % 16 == 0:
            gate.read()
            if gate.shut(i):
                t = time.perf_counter()
                select.select([gate.fd], [], [], 0.01)
                now = time.perf_counter()
                gated += now - t
                continue
        dev = i % ndev
        c = conns[dev]
        if qos and c.unacked >= WINDOW:
            select.select([c.sock], [], [], 0.05)
            c.poll()
            now = time.perf_counter()
            continue
        times = sent[dev]
        seq = len(times) + 1
        temp = 81.0 + seq if seq % 10 == 0 else 20.0 + (seq % 7) * 0.5
        t = time.time()
        c.publish(topics[dev], b'{"seq":%d,"temp":%r,"sent":%r}' % (seq, temp, t), qos)
        times.append(t)
        i += 1
        if qos and i % 64 == 0:
            for cc in conns:
                cc.poll()
        now = time.perf_counter()
    elapsed = time.perf_counter() - start
    deadline = time.monotonic() + 30
    while qos and any(c.unacked for c in conns) and time.monotonic() < deadline:
        select.select([c.sock for c in conns], [], [], 0.05)
        for c in conns:
            c.poll()
    for c in conns:
        c.close()
    with open(args.out, "wb") as f:
        pickle.dump({d: s for d, s in zip(names, sent, strict=True)}, f)
    unacked = sum(c.unacked for c in conns)
    print(json.dumps({"sent": i, "seconds": elapsed, "unacked": unacked, "gated": gated}),
          flush=True)


def collect(args: argparse.Namespace) -> None:
    up: dict[str, dict[int, float]] = {}
    cmd: dict[str, dict[int, float]] = {}
    counts = {"up": 0, "cmd": 0, "dup_up": 0, "dup_cmd": 0, "other": 0}
    last = [0.0]
    loads = json.loads

    def note(table: dict[str, dict[int, float]], key: str, device: str, seq: int, t: float) -> None:
        seen = table.setdefault(device, {})
        if seq in seen:
            counts["dup_" + key] += 1
        else:
            seen[seq] = t
            counts[key] += 1
            last[0] = t

    def on_cmd(topic: bytes, payload: bytes, t: float) -> None:
        try:
            doc = loads(payload)
            note(cmd, "cmd", doc["device"], round(doc["temp"] - 81.0), t)
        except (ValueError, KeyError, TypeError):
            counts["other"] += 1

    def record(rec: Any, topic: bytes, t: float) -> None:
        if not isinstance(rec, dict):
            counts["other"] += 1
        elif "name" in rec:
            if rec["name"] == "seq":
                note(up, "up", rec["device"], round(rec["value"]), t)
        elif "temp" in rec and "seq" in rec:  # the naive script's, or the json encoder's
            device = rec.get("device") or topic.rsplit(b"/", 1)[1].decode()
            note(up, "up", device, round(rec["seq"]), t)  # json_normalize makes it a float
        else:
            counts["other"] += 1

    def on_up(topic: bytes, payload: bytes, t: float) -> None:
        if topic.endswith(b"/status"):
            return  # the daemon's retained online/offline
        try:
            doc = loads(payload)
        except ValueError:
            counts["other"] += 1
            return
        if isinstance(doc, list):
            for rec in doc:
                record(rec, topic, t)
        else:
            record(doc, topic, t)

    c_in = RawMqtt(args.in_port, "bench-collect-cmd")
    c_up = RawMqtt(args.up_port, "bench-collect-up")
    c_in.subscribe("site/+/cmd", 1)
    c_up.subscribe("#", 1)
    handlers = {c_in.sock: (c_in, on_cmd), c_up.sock: (c_up, on_up)}
    while not (c_in.suback and c_up.suback):
        select.select([c_in.sock, c_up.sock], [], [], 0.1)
        c_in.poll(on_cmd)
        c_up.poll(on_up)
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    next_report = time.monotonic()
    reported = (-1, -1, -1)
    done = False
    while not done:
        ready, _, _ = select.select([c_in.sock, c_up.sock, stdin], [], [], 0.02)
        for s in ready:
            if s == stdin:
                with contextlib.suppress(BlockingIOError):
                    done = not os.read(stdin, 4096)
                continue
            conn, handler = handlers[s]
            if not conn.poll(handler):
                done = True
        now = time.monotonic()
        if now >= next_report:
            state = (counts["up"], counts["cmd"], counts["dup_up"] + counts["dup_cmd"])
            if state != reported:
                print(json.dumps({"up": state[0], "cmd": state[1], "dup": state[2],
                                  "last": last[0]}), flush=True)
                reported = state
            next_report = now + 0.02
    c_in.close()
    c_up.close()
    with open(args.out, "wb") as f:
        pickle.dump({"up": up, "cmd": cmd, **{k: v for k, v in counts.items()
                                              if k in ("dup_up", "dup_cmd", "other")}}, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--qos", type=int, choices=(0, 1), default=0)
    g.add_argument("--devices", type=int, default=10)
    g.add_argument("--rate", type=float, default=0.0)
    g.add_argument("--seconds", type=float, default=10.0)
    g.add_argument("--window", type=int, default=0,
                   help="closed loop: most messages sent but not yet seen upstream (0: open)")
    g.add_argument("--out", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--in-port", type=int, required=True)
    c.add_argument("--up-port", type=int, required=True)
    c.add_argument("--out", required=True)
    args = p.parse_args()
    if args.cmd == "gen":
        generate(args)
    else:
        collect(args)


if __name__ == "__main__":
    main()
