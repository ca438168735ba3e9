"""SunSpec end to end with real parts: model discovery in the Modbus poller against a real
pymodbus server (flux_edge.sim.modbus_server) serving SunSpec maps (models 1, 103, 203; a device
without the marker; broken chains), the sunspec plugin through the host (property tests, fuzz),
and the whole pipeline: source -> sunspec.wasm -> measurements.

The maps come from plugins/sunspec/cases/make_cases.py (the model layouts of the SunSpec
definitions)."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_edge.errors import PluginError, SourceError
from flux_edge.kinds import load_config_text
from flux_edge.model import FN_HOLDING, KIND_REGISTERS, ErrorRecord, Measurement, Reading
from flux_edge.plugins.host import Plugin, PluginHost, PluginLimits
from flux_edge.plugins.tooling import build_plugin
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers
from flux_edge.sim.modbus_server import SimulatedModbusServer
from flux_edge.sources.modbus.poller import ModbusBusPoller
from flux_edge.sources.modbus.spec import ModbusDeviceConfig, ModbusTcpSource
from flux_edge.sources.modbus.sunspec import DiscoveryError
from tests.support import Collector, StatusLog, VirtualTime, run, stop_task

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
SIZE = 50400  # registers of the simulated tables: the 40000 and 50000 bases fit


def _load_cases() -> ModuleType:
    path = REPO / "plugins" / "sunspec" / "cases" / "make_cases.py"
    spec = importlib.util.spec_from_file_location("sunspec_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


CASES = _load_cases()
COMMON = CASES.block(1, CASES.PUBLISHED_COMMON)
INVERTER = CASES.block(103, CASES.INVERTER_103)
METER = CASES.block(203, CASES.METER_203)
STANDARD = [(1, COMMON), (103, INVERTER), (203, METER)]


def serve(srv: SimulatedModbusServer, base: int, words: list[int], unit: int) -> None:
    srv.set_words("holding", base, words, device_id=unit)


def tcp(port: int, *devices: ModbusDeviceConfig, **kw: Any) -> ModbusTcpSource:
    return ModbusTcpSource(host=HOST, port=port, devices=devices, **kw)


def sunspec_device(name: str, unit: int, **kw: Any) -> ModbusDeviceConfig:
    return ModbusDeviceConfig(name=name, unit_id=unit, discover="sunspec", **kw)


def by_topic(readings: list[Reading]) -> dict[str, Reading]:
    return {r.topic: r for r in readings}


# --- discovery against a real server ------------------------------------------------------------


def test_discovers_models_1_103_203_and_reads_their_blocks() -> None:
    """Unit 1 serves models 1, 103 and 203 at 40000; unit 2 has no marker anywhere; unit 3's
    chain breaks after model 1 (model ID 0); unit 4 is silent. Unit 1 is read whole, the others
    fail with their key paths, and none of them holds unit 1 back."""

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=(1, 2, 3, 4), size=SIZE) as srv:
            serve(srv, 40000, CASES.device_map(STANDARD), 1)
            serve(srv, 40000, CASES.device_map(STANDARD, marker=False), 2)
            broken = [*CASES.device_map([(1, COMMON)])[:-2], 0, 10]
            serve(srv, 40000, broken, 3)
            srv.silence(4)
            vt = VirtualTime()
            out = Collector(vt.clock)
            status = StatusLog()
            cfg = tcp(
                srv.port,
                sunspec_device("inverter", 1),
                sunspec_device("nomarker", 2),
                sunspec_device("broken", 3),
                sunspec_device("silent", 4),
                interval=1.0,
                timeout=0.2,
                retries=0,
            )
            poller = ModbusBusPoller(
                "pv", cfg, out, on_status=status, clock=vt.clock, sleep=vt.sleep
            )
            task = asyncio.create_task(poller.run())
            await out.wait_until(lambda: len(out.of("inverter")) >= 6)  # two polls
            for device in ("nomarker", "broken", "silent"):
                await status.wait_for(device, "bad")
            await stop_task(task)
            first = by_topic(out.of("inverter")[:3])
            assert sorted(first) == ["sunspec/1", "sunspec/103", "sunspec/203"]
            assert first["sunspec/1"].registers == tuple(COMMON)
            assert first["sunspec/1"].address == 40004  # after 'SunS' and the header
            assert first["sunspec/103"].registers == tuple(INVERTER)
            assert first["sunspec/103"].address == 40004 + 66 + 2
            assert first["sunspec/203"].registers == tuple(METER)
            assert first["sunspec/203"].address == 40072 + 50 + 2
            assert all(
                r.kind == KIND_REGISTERS and r.function == FN_HOLDING for r in out.readings
            )
            (nomarker,) = status.of("nomarker")
            assert "sources.pv.devices[1].discover: no SunSpec marker" in nomarker[1]
            assert "at 40000, 50000, 0" in nomarker[1]
            (broken_status,) = status.of("broken")
            assert "sources.pv.devices[2].discover: broken SunSpec chain" in broken_status[1]
            assert "model ID 0 at 40070" in broken_status[1]
            assert poller.health["nomarker"].failures["discovery"] >= 1
            assert poller.health["broken"].failures["discovery"] >= 1
            assert poller.health["inverter"].quality == "good"
            assert poller.health["nomarker"].quality == "bad"
            assert out.of("nomarker") == out.of("broken") == out.of("silent") == []

    run(scenario())


@pytest.mark.parametrize(("base", "at"), [(50000, 50000), (0, 0), (40000, 40001)])
def test_finds_the_marker_at_each_base(base: int, at: int) -> None:
    """The marker at 50000 or 0, or one register late (40001: a device that took the
    documents' 1-based numbering for a protocol address)."""

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=1, size=SIZE) as srv:
            serve(srv, at, CASES.device_map([(1, COMMON), (103, INVERTER)]), 1)
            out = Collector()
            poller = ModbusBusPoller("pv", tcp(srv.port, sunspec_device("inv", 1)), out)
            try:
                await poller.poll_once("inv")
            finally:
                await poller.close()
            got = by_topic(out.readings)
            assert got["sunspec/103"].registers == tuple(INVERTER)
            assert got["sunspec/1"].address == at + 4

    run(scenario())


def test_models_restricts_what_is_read_and_bases_where_it_looks() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=1, size=SIZE) as srv:
            serve(srv, 50000, CASES.device_map(STANDARD), 1)
            out = Collector()
            device = sunspec_device("pv1", 1, models=(203, 204), bases=(50000,))
            poller = ModbusBusPoller("pv", tcp(srv.port, device), out)
            try:
                await poller.poll_once("pv1")
                before = srv.request_count(FN_HOLDING)
                await poller.poll_once("pv1")
                per_poll = srv.request_count(FN_HOLDING) - before
            finally:
                await poller.close()
            assert [r.topic for r in out.readings] == ["sunspec/203", "sunspec/203"]
            assert per_poll == 1  # the meter's 105 registers: one request, nothing else

            wrong = sunspec_device("pv1", 1, models=(101,))
            poller = ModbusBusPoller("pv", tcp(srv.port, wrong), Collector())
            try:
                with pytest.raises(DiscoveryError, match=r"sources\.pv\.devices\[0\]\.models: "
                                   r"none of the models 101 is on the device"):
                    await poller.poll_once("pv1")
            finally:
                await poller.close()

    run(scenario())


def test_long_models_are_read_in_requests_of_125_and_emitted_whole() -> None:
    vendor = [(i * 7) & 0xFFFF for i in range(300)]

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=1, size=SIZE) as srv:
            serve(srv, 40000, CASES.device_map([(1, COMMON), (64001, vendor)]), 1)
            out = Collector()
            poller = ModbusBusPoller(
                "pv", tcp(srv.port, sunspec_device("inv", 1, models=(64001,))), out
            )
            try:
                await poller.poll_once("inv")
                before = srv.request_count(FN_HOLDING)
                await poller.poll_once("inv")
                requests = srv.request_count(FN_HOLDING) - before
            finally:
                await poller.close()
            assert out.readings[-1].registers == tuple(vendor)
            assert out.readings[-1].topic == "sunspec/64001"
            assert requests == 3  # 125 + 125 + 50

    run(scenario())


def test_an_over_long_model_and_a_chain_without_end_are_errors() -> None:
    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=(1, 2), size=SIZE) as srv:
            serve(srv, 50000, [*CASES.MARKER, 1, 20000], 1)  # 50004 + 20000 > 65536
            serve(srv, 50000, [*CASES.MARKER, 1, 66, *COMMON], 2)  # then zeros: ID 0
            for unit, pattern in (
                (1, r"model 1 at 50002 says it is 20000 registers long: that runs past"),
                (2, r"model ID 0 at 50070: not a model"),
            ):
                device = sunspec_device("d", unit, bases=(50000,))
                poller = ModbusBusPoller("pv", tcp(srv.port, device), Collector())
                try:
                    with pytest.raises(DiscoveryError, match=pattern):
                        await poller.poll_once("d")
                finally:
                    await poller.close()

    run(scenario())


def test_rediscovers_after_the_device_was_offline() -> None:
    """The device goes silent, comes back with another map (a firmware update moved its
    meter model first): the poller discovers again and reads the new layout."""

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=1, size=SIZE) as srv:
            serve(srv, 40000, CASES.device_map(STANDARD), 1)
            vt = VirtualTime()
            out = Collector(vt.clock)
            status = StatusLog()
            cfg = tcp(srv.port, sunspec_device("inv", 1), timeout=0.2, retries=0)
            poller = ModbusBusPoller("pv", cfg, out, on_status=status, clock=vt.clock,
                                     sleep=vt.sleep)  # fmt: skip
            task = asyncio.create_task(poller.run())
            await out.wait_for(3)
            srv.silence(1)
            await status.wait_for("inv", "bad")
            serve(srv, 40000, CASES.device_map([(203, METER), (1, COMMON)]), 1)
            n = len(out.readings)
            srv.silence(1, False)
            await status.wait_for("inv", "good")
            await out.wait_until(lambda: len(out.readings) >= n + 2)
            await stop_task(task)
            after = out.readings[n : n + 2]
            assert [r.topic for r in after] == ["sunspec/203", "sunspec/1"]
            assert after[0].address == 40004 and after[0].registers == tuple(METER)

    run(scenario())


def test_a_failed_discovery_backs_off_and_recovers() -> None:
    """No marker yet (a device still booting): discovery is retried with growing pauses, and
    the device's models are read once the marker appears."""

    async def scenario() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=1, size=SIZE) as srv:
            vt = VirtualTime()
            pauses: list[float] = []

            slept = asyncio.Event()

            async def sleep(delay: float) -> None:
                pauses.append(delay)
                slept.set()
                await vt.sleep(delay)

            out = Collector(vt.clock)
            status = StatusLog()
            cfg = tcp(srv.port, sunspec_device("inv", 1), backoff_max=8.0)
            poller = ModbusBusPoller("pv", cfg, out, on_status=status, clock=vt.clock,
                                     sleep=sleep)  # fmt: skip
            task = asyncio.create_task(poller.run())
            await status.wait_for("inv", "bad")
            while poller.health["inv"].failures.get("discovery", 0) < 5:
                slept.clear()
                await slept.wait()  # the poller paused (virtual time): its next attempt
            serve(srv, 40000, CASES.device_map(STANDARD), 1)
            await out.wait_for(3)
            await stop_task(task)
            assert pauses[:4] == pytest.approx([1.0, 2.0, 4.0, 8.0])  # doubling to backoff_max
            assert [q for q, _ in status.of("inv")] == ["bad", "good"]

    run(scenario())


# --- the plugin through the host ----------------------------------------------------------------


@pytest.fixture(scope="module")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_plugin(REPO / "plugins" / "sunspec", tmp_path_factory.mktemp("w"))
    except PluginError as exc:
        if "not found" in str(exc):
            pytest.skip(f"plugin toolchain missing: {exc}")
        raise


@pytest.fixture(scope="module")
def plugin(wasm: Path) -> Iterator[Plugin]:
    with PluginHost(None) as host:
        p = host.load("sunspec", wasm, PluginLimits(timeout_s=5.0), {})
        yield p
        p.close()


def _reading(model: int, words: list[int], topic: str | None = None) -> Reading:
    return Reading(source="pv", device="pv", ts=1.0, kind=KIND_REGISTERS,
                   registers=tuple(words), function=3, address=40070,
                   topic=f"sunspec/{model}" if topic is None else topic)  # fmt: skip


PROPS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

int16 = st.integers(-32767, 32767)  # -32768 is 'not implemented'
uint16 = st.integers(0, 0xFFFE)
acc32 = st.integers(1, 0xFFFFFFFF)
sunssf = st.integers(-10, 10)


def _expect(raw: int, sf: int) -> float:
    return raw / 10**-sf if sf < 0 else float(raw * 10**sf)


@PROPS
@given(w=int16, a=uint16, wh=acc32, w_sf=sunssf, a_sf=sunssf, wh_sf=sunssf,
       st_=st.integers(1, 8), evt=st.integers(0, 0xFFFFFFFE))  # fmt: skip
def test_inverter_values_and_scale_factors(
    plugin: Plugin, *, w: int, a: int, wh: int, w_sf: int, a_sf: int, wh_sf: int, st_: int,
    evt: int,
) -> None:  # fmt: skip
    words = CASES.block(103, {"W": w, "W_SF": w_sf, "A": a, "A_SF": a_sf, "WH": wh,
                              "WH_SF": wh_sf, "St": st_, "Evt1": evt})  # fmt: skip
    got = {m.name: m for m in plugin.process([_reading(103, words)])}
    assert all(isinstance(m, Measurement) for m in got.values())
    assert set(got) == {"W", "A", "WH", "St", "Evt1"}  # the rest is not implemented
    assert got["W"].value == _expect(w, w_sf) and got["W"].unit == "W"
    assert got["A"].value == _expect(a, a_sf) and got["A"].unit == "A"
    assert got["WH"].value == _expect(wh, wh_sf) and got["WH"].unit == "Wh"
    assert got["St"].value == st_ and got["Evt1"].value == evt


@PROPS
@given(values=st.lists(int16, min_size=4, max_size=4), sf=sunssf, imp=acc32, tsf=sunssf)
def test_meter_values(plugin: Plugin, values: list[int], sf: int, imp: int, tsf: int) -> None:
    names = ["W", "WphA", "WphB", "WphC"]
    words = CASES.block(203, {**dict(zip(names, values, strict=True)), "W_SF": sf,
                              "TotWhImp": imp, "TotWh_SF": tsf})  # fmt: skip
    got = {m.name: m.value for m in plugin.process([_reading(203, words)])}
    expected = {n: _expect(v, sf) for n, v in zip(names, values, strict=True)}
    assert got == {**expected, "TotWhImp": _expect(imp, tsf)}
    assert all(math.isfinite(float(v)) for v in got.values())


@PROPS
@given(
    words=st.lists(st.integers(0, 0xFFFF), max_size=140),
    model=st.sampled_from([1, 101, 102, 103, 201, 202, 203, 204, 160, 0, 65535]),
    topic=st.one_of(st.none(), st.text(max_size=20)),
)
def test_fuzz_random_blocks_never_trap(
    plugin: Plugin, words: list[int], model: int, topic: str | None
) -> None:
    """Random registers under any topic: measurements or error records from the guest itself,
    never a trap, a time-out or an ABI error (those name the call, not the block)."""
    out = plugin.process([_reading(model, words, topic), _reading(103, INVERTER)])
    for rec in out:
        if isinstance(rec, ErrorRecord):
            assert not any(w in rec.error for w in ("trap", "timed out", "ABI", "quarantined"))
            assert rec.error.startswith(("model ", "not a SunSpec", "expected a SunSpec")), rec
        else:
            assert isinstance(rec.value, str) or math.isfinite(float(rec.value))
    assert sum(1 for r in out if isinstance(r, Measurement) and r.name == "W") >= 1


def test_plugin_refuses_bad_configs(wasm: Path) -> None:
    with PluginHost(None) as host:
        for config, pattern in (
            ({"models": [105]}, r"models\[0\]: a model this plugin decodes"),
            ({"points": ["Watts"]}, r'points\[0\]: no model this plugin decodes has a point'),
            ({"names": "short"}, r'names must be "point" or "model"'),
            ({"prefx": "a"}, r'unknown key "prefx"'),
        ):
            with pytest.raises(PluginError, match=pattern):
                host.load("sunspec", wasm, PluginLimits(), config)


# --- the whole pipeline --------------------------------------------------------------------------

PIPELINE = """
[daemon]
state_dir = "{state}"
plugin_dirs = ["{plugins}"]

[plugins.sunspec.config]
names = "model"

[sources.pv]
type = "modbus_tcp"
host = "127.0.0.1"
port = {port}
interval = "100ms"
discover = "sunspec"
models = [1, 103, 203]
chain = ["sunspec"]
"""


def _pipeline_measurements(tmp_path: Path, wasm: Path, words: list[int], config_text: str,
                           wanted: set[str]) -> dict[str, Measurement]:
    """Serve ``words`` from holding register 40000 of a real Modbus server, run the pipeline of
    ``config_text`` (PIPELINE, formatted here) against it until the names in ``wanted`` came
    out of the sunspec plugin, and return the last measurement of every name seen."""
    seen: dict[str, Measurement] = {}
    enough = asyncio.Event()

    def on_measurements(source: str, ms: list[Measurement]) -> None:
        seen.update((m.name, m) for m in ms)
        if wanted <= set(seen):
            enough.set()

    async def go() -> None:
        async with SimulatedModbusServer(HOST, 0, device_id=1, size=SIZE) as srv:
            serve(srv, 40000, words, 1)
            text = config_text.format(state=tmp_path / "state", plugins=wasm.parent,
                                      port=srv.port)
            stop = asyncio.Event()
            runner = asyncio.create_task(
                run_pipeline(load_config_text(text),
                             observers=Observers(measurements=[on_measurements]), stop=stop)
            )
            try:
                await asyncio.wait_for(enough.wait(), 30)
            finally:
                stop.set()
                await runner

    asyncio.run(go())
    return seen


def test_pipeline_source_to_sunspec_plugin_to_measurements(tmp_path: Path, wasm: Path) -> None:
    words = CASES.device_map([(1, COMMON), (120, [0] * 26), *STANDARD[1:]])
    seen = _pipeline_measurements(tmp_path, wasm, words, PIPELINE,
                                  {"m1_SN", "m103_W", "m203_TotWhImp"})
    assert seen["m1_SN"].value == "9999abcd" and seen["m1_Md"].value == "Inverter 123"
    assert seen["m103_W"].value == 8520.0 and seen["m103_W"].unit == "W"
    assert seen["m103_PhVphA"].value == 230.5
    assert seen["m203_W"].value == -4520.0
    assert seen["m203_TotWhImp"].value == 1234567.0 and seen["m203_TotWhImp"].unit == "Wh"
    assert all(m.device == "pv" and m.source == "pv" for m in seen.values())
    assert not any(name.startswith("m120_") for name in seen)  # model 120 is not read


def test_source_error_is_a_flux_error() -> None:
    assert issubclass(DiscoveryError, SourceError)


# The Fronius IG+ map of pysunspec's test devices (mbmap_fronius.xml), served byte for byte: the
# values are its registers with their scale factors applied, worked by hand from the dump.
FRONIUS_EXPECTED: dict[str, tuple[object, str]] = {
    "m1_Mn": ("Fronius", ""), "m1_Md": ("IG+V7.5U", ""), "m1_Opt": ("2.1.18", ""),
    "m1_Vr": ("6.2.0", ""), "m1_SN": ("50.25979", ""), "m1_DA": (1, ""),
    "m101_A": (5.49, "A"), "m101_AphA": (5.49, "A"),  # 0x0225 = 549, A_SF -2
    "m101_PhVphA": (243.0, "V"), "m101_W": (1307.0, "W"), "m101_Hz": (60.01, "Hz"),
    "m101_VA": (1334.0, "VA"), "m101_VAr": (267.0, "var"), "m101_PF": (97.9, "Pct"),
    "m101_WH": (1720967.0, "Wh"),  # 0x001A4287
    "m101_DCA": (3.8, "A"), "m101_DCV": (350.0, "V"), "m101_DCW": (1330.0, "W"),
    "m101_St": (4, ""), "m101_StVnd": (4, ""), "m101_Evt1": (0, ""),
}  # fmt: skip


def test_published_fronius_map_through_discovery_and_the_plugin(tmp_path: Path,
                                                                wasm: Path) -> None:
    """Model 1 with L = 65 (no Pad), then 101: discovered at 40000 on a real server and decoded
    to exactly the published values; the points the map marks not implemented give nothing."""
    words = [*CASES.hex_words(CASES.FRONIUS_HEX), *CASES.END]
    seen = _pipeline_measurements(tmp_path, wasm, words,
                                  PIPELINE.replace("models = [1, 103, 203]", ""),
                                  set(FRONIUS_EXPECTED))
    got = {name: (seen[name].value, seen[name].unit) for name in FRONIUS_EXPECTED}
    assert got == FRONIUS_EXPECTED
    # not implemented in the map: phases B and C, the phase-to-phase voltages, temperatures
    for name in ("AphB", "AphC", "PPVphAB", "PhVphB", "TmpCab", "TmpOt", "Pad"):
        assert f"m101_{name}" not in seen and f"m1_{name}" not in seen, name
