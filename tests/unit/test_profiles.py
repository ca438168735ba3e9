"""Device profiles: the shipped register maps, how a device finds its profile, how the profile and
the device's own registers merge, and problems reported in the profile file itself."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from flux_edge.errors import ConfigError, Problem
from flux_edge.kinds import check_config, load_config
from flux_edge.sources.modbus.plan import plan_reads
from flux_edge.sources.modbus.profiles import (
    bundled_profile_dir,
    load_profile,
    profile_search_paths,
)
from flux_edge.sources.modbus.spec import DeviceProfile, ModbusRtuSource

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.name for p in (ROOT / "config" / "devices").glob("*.toml"))


def test_at_least_three_profiles_are_shipped() -> None:
    assert {"eastron_sdm120.toml", "eastron_sdm630.toml", "xy_md02.toml"} <= set(SHIPPED)


def test_package_profiles_are_identical_to_config_devices() -> None:
    """config/devices/ is where people read them; flux_edge/profiles/ is what the wheel ships."""
    packaged = sorted(p.name for p in bundled_profile_dir().glob("*.toml"))
    assert packaged == SHIPPED
    for name in SHIPPED:
        assert (bundled_profile_dir() / name).read_bytes() == (
            ROOT / "config" / "devices" / name
        ).read_bytes(), f"{name}: copy config/devices/{name} to flux_edge/profiles/"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_and_cite_their_documentation(name: str) -> None:
    profile = load_profile(ROOT / "config" / "devices" / name)
    assert isinstance(profile, DeviceProfile)
    info = profile.profile
    assert info.manufacturer and info.model and info.description
    assert info.source.startswith(("https://", "http://")), "the source of the register map"
    names = [r.name for r in profile.registers]
    assert len(names) == len(set(names))
    assert all(r.function in ("input", "holding") for r in profile.registers)


# Facts from the manufacturers' register tables (0-based protocol addresses).
SDM_COMMON = {
    "frequency": 0x46,
    "import_energy": 0x48,
    "export_energy": 0x4A,
    "import_reactive_energy": 0x4C,
    "export_reactive_energy": 0x4E,
    "total_energy": 0x156,
    "total_reactive_energy": 0x158,
}


def _map(name: str) -> dict[str, tuple[str, int, str]]:
    profile = load_profile(ROOT / "config" / "devices" / name)
    return {r.name: (r.function, r.address, r.type) for r in profile.registers}


def test_eastron_sdm120_addresses() -> None:
    got = _map("eastron_sdm120.toml")
    expected = {
        "voltage": 0x00,
        "current": 0x06,
        "power": 0x0C,
        "apparent_power": 0x12,
        "reactive_power": 0x18,
        "power_factor": 0x1E,
        "phase_angle": 0x24,
        **SDM_COMMON,
    }
    assert {name: address for name, (_, address, _) in got.items()} == expected
    assert {(function, type_) for function, _, type_ in got.values()} == {("input", "float32")}


def test_eastron_sdm630_addresses() -> None:
    got = _map("eastron_sdm630.toml")
    addresses = {name: address for name, (_, address, _) in got.items()}
    for phase, offset in (("l1", 0), ("l2", 2), ("l3", 4)):
        assert addresses[f"voltage_{phase}"] == 0x00 + offset
        assert addresses[f"current_{phase}"] == 0x06 + offset
        assert addresses[f"power_{phase}"] == 0x0C + offset
        assert addresses[f"power_factor_{phase}"] == 0x1E + offset
    assert addresses["power"] == 0x34
    assert addresses["voltage_l1_l2"] == 0xC8
    assert addresses["current_n"] == 0xE0
    for name, address in SDM_COMMON.items():
        assert addresses[name] == address
    assert {(function, type_) for function, _, type_ in got.values()} == {("input", "float32")}


@pytest.mark.parametrize("name", ["eastron_sdm120.toml", "eastron_sdm630.toml"])
def test_eastron_maps_read_at_most_40_parameters_per_request(name: str) -> None:
    """The meters refuse reads of more than 40 parameters (80 registers)."""
    profile = load_profile(ROOT / "config" / "devices" / name)
    for max_gap in (0, 8, 123):
        blocks = plan_reads(profile.registers, max_gap)
        assert all(b.count <= 80 for b in blocks), (max_gap, blocks)


def test_xy_md02_map() -> None:
    profile = load_profile(ROOT / "config" / "devices" / "xy_md02.toml")
    got = {r.name: (r.function, r.address, r.type, r.scale, r.unit) for r in profile.registers}
    assert got == {
        "temperature": ("input", 1, "int16", 0.1, "°C"),
        "humidity": ("input", 2, "uint16", 0.1, "%"),
    }


# --- resolution and merge -----------------------------------------------------------------------

CONFIG = """\
[plugins.dec]

[sources.bus]
type = "modbus_rtu"
port = "/dev/ttyUSB7"
baudrate = 9600
parity = "N"
interval = "5s"
chain = ["dec"]

[[sources.bus.devices]]
name = "main"
unit_id = 1
profile = "eastron_sdm630"

[[sources.bus.devices]]
name = "pump"
unit_id = 2
profile = "eastron_sdm120"

[[sources.bus.devices.registers]]
name = "power"
function = "input"
address = 0x000C
type = "float32"
unit = "kW"
scale = 0.001

[[sources.bus.devices.registers]]
name = "serial_number"
function = "holding"
address = 0xFC00
type = "uint32"
interval = "1h"
"""

MY_PROFILE = """\
[profile]
manufacturer = "ACME"
model = "T1"
description = "a thermometer"
source = "https://example.org/t1.pdf"

[[registers]]
name = "temperature"
function = "input"
address = 3
type = "int16"
scale = 0.1
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "dec.wasm").write_bytes(b"\0asm\1\0\0\0")
    return tmp_path


def write(site: Path, text: str, name: str = "flux.toml") -> Path:
    path = site / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def test_profile_registers_come_first_and_a_device_entry_replaces_the_profiles(
    site: Path,
) -> None:
    cfg = load_config(write(site, CONFIG))
    bus = cfg.sources["bus"]
    assert isinstance(bus, ModbusRtuSource)
    main, pump = bus.devices
    sdm630 = load_profile(bundled_profile_dir() / "eastron_sdm630.toml")
    assert main.registers == sdm630.registers  # the profile's map, unchanged
    assert (main.interval, main.timeout) == (5.0, 0.2)  # the bus's
    sdm120 = load_profile(bundled_profile_dir() / "eastron_sdm120.toml")
    names = [r.name for r in pump.registers]
    assert names == [r.name for r in sdm120.registers if r.name != "power"] + [
        "power",
        "serial_number",
    ]
    power = pump.registers[names.index("power")]
    assert (power.unit, power.scale) == ("kW", 0.001)  # the device's entry, not the profile's
    assert pump.registers[-1].interval == 3600.0


def test_profile_dirs_are_searched_before_the_shipped_profiles(site: Path) -> None:
    cfg_path = write(site, CONFIG)
    # a local file of the same name wins over the shipped one
    write(site, MY_PROFILE, "devices/eastron_sdm630.toml")
    cfg = load_config(cfg_path)
    bus = cfg.sources["bus"]
    assert isinstance(bus, ModbusRtuSource)
    assert [r.name for r in bus.devices[0].registers] == ["temperature"]
    assert profile_search_paths(cfg, "x") == [
        site.resolve() / "devices" / "x.toml",
        bundled_profile_dir() / "x.toml",
    ]
    # profile_dirs decides where to look, relative to the config file
    text = "[daemon]\nprofile_dirs = ['maps', '/nonexistent']\n" + CONFIG
    write(site, MY_PROFILE, "maps/acme_t1.toml")
    text = text.replace('profile = "eastron_sdm630"', 'profile = "acme_t1"')
    cfg = load_config(write(site, text))
    assert profile_search_paths(cfg, "acme_t1")[:2] == [
        site.resolve() / "maps" / "acme_t1.toml",
        Path("/nonexistent/acme_t1.toml"),
    ]


def test_a_profile_can_be_a_path(site: Path) -> None:
    write(site, MY_PROFILE, "maps/t1.toml")
    text = CONFIG.replace('profile = "eastron_sdm630"', 'profile = "maps/t1.toml"')
    bus = load_config(write(site, text)).sources["bus"]
    assert isinstance(bus, ModbusRtuSource)
    assert [r.name for r in bus.devices[0].registers] == ["temperature"]


def test_a_missing_profile_names_every_place_searched(site: Path) -> None:
    text = CONFIG.replace('profile = "eastron_sdm630"', 'profile = "eastron_sdm63"')
    _, problems = check_config(write(site, text))
    (p,) = problems
    assert p.path == "sources.bus.devices[0].profile"
    assert (p.line, p.column) == (14, 11)
    assert str(site / "devices") in p.message and str(bundled_profile_dir()) in p.message
    assert 'did you mean "eastron_sdm630"?' in p.message
    text = CONFIG.replace('profile = "eastron_sdm630"', 'profile = "maps/none.toml"')
    _, problems = check_config(write(site, text))
    (p,) = problems
    assert f"profile file {site / 'maps' / 'none.toml'} does not exist" in p.message


BROKEN_PROFILE = """\
[profile]
manufacturer = "ACME"
model = "T1"

[[registers]]
name = "temperature"
function = "input"
address = 3
type = "int17"

[[registers]]
name = "temperature"
address = 4
"""


def test_problems_in_a_profile_are_reported_in_that_file_once(site: Path) -> None:
    profile = write(site, BROKEN_PROFILE, "devices/acme_t1.toml")
    text = CONFIG.replace('profile = "eastron_sdm630"', 'profile = "acme_t1"').replace(
        'profile = "eastron_sdm120"', 'profile = "acme_t1"'
    )  # two devices use it
    cfg, problems = check_config(write(site, text))
    assert cfg is None
    assert [(p.file, p.path, p.line, p.column) for p in problems] == [
        (str(profile), "registers[0].type", 9, 8),
        (str(profile), "registers[1].name", 12, 8),
    ], "\n".join(map(str, problems))
    assert 'did you mean "int16"?' in problems[0].message
    assert "unique within a profile" in problems[1].message
    with pytest.raises(ConfigError) as info:
        load_profile(profile)
    assert [p.line for p in info.value.problems] == [9, 12]


def test_profile_syntax_and_schema_errors(site: Path) -> None:
    profile = write(site, '[profile]\nmanufacturer = "x\n', "devices/bad.toml")
    text = CONFIG.replace('profile = "eastron_sdm630"', 'profile = "bad"')
    _, problems = check_config(write(site, text))
    (p,) = errors_of(problems)
    assert p.file == str(profile) and p.line == 2 and "invalid TOML" in p.message
    write(site, '[profile]\nmodel = "x"\nvendor = "y"\n', "devices/bad.toml")
    _, problems = check_config(write(site, text))
    assert {(p.path, p.line) for p in problems} == {
        ("profile.manufacturer", 1),
        ("profile.vendor", 3),
        ("registers", 0),
    }, "\n".join(map(str, problems))
    write(site, 'registers = []\n[profile]\nmanufacturer = "x"\nmodel = "y"\n', "devices/bad.toml")
    _, problems = check_config(write(site, text))
    (p,) = problems
    assert (p.path, p.line) == ("registers", 1) and "at least one register" in p.message


def test_bad_profile_references(site: Path) -> None:
    text = CONFIG.replace('profile = "eastron_sdm630"', 'profile = "../eastron"')
    _, problems = check_config(write(site, text))
    (p,) = problems
    assert p.path == "sources.bus.devices[0].profile" and 'ending in ".toml"' in p.message


def test_a_device_entry_is_checked_where_it_is_written(site: Path) -> None:
    text = CONFIG.replace('type = "uint32"\ninterval = "1h"', 'type = "uint33"')
    _, problems = check_config(write(site, text))
    (p,) = problems
    assert (p.file, p.path) == (str(site / "flux.toml"), "sources.bus.devices[1].registers[1].type")
    assert p.line == text.splitlines().index('type = "uint33"') + 1
