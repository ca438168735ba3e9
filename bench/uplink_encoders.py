"""Cost of each uplink encoder per reading and per measurement, at batch 64.

A batch is 64 measurements: ``--per-reading`` measurements per reading (default 8: 8 readings
of 8 floats/ints/bools as a Modbus poll gives them), from 4 devices. What is timed per encoder is
what the uplink does with a batch on the loop: ``stage()`` (at ``Uplink.add``: grouping, numbers
at their precision, payload encoding) plus ``wire()`` of every row it made (at send time;
Sparkplug's protobuf, ThingsBoard's connect/merge, Home Assistant's discovery once then states).
The outbox's SQLite write is the same for every encoder and is not included.

Baseline, measured in the same run and alternated with each encoder: today's uplink path, the
outbox's own record encoding (``Outbox.add``'s ``prefix + msgspec.encode(m)``) plus the
``records`` wire (id and seq spliced in), i.e. the ``records`` encoder without precision.

    .venv/bin/python bench/uplink_encoders.py [--seconds 0.5] [--per-reading 8]

Target: <= 2 us per measurement at batch 64 (issue #14).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec

from flux_edge.model import Measurement
from flux_edge.uplink.encoders.base import EncoderEnv
from flux_edge.uplink.encoders.registry import build, spec_of
from flux_edge.uplink.outbox import Row

BATCH = 64
SPECS: dict[str, dict[str, Any]] = {
    "records": {"type": "records"},
    "json": {"type": "json", "topic": "up/{device}", "exclude": ["seq"],
             "template": {"device": "{device}", "ts": "{ts}", "seq": "{values.seq}",
                          "metrics": "{values}"}},
    "influx": {"type": "influx", "tags": {"site": "north"}},
    "sparkplug_b": {"type": "sparkplug_b", "group_id": "plant1"},
    "thingsboard": {"type": "thingsboard"},
    "homeassistant": {"type": "homeassistant"},
}


def batch(n: int, per_reading: int, start: int) -> list[Measurement]:
    out = []
    for r in range(n // per_reading):
        ts = 1732780000.0 + (start + r) * 0.1
        device = f"dev{r % 4}"
        for k in range(per_reading):
            v: Any = (696 + r) * 0.1 if k % 3 == 0 else (r + k if k % 3 == 1 else r % 2 == 0)
            out.append(Measurement(device=device, name=f"p{k}", value=v, ts=ts, unit="degC",
                                   source="plc"))
    return out


def _encoder_job(name: str, per_reading: int) -> Callable[[int], int]:
    env = EncoderEnv("gw1", {(f"dev{i}", "p0"): 1 for i in range(4)})
    enc = build(spec_of(SPECS[name]), env)
    if name != "records":
        enc.on_connect()
    oid = b"3f2a9c1e"

    def job(i: int) -> int:
        ms = batch(BATCH, per_reading, i)
        t0 = time.perf_counter_ns()
        rows = enc.stage(ms)
        if rows is None:  # records: the outbox encodes (as in Outbox.add), then the wire
            rec = _baseline_rows(enc.prepare(ms))  # type: ignore[attr-defined]
            for seq, r in enumerate(rec):
                enc.wire(oid, [Row(seq, 0, r[0], r[1])])
        else:
            per = max(1, enc.rows_per_publish)
            for k in range(0, len(rows), per):
                chunk = rows[k:k + per]
                topic = chunk[0].topic
                same = [c for c in chunk if c.topic == topic]
                enc.wire(oid, [Row(k + j, 0, c.topic, c.payload) for j, c in enumerate(same)])
        return time.perf_counter_ns() - t0

    return job


_ENC = msgspec.json.Encoder()
_PREFIX = b'"gateway":"gw1",'


def _baseline_rows(ms: Any) -> list[tuple[str, bytes]]:
    enc = _ENC.encode
    return [(f"flux-edge/gw1/{m.device}/{m.name}", _PREFIX + enc(m)[1:]) for m in ms]


def _baseline_job(per_reading: int) -> Callable[[int], int]:
    def job(i: int) -> int:
        ms = batch(BATCH, per_reading, i)
        t0 = time.perf_counter_ns()
        rows = _baseline_rows(ms)
        for seq, (_topic, payload) in enumerate(rows):
            s = str(seq).encode()
            b'{"id":"3f2a9c1e-' + s + b'","seq":' + s + b"," + payload
        return time.perf_counter_ns() - t0

    return job


def measure(seconds: float, per_reading: int) -> dict[str, tuple[float, float]]:
    """name -> (median us per measurement, median of the baseline alternated with it)."""
    out = {}
    base = _baseline_job(per_reading)
    for name in SPECS:
        job = _encoder_job(name, per_reading)
        for i in range(50):  # warm-up (and HA's discovery messages, sent once)
            job(i)
            base(i)
        ours: list[float] = []
        theirs: list[float] = []
        deadline = time.perf_counter() + seconds
        i = 100
        while time.perf_counter() < deadline:
            ours.append(job(i) / 1000 / BATCH)
            theirs.append(base(i) / 1000 / BATCH)
            i += 1
        out[name] = (statistics.median(ours), statistics.median(theirs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="per encoder")
    ap.add_argument("--per-reading", type=int, default=8)
    a = ap.parse_args()
    res = measure(a.seconds, a.per_reading)
    print(f"batch {BATCH} measurements, {a.per_reading} per reading "
          f"({BATCH // a.per_reading} readings); medians")
    print(f"{'encoder':<14} {'us/measurement':>15} {'us/reading':>11} {'baseline':>9} "
          f"{'ratio':>6}  target <= 2 us")
    for name, (us, base) in res.items():
        print(f"{name:<14} {us:>15.2f} {us * a.per_reading:>11.2f} {base:>9.2f} "
              f"{us / base:>6.2f}  {'ok' if us <= 2.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
