"""Uplink encoders without a broker: golden payloads (the issue's json example, the line
protocol reference's examples), number formatting, config checks, property tests."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.kinds import check_config_text
from flux_edge.model import Measurement
from flux_edge.uplink.encoders.base import EncoderEnv, readings
from flux_edge.uplink.encoders.influx import (
    InfluxEncoder,
    InfluxEncoderSpec,
    escape_key,
    escape_measurement,
    field_value,
)
from flux_edge.uplink.encoders.json_shaped import JsonEncoder, JsonEncoderSpec
from flux_edge.uplink.encoders.numbers import (
    Precision,
    decimals_of_scale,
    declared_precision,
    ns,
)
from flux_edge.uplink.encoders.records import RecordsEncoder, RecordsEncoderSpec
from flux_edge.uplink.encoders.registry import encoder_kinds, spec_of

ENV = EncoderEnv(gateway="gw1")


def reading(device: str = "d1", ts: float = 1732780000.123, **values: object) -> list[Measurement]:
    return [Measurement(device=device, name=k, value=v, ts=ts, source="plc",  # type: ignore[arg-type]
                        unit="degC" if k == "temp" else "") for k, v in values.items()]


# --- registry -----------------------------------------------------------------------------------


def test_every_encoder_is_a_registered_kind_and_records_is_the_default() -> None:
    tags = list(encoder_kinds())
    assert tags[0] == "records"
    assert {"records", "json", "influx"} <= set(tags)
    assert isinstance(spec_of({}), RecordsEncoderSpec)


# --- numbers ------------------------------------------------------------------------------------


def test_a_scaled_register_value_is_sent_at_its_declared_precision() -> None:
    value = 696 * 0.1
    assert value == 69.60000000000001
    p = Precision({("d1", "temp"): decimals_of_scale(0.1)})  # type: ignore[dict-item]
    assert repr(p.round("d1", "temp", value)) == "69.6"
    assert p.round("d1", "other", value) == value  # nothing declared: the value as computed
    assert p.round("d1", "temp", 7) == 7  # integers are never touched


@pytest.mark.parametrize(("scale", "offset", "decimals"), [
    (0.1, 0.0, 1), (0.01, 0.0, 2), (0.5, 0.0, 1), (0.25, 0.0, 2), (2.0, 0.0, 0),
    (0.1, -40.0, 1), (0.1, 0.05, 2), (1e-3, 0.0, 3),
])
def test_decimals_of_scale(scale: float, offset: float, decimals: int) -> None:
    assert decimals_of_scale(scale, offset) == decimals


def test_declared_precision_reads_register_maps() -> None:
    from flux_edge.kinds import load_config_text

    cfg = load_config_text('''
[sources.bus]
type = "modbus_tcp"
host = "127.0.0.1"
[[sources.bus.devices]]
name = "boiler"
registers = [
  { name = "temp", address = 0, scale = 0.1 },
  { name = "count", address = 1 },
  { name = "flow", address = 2, scale = 0.01, offset = -5.0 },
]
''')
    assert declared_precision(cfg.sources) == {("boiler", "temp"): 1, ("boiler", "flow"): 2}


def test_precision_table_and_decimals_option() -> None:
    p = Precision({("d1", "a"): 1}, decimals=2, table={"d1.a": 3, "b": 0})
    assert p.of("d1", "a") == 3 and p.of("d2", "b") == 0 and p.of("d2", "c") == 2


@given(st.integers(-(2**31), 2**31), st.sampled_from([0.1, 0.01, 0.001, 0.5, 0.25]))
def test_shortest_form_at_the_scale_never_shows_false_digits(raw: int, scale: float) -> None:
    d = decimals_of_scale(scale)
    assert d is not None
    text = repr(Precision(decimals=d).round("x", "y", raw * scale))
    mantissa = text.split("e")[0]
    frac = mantissa.split(".")[1] if "." in mantissa else ""
    assert len(frac) <= d or "e" in text
    assert math.isclose(float(text), raw * scale, rel_tol=1e-12, abs_tol=10 ** -(d + 1))


def test_ns_is_exact_for_the_received_decimal() -> None:
    assert ns(1732780000.123) == 1732780000123000000
    assert ns(1556813561.098) == 1556813561098000000
    assert ns(0.0) == 0


# --- records ------------------------------------------------------------------------------------


def test_records_unchanged_without_precision() -> None:
    enc = RecordsEncoder(RecordsEncoderSpec(), ENV)
    ms = reading(temp=69.60000000000001)
    assert enc.stage(ms) is None
    assert enc.prepare(ms) is ms


def test_records_round_at_the_declared_precision() -> None:
    enc = RecordsEncoder(RecordsEncoderSpec(), EncoderEnv("gw1", {("d1", "temp"): 1}))
    assert [m.value for m in enc.prepare(reading(temp=69.60000000000001, n=3))] == [69.6, 3]


# --- json ---------------------------------------------------------------------------------------


ISSUE_SPEC = JsonEncoderSpec(
    topic="up/{device}", exclude=("seq",),
    template={"device": "{device}", "ts": "{ts}", "seq": "{values.seq}", "metrics": "{values}"},
)


def test_json_the_issues_example() -> None:
    enc = JsonEncoder(ISSUE_SPEC, ENV)
    rows = enc.stage(reading(temp=81.2, hum=40.1, seq=123))
    assert len(rows) == 1
    assert rows[0].topic == "up/d1"
    assert rows[0].payload == (
        b'{"device":"d1","ts":1732780000.123,"seq":123,"metrics":{"temp":81.2,"hum":40.1}}'
    )
    assert rows[0].ts == 1732780000.123


def test_json_one_message_per_reading_in_order() -> None:
    enc = JsonEncoder(ISSUE_SPEC, ENV)
    ms = reading(temp=1.0, seq=1) + reading("d2", temp=2.0, seq=2) + reading(
        ts=1732780001.0, temp=3.0, seq=3)
    rows = enc.stage(ms)
    assert [(r.topic, json.loads(r.payload)["seq"]) for r in rows] == [
        ("up/d1", 1), ("up/d2", 2), ("up/d1", 3)]


def test_json_every_placeholder() -> None:
    spec = JsonEncoderSpec(template={
        "gw": "{gateway}", "src": "{source}", "ms": "{ts_ms}", "iso": "{ts_iso}",
        "q": "{quality}", "u": "{units}", "qs": "{qualities}", "t": "{values.temp}",
        "missing": "{values.nope}", "unit": "{units.temp}", "label": "{device}/{values.temp}",
        "fixed": [1, True, "x", {"n": 2.5}],
    })
    ms = [*reading(temp=81.2), Measurement(device="d1", name="hum", value=40.1,
                                           ts=1732780000.123, source="plc", quality="stale")]
    out = json.loads(JsonEncoder(spec, ENV).stage(ms)[0].payload)
    assert out == {
        "gw": "gw1", "src": "plc", "ms": 1732780000123, "iso": "2024-11-28T07:46:40.123Z",
        "q": "stale", "u": {"temp": "degC", "hum": ""}, "qs": {"temp": "good", "hum": "stale"},
        "t": 81.2, "missing": None, "unit": "degC", "label": "d1/81.2",
        "fixed": [1, True, "x", {"n": 2.5}],
    }


def test_json_rounds_at_the_declared_precision() -> None:
    enc = JsonEncoder(JsonEncoderSpec(), EncoderEnv("gw1", {("d1", "temp"): 1}))
    assert b'"temp":69.6}' in enc.stage(reading(temp=69.60000000000001))[0].payload


BASE = '''
[uplink]
host = "127.0.0.1"
[uplink.encoder]
'''


def problems(text: str) -> list[str]:
    return [f"{p.path}@{p.line}:{p.column}: {p.message}" for p in check_config_text(BASE + text)[1]]


def test_check_config_json_template_errors_at_their_key_paths() -> None:
    got = problems('type = "json"\ntemplate = { a = "{valuez}", b = { c = "x{ts_mz}" } }\n'
                   'topic = "up/{name}"\n')
    assert any(p.startswith("uplink.encoder.template.a@6:") and "{valuez}" in p for p in got)
    assert any(p.startswith("uplink.encoder.template.b.c@6:") and "{ts_mz}" in p for p in got)
    assert any(p.startswith("uplink.encoder.topic@7:") for p in got)


def test_check_config_unknown_encoder_and_key() -> None:
    assert any("did you mean \"influx\"" in p for p in problems('type = "influxx"\n'))
    assert any(p.startswith("uplink.encoder.bogus@") for p in problems('type = "json"\nbogus=1\n'))
    assert any(p.startswith("uplink.encoder.decimals@")
               for p in problems('type = "influx"\ndecimals = 99\n'))


def test_check_config_accepts_each_documented_example() -> None:
    assert problems('type = "json"\ntopic = "up/{device}"\nexclude = ["seq"]\n'
                    'template = { device = "{device}", ts = "{ts}", seq = "{values.seq}", '
                    'metrics = "{values}" }\n') == []
    assert problems('type = "influx"\ntags = { site = "north" }\n') == []


def test_qos_0_is_accepted() -> None:
    cfg, probs = check_config_text('[uplink]\nhost = "h"\nqos = 0\n')
    assert probs == [] and cfg is not None and cfg.uplink is not None and cfg.uplink.qos == 0


# --- influx -------------------------------------------------------------------------------------


def test_influx_golden_from_the_reference() -> None:
    # "myMeasurement,tag1=value1,tag2=value2 fieldKey="fieldValue" 1556813561098000000"
    spec = InfluxEncoderSpec(measurement="myMeasurement", tags={"tag1": "value1", "tag2": "value2"},
                             tag_fields=())
    enc = InfluxEncoder(spec, ENV)
    line = enc.line([Measurement(device="d", name="fieldKey", value="fieldValue",
                                 ts=1556813561.098)])
    assert line == 'myMeasurement,tag1=value1,tag2=value2 fieldKey="fieldValue" 1556813561098000000'


def test_influx_escaping_per_the_reference() -> None:
    assert escape_measurement("my Measurement,x=1") == "my\\ Measurement\\,x=1"
    assert escape_key("tag Key1") == "tag\\ Key1"
    assert escape_key("a,b=c") == "a\\,b\\=c"
    assert field_value('string with "quotes"') == '"string with \\"quotes\\""'
    assert field_value("back\\slash") == '"back\\\\slash"'
    assert field_value(3) == "3i" and field_value(True) == "true" and field_value(False) == "false"
    assert field_value(1.5) == "1.5" and field_value(math.nan) is None


def test_influx_types_tags_and_ns_timestamp() -> None:
    enc = InfluxEncoder(InfluxEncoderSpec(tags={"site": "north"}), ENV)
    rows = enc.stage(reading(temp=81.2, alarms=3, run=True, state="ok", bad=math.inf))
    assert len(rows) == 1 and rows[0].topic == "flux-edge/gw1/influx"
    assert rows[0].payload.decode() == (
        'd1,device=d1,gateway=gw1,site=north,source=plc '
        'temp=81.2,alarms=3i,run=true,state="ok" 1732780000123000000'
    )


def test_influx_lines_of_one_topic_go_together() -> None:
    from flux_edge.uplink.outbox import Row

    enc = InfluxEncoder(InfluxEncoderSpec(batch_max=10), ENV)
    rows = enc.stage(reading(a=1) + reading("d2", a=2))
    msgs = enc.wire(b"x", [Row(i, 0, r.topic, r.payload) for i, r in enumerate(rows)])
    assert len(msgs) == 1 and msgs[0].payload.count(b"\n") == 1


_LINE = re.compile(
    r'^(?:[^ ,\\]|\\.)+(?:,(?:[^ ,=\\]|\\.)+=(?:[^ ,=\\]|\\.)+)* '
    r'(?:(?:[^ ,=\\]|\\.)+=(?:-?[0-9.e+-]+|-?[0-9]+i|true|false|"(?:[^"\\]|\\.)*"))'
    r'(?:,(?:(?:[^ ,=\\]|\\.)+=(?:-?[0-9.e+-]+|-?[0-9]+i|true|false|"(?:[^"\\]|\\.)*")))* '
    r'-?[0-9]+$'
)

names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)
values = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False,
                   allow_infinity=False), st.booleans(), st.text(max_size=20))


@settings(max_examples=200)
@given(names, names, st.dictionaries(names, values, min_size=1, max_size=5))
def test_influx_every_line_parses_by_the_grammar(device: str, source: str,
                                                 fields: dict[str, object]) -> None:
    ms = [Measurement(device=device, name=k, value=v, ts=1.5, source=source)  # type: ignore[arg-type]
          for k, v in fields.items()]
    line = InfluxEncoder(InfluxEncoderSpec(), ENV).line(ms)
    assert line is not None and "\n" not in line
    assert _LINE.match(line), line


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([1.0, 2.0])),
                min_size=1, max_size=20))
def test_readings_are_consecutive_runs(keys: list[tuple[str, float]]) -> None:
    ms = [Measurement(device=d, name="x", value=i, ts=t) for i, (d, t) in enumerate(keys)]
    groups = readings(ms)
    assert [m for g in groups for m in g] == ms
    for g in groups:
        assert len({(m.device, m.ts) for m in g}) == 1
    for a, b in itertools.pairwise(groups):
        assert (a[-1].device, a[-1].ts) != (b[0].device, b[0].ts)


# --- sparkplug_b protobuf ---------------------------------------------------------------------


def test_spb_varint_and_metric_bytes_by_hand() -> None:
    from flux_edge.uplink.encoders import spb_proto as pb

    assert pb.varint(0) == b"\x00" and pb.varint(300) == b"\xac\x02"
    assert pb.varint(-1) == b"\xff" * 9 + b"\x01"  # Int64 -1 as two's complement uint64
    # Metric{name="a", alias=1, datatype=Boolean(11), boolean_value=true}
    m = pb.Metric(name="a", alias=1, datatype=pb.BOOLEAN, value=True).encode()
    assert m == b"\x0a\x01a" + b"\x10\x01" + b"\x20\x0b" + b"\x70\x01"
    # Payload{timestamp=1, metrics=[m], seq=0}
    assert pb.payload(1, 0, [pb.Metric(name="a", alias=1, datatype=pb.BOOLEAN, value=True)]) \
        == b"\x08\x01" + b"\x12" + bytes([len(m)]) + m + b"\x18\x00"


@settings(max_examples=300)
@given(st.lists(st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1),
                          st.floats(allow_nan=False), st.text(max_size=30)), max_size=8),
       st.integers(0, 255), st.integers(0, 2**63))
def test_spb_payload_round_trips(values: list[object], seq: int, ts: int) -> None:
    from flux_edge.uplink.encoders import spb_proto as pb
    from flux_edge.uplink.encoders.sparkplug_b import datatype

    metrics = [pb.Metric(name=f"m{i}", alias=i + 1, datatype=datatype(v), value=v,  # type: ignore[arg-type]
                         timestamp=ts) for i, v in enumerate(values)]
    out = pb.decode_payload(pb.payload(ts, seq, metrics))
    assert out["seq"] == seq and out["timestamp"] == ts
    assert [m["value"] for m in out["metrics"]] == values
    assert [m["name"] for m in out["metrics"]] == [f"m{i}" for i in range(len(values))]


@settings(max_examples=1000)
@given(st.binary(max_size=64))
def test_spb_reader_never_raises_but_valueerror(data: bytes) -> None:
    from flux_edge.uplink.encoders import spb_proto as pb

    with contextlib.suppress(ValueError):
        pb.decode_payload(data)


def test_check_config_commands_name_declared_actions() -> None:
    got = problems('type = "json"\ncommand_topic = "cmd/{gateway}"\n'
                   'commands = { start = "pump_onn" }\n')
    assert any(p.startswith("uplink.encoder.commands.start@") and "pump_onn" in p for p in got)


@settings(max_examples=300)
@given(st.integers(1, 2**20), st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1),
                                        st.floats(allow_nan=False), st.text(max_size=30)),
       st.booleans())
def test_spb_fast_data_metric_is_the_metric_encoding(alias: int, v: object, hist: bool) -> None:
    from flux_edge.uplink.encoders import spb_proto as pb
    from flux_edge.uplink.encoders.sparkplug_b import datatype

    dt = datatype(v)  # type: ignore[arg-type]
    slow = pb.Metric(alias=alias, datatype=dt, value=v, historical=hist).encode()  # type: ignore[arg-type]
    assert pb.data_metric(alias, dt, v, hist) == b"\x12" + pb.varint(len(slow)) + slow  # type: ignore[arg-type]


def test_check_config_extra_uplinks() -> None:
    text = ('[uplink]\nhost = "h"\n[uplink.extra.plant]\nhost = "p"\nqos = 5\n'
            '[uplink.extra.plant.encoder]\ntype = "sparkplug_b"\n'
            '[uplink.extra.b]\nhost = "b"\noutbox_file = "outbox.sqlite"\n')
    got = [f"{p.path}: {p.message}" for p in check_config_text(text)[1]]
    assert any(p.startswith("uplink.extra.plant.qos:") for p in got)
    assert any(p.startswith("uplink.extra.plant.encoder.group_id:") for p in got)
    assert any(p.startswith("uplink.extra.b.outbox_file:") and "its own" in p for p in got)
    cfg, probs = check_config_text('[uplink]\nhost = "h"\n[uplink.extra.plant]\nhost = "p"\n'
                                   'encoder = { type = "sparkplug_b", group_id = "p1" }\n')
    assert probs == [] and cfg is not None and cfg.uplink is not None
    assert cfg.uplink.extra["plant"]["encoder"]["group_id"] == "p1"
    cfg, probs = check_config_text('[uplink]\nhost = "h"\n[uplink.extra.p]\nhost = "x"\n'
                                   'reconnect_min = "50ms"\noutbox_max_size = "1MiB"\n')
    assert probs == [] and cfg is not None and cfg.uplink is not None
    assert cfg.uplink.extra["p"]["reconnect_min"] == 0.05  # as the struct takes it
    assert cfg.uplink.extra["p"]["outbox_max_size"] == 1 << 20


def test_a_pipeline_binding_its_uplink_declares_the_register_maps_precision(tmp_path: Path) -> None:
    import asyncio

    from flux_edge.config import UplinkConfig
    from flux_edge.kinds import load_config_text
    from flux_edge.uplink.sender import Uplink

    config = load_config_text('''
[sources.bus]
type = "modbus_tcp"
host = "127.0.0.1"
[[sources.bus.devices]]
name = "boiler"
registers = [{ name = "temp", address = 0, scale = 0.1 }]
''')

    class P:
        guard = executors = latest = safety = None

    p = P()
    p.config = config  # type: ignore[attr-defined]
    up = Uplink(UplinkConfig(host="127.0.0.1", port=1), gateway="gw", state_dir=tmp_path)
    try:
        m = Measurement(device="boiler", name="temp", value=696 * 0.1, ts=1.0)
        assert up.encoder.prepare([m])[0].value == 69.60000000000001  # type: ignore[attr-defined]
        up.bind(p)
        assert up.encoder.prepare([m])[0].value == 69.6  # type: ignore[attr-defined]
    finally:
        asyncio.run(up.close())
