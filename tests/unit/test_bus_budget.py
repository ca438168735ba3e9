"""The RTU bus budget: how much of an RS-485 line's time a poll plan needs, and check-config's
verdict on it (warning above 80%, error above 100%, the plan printed either way)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from flux_edge.config import Config
from flux_edge.kinds import check_config
from flux_edge.sources.modbus.budget import bus_budget
from flux_edge.sources.modbus.spec import (
    ModbusDeviceConfig,
    ModbusRtuSource,
    ModbusTcpSource,
    RegisterConfig,
)

ROOT = Path(__file__).resolve().parents[2]


def reg(name: str, address: int, **kw: Any) -> RegisterConfig:
    return RegisterConfig(name=name, address=address, **kw)


def bus(*devices: ModbusDeviceConfig, **kw: Any) -> Config:
    kw.setdefault("port", "/dev/ttyUSB0")
    return Config(sources={"line": ModbusRtuSource(devices=devices, **kw)})


TEN_REGISTERS = ModbusDeviceConfig(
    name="meter", unit_id=1, registers=tuple(reg(f"r{i}", i) for i in range(10)), interval=0.1
)


def test_hand_computed_9600_8n1_ten_registers_every_100_ms() -> None:
    budget = bus_budget(bus(TEN_REGISTERS, baudrate=9600, parity="N"), "line")
    # 8N1: 1 start + 8 data + 0 parity + 1 stop = 10 bits per byte -> 1/960 s per byte.
    byte = 10 / 9600
    # Request: unit, function, address (2), count (2), CRC (2) = 8 bytes.
    # Response: unit, function, byte count, 10 registers * 2 bytes, CRC (2) = 25 bytes.
    wire = (8 + 25) * byte  # 34.375 ms
    gap = 3.5 * byte  # 3.646 ms of silence after each of the two frames
    turnaround = 0.005  # the default: the slave's reply delay
    per_poll = wire + 2 * gap + turnaround  # 46.667 ms
    assert per_poll == pytest.approx(0.0466667, abs=1e-6)
    assert budget.utilisation == pytest.approx(per_poll / 0.1)  # 46.7% of the line's time
    (request,) = budget.requests
    assert (request.request_bytes, request.response_bytes) == (8, 25)
    assert request.wire == pytest.approx(wire)
    assert request.seconds == pytest.approx(per_poll)
    assert (budget.bits_per_char, budget.framing, budget.gap) == (10, "8N1", pytest.approx(gap))
    assert budget.lines[1] == (
        "  meter unit 1: read holding registers 0..9 every 100 ms: 8 B + 25 B = 33 B -> 34.4 ms "
        "+ 12.3 ms gaps and turnaround = 46.7 ms (47%)"
    )
    assert budget.lines[-1] == "bus line: 9600 baud 8N1: 0.467 s of traffic per 1 s = 47%"


@pytest.mark.parametrize(
    ("framing", "bits"),
    [(("E", 1, 8), 11), (("N", 2, 8), 11), (("O", 2, 8), 12), (("E", 1, 7), 10)],
)
def test_bits_per_character(framing: tuple[str, int, int], bits: int) -> None:
    parity, stopbits, bytesize = framing
    cfg = bus(TEN_REGISTERS, baudrate=9600, parity=parity, stopbits=stopbits, bytesize=bytesize)
    budget = bus_budget(cfg, "line")
    assert budget.bits_per_char == bits
    assert budget.requests[0].wire == pytest.approx(33 * bits / 9600)
    assert budget.framing == f"{bytesize}{parity}{stopbits}"


def test_inter_frame_gap_is_fixed_above_19200_baud_unless_configured() -> None:
    assert bus_budget(bus(TEN_REGISTERS, baudrate=19200), "line").gap == pytest.approx(
        3.5 * 11 / 19200
    )
    assert bus_budget(bus(TEN_REGISTERS, baudrate=38400), "line").gap == 0.00175
    assert bus_budget(bus(TEN_REGISTERS, baudrate=115200), "line").gap == 0.00175
    given = bus_budget(bus(TEN_REGISTERS, baudrate=9600, inter_frame=0.01), "line")
    assert given.gap == 0.01
    slow = bus_budget(bus(TEN_REGISTERS, baudrate=9600, turnaround=0.05), "line")
    assert slow.requests[0].seconds - slow.requests[0].wire == pytest.approx(2 * slow.gap + 0.05)


def test_bits_and_wide_types() -> None:
    device = ModbusDeviceConfig(
        name="io",
        unit_id=7,
        registers=(
            *(reg(f"c{i}", i, function="coil") for i in range(20)),
            reg("energy", 0, function="input", type="float64"),
            reg("serial", 4, function="input", type="string", count=10),
        ),
    )
    budget = bus_budget(bus(device, baudrate=9600, parity="N"), "line")
    by_read = {r.read: r.response_bytes for r in budget.requests}
    assert by_read == {
        "read coils 0..19": 5 + math.ceil(20 / 8),  # 20 bits in 3 bytes
        "read input registers 0..13": 5 + 2 * 14,  # float64 (4) + gap (0) + string (10)
    }


def test_per_point_intervals_devices_and_the_bus_interval_add_up() -> None:
    fast = ModbusDeviceConfig(
        name="a",
        unit_id=1,
        registers=(reg("power", 0), reg("energy", 100, type="uint32", interval=60.0)),
    )
    slow = ModbusDeviceConfig(name="b", unit_id=2, registers=(reg("t", 1),), interval=10.0)
    budget = bus_budget(bus(fast, slow, baudrate=9600, interval=2.0), "line")
    plan = [(r.device, r.unit_id, r.read, r.interval) for r in budget.requests]
    assert plan == [
        ("a", 1, "read holding registers 0", 2.0),  # the bus's interval (device's is 0)
        ("a", 1, "read holding registers 100..101", 60.0),  # the point's own
        ("b", 2, "read holding registers 1", 10.0),  # the device's
    ]
    assert budget.utilisation == pytest.approx(sum(r.seconds / r.interval for r in budget.requests))


def test_only_rtu_sources_have_a_budget() -> None:
    cfg = Config(
        sources={
            "tcp": ModbusTcpSource(host="h", registers=(reg("x", 0),)),
            "line": ModbusRtuSource(port="/dev/ttyUSB0", devices=(TEN_REGISTERS,)),
        }
    )
    with pytest.raises(ValueError, match="not a modbus_rtu source"):
        bus_budget(cfg, "tcp")
    with pytest.raises(KeyError):
        bus_budget(cfg, "nope")


# --- check-config -------------------------------------------------------------------------------

PLANT = """\
[plugins.dec]

[sources.plant_rtu]
type = "modbus_rtu"
port = "/dev/ttyUSB3"
baudrate = 9600
parity = "E"
interval = "{interval}"
chain = ["dec"]
devices = [{{ name = "main", unit_id = 1, profile = "eastron_sdm630" }}]
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "dec.wasm").write_bytes(b"\0asm\1\0\0\0")
    return tmp_path


def plant(site: Path, interval: str) -> Path:
    path = site / f"plant-{interval}.toml"
    path.write_text(PLANT.format(interval=interval), encoding="utf-8")
    return path


def test_a_busy_bus_is_a_warning_with_the_plan(site: Path) -> None:
    path = plant(site, "400ms")
    cfg, problems = check_config(path)
    assert cfg is not None
    (p,) = problems
    assert (p.severity, p.path, p.line) == ("warning", "sources.plant_rtu", 3)
    utilisation = bus_budget(cfg, "plant_rtu").utilisation
    assert 0.8 < utilisation <= 1.0
    assert f"need {round(utilisation * 100)}% of the line's time (more than 80%)" in p.message
    assert "main unit 1: read input registers 0..79 every 400 ms: 8 B + 165 B = 173 B" in p.message
    assert "bus plant_rtu: 9600 baud 8E1:" in p.message
    assert check_config(plant(site, "1s"))[1] == []  # 33%: no comment


def test_check_config_cli_rejects_an_overcommitted_bus(site: Path) -> None:
    path = plant(site, "250ms")
    cfg, _ = check_config(plant(site, "1s"))
    assert cfg is not None
    # The same plan at 1 s, scaled: 4 reads of the SDM630 map take about 327 ms at 9600 8E1.
    utilisation = bus_budget(cfg, "plant_rtu").utilisation * 4
    assert utilisation > 1.0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "flux_edge", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{path}:3:10: sources.plant_rtu: error: the RTU bus is overcommitted")
    assert (
        f"its polls need {round(utilisation * 100)}% of the line's time (more than 100%)" in first
    )
    assert (
        f"bus plant_rtu: 9600 baud 8E1: {utilisation:.3g} s of traffic per 1 s = "
        f"{round(utilisation * 100)}% > 100%"
    ) in result.stderr
    assert "main unit 1: read input registers 200..207 every 250 ms" in result.stderr
    assert "1 error(s)" in result.stderr


def test_budget_is_skipped_while_the_config_has_other_errors(site: Path) -> None:
    path = plant(site, "250ms")
    path.write_text(path.read_text().replace('parity = "E"', 'parity = "X"'), encoding="utf-8")
    _, problems = check_config(path)
    assert [p.path for p in problems] == ["sources.plant_rtu.parity"]


def test_bus_budget_of_a_loaded_config_uses_profiles(site: Path) -> None:
    text = PLANT.format(interval="2s") + textwrap.dedent("""
        [[sources.plant_rtu.devices]]
        name = "sensor"
        unit_id = 9
        profile = "xy_md02"
        interval = "10s"
        """)
    path = site / "plant.toml"
    path.write_text(text.replace("devices = [", "# devices = ["), encoding="utf-8")
    cfg, problems = check_config(path)
    assert cfg is not None, problems
    budget = bus_budget(cfg, "plant_rtu")
    assert [(r.device, r.read) for r in budget.requests] == [
        ("sensor", "read input registers 1..2"),
    ]


# --- SunSpec devices: their blocks counted by the models' standard lengths ----------------------


def sunspec_device(**kw: Any) -> ModbusDeviceConfig:
    kw.setdefault("name", "inverter")
    return ModbusDeviceConfig(unit_id=1, discover="sunspec", interval=1.0, **kw)


def test_sunspec_models_are_counted_by_their_standard_lengths() -> None:
    budget = bus_budget(bus(sunspec_device(models=(1, 103, 203)), baudrate=9600, parity="N"),
                        "line")
    byte = 10 / 9600
    gap = 3.5 * byte
    # model 1 = 66 registers, 103 = 50, 203 = 105: one request each (at most 125 per request)
    assert [(r.request_bytes, r.response_bytes) for r in budget.requests] == [
        (8, 5 + 2 * 66), (8, 5 + 2 * 50), (8, 5 + 2 * 105)]
    per_poll = sum((8 + 5 + 2 * n) * byte + 2 * gap + 0.005 for n in (66, 50, 105))
    assert budget.utilisation == pytest.approx(per_poll / 1.0)
    assert budget.lines[1].startswith(
        "  inverter unit 1: SunSpec model 1 (configured), 66 holding registers every 1 s: "
        "8 B + 137 B = 145 B -> 151.0 ms")


def test_sunspec_without_models_counts_the_common_model_and_one_inverter_and_says_so() -> None:
    budget = bus_budget(bus(sunspec_device(), baudrate=19200), "line")
    assert [r.response_bytes for r in budget.requests] == [5 + 2 * 66, 5 + 2 * 50]
    assert all("assumed: set models" in r.read for r in budget.requests)


def test_sunspec_model_of_unknown_length_is_named_not_counted() -> None:
    budget = bus_budget(bus(sunspec_device(models=(103, 64110)), baudrate=19200), "line")
    assert len(budget.requests) == 1
    assert any("SunSpec models 64110 not counted" in line for line in budget.lines)


def test_sunspec_devices_are_counted_each_with_their_models() -> None:
    # 211 (float meter) is 124 registers, within one request's 125; 203 on a second device
    cfg = bus(sunspec_device(models=(211,)), sunspec_device(name="m2", models=(203,)),
              baudrate=19200)
    assert [r.response_bytes for r in bus_budget(cfg, "line").requests] == [253, 215]


def test_sunspec_devices_can_overcommit_the_bus(tmp_path: Path) -> None:
    path = tmp_path / "flux.toml"
    path.write_text(textwrap.dedent("""
        [sources.pv]
        type = "modbus_rtu"
        port = "/dev/ttyUSB0"
        baudrate = 9600
        interval = "200ms"
        devices = [{ name = "inverter", discover = "sunspec", models = [1, 103, 203] }]
        """), encoding="utf-8")
    _, problems = check_config(path)
    (problem,) = [p for p in problems if "overcommitted" in str(p)]
    assert "SunSpec model 203 (configured)" in str(problem)
