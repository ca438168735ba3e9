"""flux_edge.config: the loader reports every problem, each at its file:line:column and key path."""

from __future__ import annotations

import math
import shutil
import textwrap
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
import tomlkit
from hypothesis import given, settings
from hypothesis import strategies as st

import flux_edge.config.load as config_load
import flux_edge.config.plugin_files as config_plugin_files
import flux_edge.config.positions as config_positions
import flux_edge.config.values as config_values
from flux_edge.actions.modbus_write_kind import ModbusWriteAction
from flux_edge.actions.serial_write_kind import SerialWriteAction
from flux_edge.config import (
    Config,
    build_config,
    bundled_plugin_dir,
    parse_duration,
    parse_size,
    plugin_search_paths,
    resolve_plugin_path,
)
from flux_edge.errors import ConfigError, Problem
from flux_edge.kinds import KINDS, check_config, check_config_text, load_config, load_config_text
from flux_edge.plugins import manifest as mf
from flux_edge.sources.modbus.spec import ModbusDeviceConfig, ModbusRtuSource, ModbusTcpSource
from flux_edge.sources.mqtt_kind import MqttSource, MqttSubscription
from flux_edge.sources.serial_kind import SerialSource
from tests.conftest import bundled_wasm

ROOT = Path(__file__).resolve().parents[2]

# A minimal valid file; tests append to it or replace parts of it.
BASE = """\
[plugins.dec]

[sources.boiler]
type = "modbus_tcp"
host = "127.0.0.1"
chain = ["dec"]

[[sources.boiler.registers]]
name = "temperature"
address = 0
type = "int16"
scale = 0.1

[[sources.boiler.registers]]
name = "burner"
function = "coil"
address = 0

[rules.overheat]
when = "temperature > 80"
actions = ["burner_off"]

[actions.burner_off]
type = "modbus_write"
source = "boiler"
address = 0
value = false
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with plugins/<name>.wasm dummies for the plugins the tests declare: empty
    modules whose manifests accept any config (these tests are about the config file; plugin
    configs against real manifests: tests/unit/test_plugin_config_check.py)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in ("dec", "modbus_decode", "json_normalize", "nmea0183"):
        (plugins / f"{name}.wasm").write_bytes(_dummy_module(name))
    return tmp_path


def _dummy_module(name: str) -> bytes:
    manifest = {
        "manifest": 1, "name": name, "version": "0.0.0", "abi": 1, "kind": "decode",
        "description": "test dummy", "license": "MIT", "config": {"type": "object"},
    }
    return mf.embed_section(b"\0asm\1\0\0\0", mf.SECTION, msgspec.json.encode(manifest))


def check(site: Path, text: str) -> list[Problem]:
    """Write ``text`` as site/flux.toml and check it; return every problem."""
    path = site / "flux.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    _, problems = check_config(path)
    return problems


def errors(site: Path, text: str) -> list[Problem]:
    return [p for p in check(site, text) if p.severity == "error"]


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def by_path(problems: list[Problem], path: str) -> Problem:
    found = [p for p in problems if p.path == path]
    assert found, f"no problem at {path}: " + "\n".join(map(str, problems))
    return found[0]


# --- a valid file ---------------------------------------------------------------------------------


def test_base_loads_into_frozen_structs(site: Path) -> None:
    (site / "flux.toml").write_text(BASE, encoding="utf-8")
    cfg = load_config(site / "flux.toml")
    assert cfg.path == str((site / "flux.toml").resolve())
    assert cfg.base_dir == site.resolve()
    src = cfg.sources["boiler"]
    assert isinstance(src, ModbusTcpSource)
    assert src.chain == ("dec",)
    assert [r.name for r in src.registers] == ["temperature", "burner"]
    assert src.registers[1].type == "bool"  # a coil defaults to bool
    assert src.interval == 1.0 and isinstance(src.interval, float)
    assert isinstance(cfg.actions["burner_off"], ModbusWriteAction)
    assert cfg.actions["burner_off"].value is False
    assert cfg.rules["overheat"].actions == ("burner_off",)
    with pytest.raises(AttributeError):
        cfg.path = "x"  # type: ignore[misc]


def test_durations_and_sizes_are_converted(site: Path) -> None:
    text = BASE.replace(
        "[plugins.dec]",
        '[plugins.dec]\ntimeout = "20ms"\nmemory_limit = "8MiB"\nquarantine = "1h30m"',
    ).replace('host = "127.0.0.1"', 'host = "127.0.0.1"\ninterval = 2\ntimeout = 0.25')
    cfg = load_config_text(text, str(site / "flux.toml"))
    assert cfg.plugins["dec"].timeout == pytest.approx(0.02)
    assert cfg.plugins["dec"].memory_limit == 8 * 1024 * 1024
    assert cfg.plugins["dec"].quarantine == 5400.0
    assert cfg.sources["boiler"].interval == 2.0
    assert cfg.sources["boiler"].timeout == 0.25


def test_problem_prints_as_file_line_col_path_severity_message(site: Path) -> None:
    p = only(errors(site, BASE.replace("address = 0\ntype", "address = 70000\ntype")))
    file = str(site / "flux.toml")
    assert str(p) == (
        f"{file}:10:11: sources.boiler.registers[0].address: error: "
        "must be between 0 and 65535, got 70000"
    )


# --- syntax -------------------------------------------------------------------------------------


def test_syntax_error_has_line_and_column(site: Path) -> None:
    p = only(check(site, '[daemon]\nlog_level = "info"\nqueue_size = \n'))
    assert (p.line, p.column) == (3, 14)
    assert p.message.startswith("invalid TOML")
    assert "value" in p.message and "missing" in p.message


def test_syntax_error_inside_array(site: Path) -> None:
    p = only(check(site, "[daemon]\nplugin_dirs = [\n  'a',\n  'b',,\n]\n"))
    assert (p.line, p.column) == (4, 7)
    assert "','" in p.message


def test_duplicate_key_points_at_the_second_definition(site: Path) -> None:
    p = only(check(site, '[daemon]\nlog_level = "info"\nqueue_size = 5\nlog_level = "debug"\n'))
    assert (p.line, p.column) == (4, 1)
    assert "already exists" in p.message and "only once" in p.message


def test_duplicate_table_points_at_the_second_header(site: Path) -> None:
    p = only(check(site, '[daemon]\nname = "a"\n\n[plugins.x]\n\n[daemon]\nlog_level = "info"\n'))
    assert (p.line, p.column) == (6, 2)


def test_unreadable_and_non_utf8_files_are_problems_not_exceptions(tmp_path: Path) -> None:
    cfg, problems = check_config(tmp_path / "missing.toml")
    assert cfg is None and "cannot read" in only(problems).message
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[daemon]\nname = "caf\xe9"\n')
    cfg, problems = check_config(bad)
    p = only(problems)
    assert cfg is None and (p.line, p.column) == (2, 12) and "UTF-8" in p.message
    with pytest.raises(ConfigError):
        load_config(bad)


# --- schema -------------------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_closest(site: Path) -> None:
    p = only(errors(site, BASE + '\n[source.x]\nhost = "a"\n'))
    assert p.path == "source"
    assert 'did you mean "sources"?' in p.message
    assert "daemon, plugins, sources, rules, actions" in p.message
    assert "path" not in p.message.split("allowed here:")[1]  # set by the loader only
    assert (p.line, p.column) == (29, 2)


def test_unknown_keys_at_several_depths(site: Path) -> None:
    text = (
        BASE.replace("[plugins.dec]", '[plugins.dec]\ntimout = "1s"')
        .replace('name = "burner"', 'name = "burner"\nadress = 3')
        .replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nintervall = "1s"')
        + "\n[daemon]\nqueue_sise = 10\n"
    )
    problems = errors(site, text)
    assert len(problems) == 4, "\n".join(map(str, problems))
    for path, suggestion, line in [
        ("plugins.dec.timout", "timeout", 2),
        ("sources.boiler.intervall", "interval", 7),
        ("sources.boiler.registers[1].adress", "address", 18),
        ("daemon.queue_sise", "queue_size", 33),
    ]:
        p = by_path(problems, path)
        assert f'did you mean "{suggestion}"?' in p.message, p
        assert (p.line, p.column) == (line, 1), p
    assert (
        "allowed here: name, address, function, type"
        in by_path(problems, "sources.boiler.registers[1].adress").message
    )


def test_unknown_key_without_close_match_lists_allowed_keys(site: Path) -> None:
    p = only(errors(site, BASE.replace("[plugins.dec]", "[plugins.dec]\nzzz = 1")))
    assert "did you mean" not in p.message
    assert "allowed here: module, file, timeout" in p.message


def test_plugin_config_table_takes_any_keys(site: Path) -> None:
    text = BASE.replace(
        "[plugins.dec]",
        '[plugins.dec]\nconfig = { anything = 1, nested = { list = [1, "a", true] } }',
    )
    cfg = load_config_text(text, str(site / "flux.toml"))
    assert cfg.plugins["dec"].config == {"anything": 1, "nested": {"list": [1, "a", True]}}


def test_plugin_config_must_be_json(site: Path) -> None:
    text = BASE.replace("[plugins.dec]", "[plugins.dec]\nconfig.when = 2024-01-02\nconfig.x = nan")
    problems = errors(site, text)
    assert "quote it as a string" in by_path(problems, "plugins.dec.config.when").message
    assert by_path(problems, "plugins.dec.config.x").line == 3


def test_wrong_type_deep_in_a_list(site: Path) -> None:
    text = BASE + textwrap.dedent("""
        [[sources.boiler.registers]]
        name = "setpoint"
        address = 1
        type = "int17"
        """)
    p = only(errors(site, text))
    assert p.path == "sources.boiler.registers[2].type"
    assert p.message.startswith(
        "expected one of bool, int16, uint16, int32, uint32, int64, uint64, float32, float64, "
        'string, got "int17"'
    )
    assert 'did you mean "int16"?' in p.message
    assert (p.line, p.column) == (32, 8)


def test_wrong_scalar_types(site: Path) -> None:
    text = (
        BASE.replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = "502"')
        .replace("scale = 0.1", 'scale = "0.1"')
        .replace('chain = ["dec"]', 'chain = "dec"')
        .replace("value = false", "value = 1.5")
    )
    problems = errors(site, text)
    assert by_path(problems, "sources.boiler.port").message == 'expected an integer, got "502"'
    assert by_path(problems, "sources.boiler.registers[0].scale").message == (
        'expected a number, got "0.1"'
    )
    assert by_path(problems, "sources.boiler.chain").message == (
        'expected an array of strings, got "dec"'
    )
    assert by_path(problems, "actions.burner_off.value").message == (
        "expected true or false or an integer, got 1.5"
    )


def test_missing_required_keys_point_at_their_table(site: Path) -> None:
    text = (
        BASE.replace('host = "127.0.0.1"\n', "")
        .replace('name = "burner"\nfunction = "coil"\naddress = 0', 'name = "burner"')
        .replace('type = "modbus_write"\n', "")
    )
    problems = errors(site, text)
    assert len(problems) == 3, "\n".join(map(str, problems))
    host = by_path(problems, "sources.boiler.host")
    assert host.message == 'missing required key "host" (a string)'
    assert (host.line, host.column) == (3, 10)
    address = by_path(problems, "sources.boiler.registers[1].address")
    assert (address.line, address.column) == (13, 18)  # the second [[...registers]] header
    tag = by_path(problems, "actions.burner_off.type")
    assert "modbus_write" in tag.message and tag.line == 20


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"50 ms"', "is not a duration"),
        ('"5"', 'has no unit: write 5 (a number of seconds) or "5s"'),
        ('"-1s"', "cannot be negative"),
        ('"30m1h"', "largest to smallest"),
        ("0", "must be greater than 0"),
        ('"0s"', "must be greater than 0"),
        ("-2.5", "cannot be negative"),
        ("true", "expected a duration"),
        ("inf", "finite"),
        ('"1x"', "is not a duration"),
    ],
)
def test_bad_durations(site: Path, value: str, fragment: str) -> None:
    text = BASE.replace('host = "127.0.0.1"', f'host = "127.0.0.1"\ninterval = {value}')
    p = only(errors(site, text))
    assert p.path == "sources.boiler.interval"
    assert fragment in p.message, p.message
    assert (p.line, p.column) == (6, 12)


def test_zero_quarantine_is_allowed_but_zero_timeout_is_not(site: Path) -> None:
    text = BASE.replace("[plugins.dec]", '[plugins.dec]\nquarantine = "0s"\ntimeout = "0ms"')
    p = only(errors(site, text))
    assert p.path == "plugins.dec.timeout"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"16mib"', 'did you mean "16MiB"?'),
        ('"16 Mb"', 'did you mean "16MB"?'),
        ('"0.1B"', "whole number of bytes"),
        ('"16"', "has no unit"),
        ("1024", "at least 65536"),
        ('"8GiB"', "at most 1073741824"),
        ('"lots"', "is not a size"),
    ],
)
def test_bad_sizes(site: Path, value: str, fragment: str) -> None:
    text = BASE.replace("[plugins.dec]", f"[plugins.dec]\nmemory_limit = {value}")
    p = only(errors(site, text))
    assert p.path == "plugins.dec.memory_limit"
    assert fragment in p.message, p.message


@pytest.mark.parametrize(
    ("old", "new", "path", "fragment"),
    [
        (
            'host = "127.0.0.1"',
            'host = "127.0.0.1"\nport = 0',
            "sources.boiler.port",
            "1 and 65535",
        ),
        ('host = "127.0.0.1"', 'host = "h"\nunit_id = 248', "sources.boiler.unit_id", "0 and 247"),
        ('host = "127.0.0.1"', 'host = ""', "sources.boiler.host", "must not be empty"),
        ('host = "127.0.0.1"', 'host = "a b"', "sources.boiler.host", "not a host name"),
        ('name = "burner"', 'name = "2burner"', "sources.boiler.registers[1].name", "[A-Za-z_]"),
        ('name = "burner"', 'name = "in"', "sources.boiler.registers[1].name", "reserved"),
        ('name = "burner"', 'name = "bur-ner"', "sources.boiler.registers[1].name", "letter"),
        ("address = 0\ntype", "address = -1\ntype", "sources.boiler.registers[0].address", "0 and"),
        (
            'type = "int16"',
            'type = "float32"\nfunction = "coil"',
            "sources.boiler.registers[0].type",
            'must be "bool"',
        ),
        ("[plugins.dec]", "[daemon]\nqueue_size = 0\n[plugins.dec]", "daemon.queue_size", "1 and"),
        (
            "[plugins.dec]",
            '[daemon]\nlog_level = "warn"\n[plugins.dec]',
            "daemon.log_level",
            'did you mean "warning"?',
        ),
        ("[plugins.dec]", '[daemon]\nname = "gw/1"\n[plugins.dec]', "daemon.name", "valid name"),
        ("[plugins.dec]", '[plugins.dec]\nmodule = "x.wasm"', "plugins.dec.module", "without"),
        ("[plugins.dec]", '[plugins.dec]\nmodule = "a/b"', "plugins.dec.module", '"file"'),
        ('when = "temperature > 80"', 'when = ""', "rules.overheat.when", "must not be empty"),
        (
            'actions = ["burner_off"]',
            'actions = ["burner_off"]\nmode = "once"',
            "rules.overheat.mode",
            "one of edge, level",
        ),
        (
            'actions = ["burner_off"]',
            'actions = ["burner_off"]\ninputs = { "a-b" = "int" }',
            "rules.overheat.inputs.a-b",
            "rule variable",
        ),
        ("value = false", "value = 1", "actions.burner_off.value", "a coil takes true or false"),
        (
            "value = false",
            'value = 70000\nfunction = "holding"',
            "actions.burner_off.value",
            "-32768 to 65535",
        ),
    ],
)
def test_ranges_and_names(site: Path, old: str, new: str, path: str, fragment: str) -> None:
    assert old in BASE
    p = only(errors(site, BASE.replace(old, new)))
    assert p.path == path
    assert fragment in p.message, p.message


def test_table_names_must_be_simple(site: Path) -> None:
    p = only(errors(site, BASE + '\n[plugins."my plugin"]\n'))
    assert p.path == 'plugins."my plugin"'
    assert "valid name" in p.message and (p.line, p.column) == (29, 10)


def test_register_names_unique_per_source(site: Path) -> None:
    text = BASE.replace('name = "burner"', 'name = "temperature"')
    p = only(errors(site, text))
    assert p.path == "sources.boiler.registers[1].name"
    assert "registers[0]" in p.message
    assert (p.line, p.column) == (15, 8)


def test_five_distinct_errors_give_five_problems(site: Path) -> None:
    text = (
        BASE.replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = 0')  # 1 range
        .replace('type = "int16"', 'type = "int17"')  # 2 literal
        .replace('name = "burner"', 'name = "burner"\nadress = 1')  # 3 unknown key
        .replace('actions = ["burner_off"]', 'actions = ["burner_of"]')  # 4 reference
        + '\n[daemon]\nqueue_size = "many"\n'  # 5 type
    )
    problems = check(site, text)
    assert len(problems) == 5, "\n".join(map(str, problems))
    assert all(p.severity == "error" and p.line > 0 for p in problems)
    assert [p.line for p in problems] == sorted(p.line for p in problems)
    with pytest.raises(ConfigError) as info:
        load_config(site / "flux.toml")
    assert info.value.problems == problems
    assert str(info.value).count("\n") == 4


# --- line and column of every shape of TOML -----------------------------------------------------

SHAPES = """\
# comment line
[daemon]
log_level = "info"

[plugins.dec]
timeout = "1s"

[sources.inl]
type = "modbus_tcp"
host = "h"
chain = ["dec"]
registers = [
  { name = "a", address = 0 },
  { name = "b", address = 1, function = "holding", type = "int99" },
  {name="c",address=2,scale="x"},
]

[sources.aot]
type = "modbus_tcp"
host = "h"

[[sources.aot.registers]]
name = "a"
address = 0

[[sources.aot.registers]]
name = "b"
address = "one"

[sources.aot.unexpected]

sources.dot.type = "modbus_tcp"
"""


def test_positions_of_headers_array_tables_inline_tables_and_dotted_keys(site: Path) -> None:
    # dotted keys at the top level must come before the first header, so put them there
    text = "sources.dot.type = 'modbus_tcp'\nsources.dot.host = 'h'\nsources.dot.port = 0\n"
    text += SHAPES.replace('sources.dot.type = "modbus_tcp"\n', "")
    text += '\n[rules.r]\nwhen = "a > 1"\nactions = []\ndevice . "x" = 1\n'
    problems = errors(site, text)
    where = {p.path: (p.line, p.column) for p in problems}
    assert where == {
        "sources.dot.port": (3, 20),  # dotted key's value
        "sources.inl.registers[1].type": (17, 59),  # inside an inline table in an array
        "sources.inl.registers[2].scale": (18, 29),  # inline table without spaces
        "sources.aot.registers[1].address": (31, 11),  # second [[...]] entry, not the first
        "sources.aot.unexpected": (33, 14),  # table header (the last name)
        "rules.r.device": (39, 1),  # a dotted key where a string was expected
    }, "\n".join(map(str, problems))


def test_position_of_a_dotted_key_inside_a_table(site: Path) -> None:
    text = BASE.replace("[rules.overheat]", "[rules.overheat]\ninputs.x = 'weird'")
    p = only(errors(site, text))
    assert p.path == "rules.overheat.inputs.x"
    assert (p.line, p.column) == (20, 12)


def test_position_falls_back_to_the_enclosing_key() -> None:
    positions = config_positions._scan("[daemon]\nname = 'x'\n\n  [ sources . a ]\nhost = 1\n")
    assert positions.key(("daemon", "nope", 3)) == (1, 2)
    assert positions.value(("sources", "a", "registers")) == (4, 15)
    assert positions.value(("sources", "a", "host")) == (5, 8)
    assert positions.key(("sources",)) == (4, 5)
    assert positions.key(("elsewhere",)) == (0, 0)


def test_address_of_a_32_bit_register_must_leave_room_for_two_words(site: Path) -> None:
    text = BASE.replace('address = 0\ntype = "int16"', 'address = 65535\ntype = "uint32"')
    p = only(errors(site, text))
    assert p.path == "sources.boiler.registers[0].address" and "65534" in p.message
    assert errors(site, text.replace("65535", "65534")) == []


def test_quoted_keys_and_multiline_strings_do_not_confuse_positions(site: Path) -> None:
    text = (
        '[plugins."dec"]\nconfig.s = """\nline one\n"quoted" ] [ = {\n"""\n'
        "config.t = '''\n'''\n"
        + BASE.split("\n", 1)[1].replace("port", "x")
        + "\n[daemon]\nbatch_max = 0\n"
    )
    p = only(errors(site, text))
    assert p.path == "daemon.batch_max" and (p.line, p.column) == (36, 13)


# --- references ---------------------------------------------------------------------------------


def test_reference_errors(site: Path) -> None:
    text = (
        BASE.replace('chain = ["dec"]', 'chain = ["dec", "decode2"]')
        .replace('actions = ["burner_off"]', 'actions = ["burner_off", "burner_of"]')
        .replace('source = "boiler"', 'source = "boilr"')
    )
    problems = errors(site, text)
    assert len(problems) == 3, "\n".join(map(str, problems))
    chain = by_path(problems, "sources.boiler.chain[1]")
    assert 'no plugin named "decode2"' in chain.message and "declared plugins: dec" in chain.message
    assert (chain.line, chain.column) == (6, 17)
    act = by_path(problems, "rules.overheat.actions[1]")
    assert 'did you mean "burner_off"?' in act.message and (act.line, act.column) == (21, 26)
    src = by_path(problems, "actions.burner_off.source")
    assert 'did you mean "boiler"?' in src.message and (src.line, src.column) == (25, 10)


def test_unknown_device_and_unused_plugin_are_warnings(site: Path) -> None:
    text = BASE.replace(
        "[rules.overheat]", '[rules.overheat]\ndevice = "boiler2"\ninputs.temperature = "double"'
    ) + ("\n[plugins.modbus_decode]\n")
    cfg, problems = check_config_text(text, str(site / "flux.toml"))
    assert cfg is not None
    assert {p.path for p in problems} == {"rules.overheat.device", "plugins.modbus_decode"}
    assert all(p.severity == "warning" for p in problems)
    assert 'did you mean "boiler"?' in by_path(problems, "rules.overheat.device").message
    assert load_config_text(text, str(site / "flux.toml")) == cfg  # warnings do not fail a load


def test_missing_wasm_names_every_place_searched(site: Path) -> None:
    text = BASE.replace("[plugins.dec]", '[plugins.dec]\nmodule = "nowhere"')
    text = '[daemon]\nplugin_dirs = ["plugins", "/opt/x"]\n' + text
    p = only(errors(site, text))
    assert p.path == "plugins.dec.module" and (p.line, p.column) == (4, 10)
    assert "nowhere.wasm not found" in p.message
    for place in (site / "plugins", Path("/opt/x"), bundled_plugin_dir()):
        assert str(place) in p.message
    assert "plugins/build-all.sh" in p.message and "flux-edge plugin build" in p.message


def test_file_and_module_together_is_an_error(site: Path) -> None:
    text = BASE.replace("[plugins.dec]", '[plugins.dec]\nmodule = "dec"\nfile = "plugins/dec.wasm"')
    p = only(errors(site, text))
    assert p.path == "plugins.dec.file" and "not both" in p.message


def test_plugin_lookup_order(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "only_bundled.wasm").write_bytes(_dummy_module("only_bundled"))
    (bundled / "dec.wasm").write_bytes(_dummy_module("dec"))
    (site / "extra").mkdir()
    (site / "extra" / "dec.wasm").write_bytes(_dummy_module("dec"))
    (site / "own.wasm").write_bytes(_dummy_module("own"))
    monkeypatch.setattr(config_plugin_files, "bundled_plugin_dir", lambda: bundled)
    text = (
        '[daemon]\nplugin_dirs = ["extra", "plugins"]\n'
        + BASE
        + (
            '\n[plugins.ob]\nmodule = "only_bundled"\n[plugins.own]\nfile = "own.wasm"\n'
            '[plugins.renamed]\nmodule = "json_normalize"\n'
        )
    )
    cfg = load_config_text(text, str(site / "flux.toml"))
    assert resolve_plugin_path(cfg, "dec") == site.resolve() / "extra" / "dec.wasm"
    assert resolve_plugin_path(cfg, "ob") == bundled / "only_bundled.wasm"
    assert resolve_plugin_path(cfg, "own") == site.resolve() / "own.wasm"
    assert resolve_plugin_path(cfg, "renamed") == site.resolve() / "plugins/json_normalize.wasm"
    assert plugin_search_paths(cfg, "dec") == [
        site.resolve() / "extra" / "dec.wasm",
        site.resolve() / "plugins" / "dec.wasm",
        bundled / "dec.wasm",
    ]
    (site / "extra" / "dec.wasm").unlink()
    assert resolve_plugin_path(cfg, "dec") == site.resolve() / "plugins" / "dec.wasm"
    with pytest.raises(ConfigError) as info:
        resolve_plugin_path(cfg, "nope")
    assert "declared: dec, ob, own, renamed" in str(info.value)
    (site / "own.wasm").unlink()
    with pytest.raises(ConfigError) as info:
        resolve_plugin_path(cfg, "own")
    assert f"file {site.resolve() / 'own.wasm'} does not exist" in str(info.value)


def test_bundled_dir_is_inside_the_package() -> None:
    assert bundled_plugin_dir() == ROOT / "flux_edge" / "plugins" / "bundled"


def test_rule_condition_type_error_points_at_its_column(site: Path) -> None:
    text = BASE.replace('when = "temperature > 80"', "when = 'temperature > \"80\"'")
    p = only(errors(site, text))
    assert p.path == "rules.overheat.when"
    assert "overheat" in p.message
    line = text.splitlines()[p.line - 1]
    assert line.startswith("when = ")
    assert line[p.column - 1] == ">"  # the operator CEL complains about


def test_rule_conditions_are_not_checked_against_a_broken_source(site: Path) -> None:
    # the source error alone is reported, not a knock-on "undeclared temperature"
    text = BASE.replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = -1')
    p = only(errors(site, text))
    assert p.path == "sources.boiler.port"


# --- the shipped configs ------------------------------------------------------------------------


def test_demo_config_is_shipped_identically_in_the_package() -> None:
    shipped = ROOT / "flux_edge" / "demo" / "demo.toml"
    assert shipped.read_bytes() == (ROOT / "config" / "demo.toml").read_bytes()


@pytest.mark.parametrize("name", ["demo.toml", "example.toml"])
def test_shipped_configs_load(site: Path, name: str) -> None:
    """Structure and references, with dummy plugin files next to a copy of the config."""
    shutil.copy(ROOT / "config" / name, site / name)
    cfg, problems = check_config(site / name)
    assert cfg is not None, "\n".join(map(str, problems))
    assert problems == []


def test_demo_config_contents() -> None:
    text = (ROOT / "config" / "demo.toml").read_text(encoding="utf-8")
    cfg_path = str(ROOT / "config" / "demo.toml")
    cfg = build_config({**_without_plugin_check(text, cfg_path), "path": cfg_path}, KINDS)
    boiler = cfg.sources["boiler"]
    assert (boiler.host, boiler.port, boiler.unit_id, boiler.interval) == (
        "127.0.0.1",
        15020,
        1,
        0.5,
    )
    assert boiler.chain == ("modbus_decode",)
    regs = {r.name: (r.function, r.address, r.type, r.scale, r.unit) for r in boiler.registers}
    assert regs == {
        "temperature": ("holding", 0, "int16", 0.1, "°C"),
        "burner": ("coil", 0, "bool", 1.0, ""),
        "setpoint": ("holding", 1, "int16", 0.1, "°C"),
    }
    assert cfg.plugins["modbus_decode"].file == ""
    assert (cfg.rules["overheat"].when, cfg.rules["overheat"].actions) == (
        "temperature > 80",
        ("burner_off",),
    )
    assert (cfg.rules["reheat"].when, cfg.rules["reheat"].actions) == (
        "temperature < 60",
        ("burner_on",),
    )
    for name, value in (("burner_off", False), ("burner_on", True)):
        act = cfg.actions[name]
        assert (act.source, act.function, act.address, act.value, act.verify) == (
            "boiler",
            "coil",
            0,
            value,
            True,
        )
    assert cfg.daemon.state_dir == "/var/lib/flux-edge"


def _without_plugin_check(text: str, path: str) -> dict[str, object]:
    """The validated data of a config, whether or not its plugins are built yet."""
    positions = config_positions._scan(text)
    v = config_load.make_validator(path, positions, KINDS)
    data: dict[str, object] = v.check(tomlkit.parse(text).unwrap(), Config, ())
    assert v.problems == []
    return data


@pytest.mark.parametrize("name", ["demo.toml", "example.toml"])
def test_shipped_configs_load_with_the_bundled_plugins(name: str) -> None:
    bundled_wasm("modbus_decode")
    bundled_wasm("json_normalize")
    if name == "example.toml":
        bundled_wasm("nmea0183")
    cfg, problems = check_config(ROOT / "config" / name)
    assert cfg is not None, "\n".join(map(str, problems))
    assert resolve_plugin_path(cfg, "modbus_decode") == bundled_plugin_dir() / "modbus_decode.wasm"


# --- durations and sizes ------------------------------------------------------------------------

_UNITS = [("d", 86400), ("h", 3600), ("m", 60), ("s", 1), ("ms", Decimal("0.001"))]
_numbers = st.one_of(
    st.integers(0, 10**6).map(str),
    st.tuples(st.integers(0, 10**4), st.integers(0, 999)).map(lambda t: f"{t[0]}.{t[1]:03d}"),
)


@given(
    st.lists(st.tuples(st.booleans(), _numbers), min_size=5, max_size=5).filter(
        lambda parts: any(use for use, _ in parts)
    )
)
def test_duration_strings_parse_to_seconds(parts: list[tuple[bool, str]]) -> None:
    text = ""
    expected = Decimal(0)
    for (use, number), (unit, factor) in zip(parts, _UNITS, strict=True):
        if use:
            text += number + unit
            expected += Decimal(number) * factor
    assert parse_duration(text) == float(expected)


@given(st.one_of(st.integers(0, 2**53), st.floats(0, 1e12)))
def test_numbers_are_seconds(value: float) -> None:
    assert parse_duration(value) == float(value)


@given(st.integers(0, 10**7), st.sampled_from(sorted(config_values._SIZE_UNITS)), st.booleans())
def test_size_strings_parse_to_bytes(number: int, unit: str, space: bool) -> None:
    text = f"{number}{' ' if space else ''}{unit}"
    assert parse_size(text) == number * config_values._SIZE_UNITS[unit]
    assert parse_size(number) == number


def test_fractional_sizes() -> None:
    assert parse_size("1.5MiB") == 1572864
    assert parse_size("0.5KB") == 500
    assert parse_size(4096.0) == 4096
    with pytest.raises(ValueError, match="whole number"):
        parse_size(1.5)


@given(st.text(max_size=12))
def test_duration_and_size_parsers_raise_only_valueerror(text: str) -> None:
    for parse in (parse_duration, parse_size):
        try:
            result = parse(text)
        except ValueError:
            continue
        assert result >= 0 and math.isfinite(result)


# --- nothing but ConfigError, whatever the input ------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("[]{}=.\"'#,\n abc0123_-:tfnr\\"), max_size=80))
def test_garbage_text_raises_only_config_error(text: str) -> None:
    try:
        load_config_text(text)
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(p, Problem) and p.severity == "error" for p in exc.problems)


_KEYS = st.sampled_from(
    [
        "daemon",
        "plugins",
        "sources",
        "rules",
        "actions",
        "type",
        "host",
        "port",
        "registers",
        "name",
        "address",
        "chain",
        "when",
        "timeout",
        "interval",
        "memory_limit",
        "value",
        "x",
        "modbus_tcp",
        "config",
        "inputs",
        "function",
        "scale",
        "plugin_dirs",
        "file",
        "module",
    ]
)
_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(["modbus_tcp", "modbus_write", "1s", "16MiB", "coil", "int16", "x > 1"]),
    st.just("1979-05-27T07:32:00Z"),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=12,
)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if value == "1979-05-27T07:32:00Z":
        return "1979-05-27T07:32:00Z"
    if isinstance(value, int | str):
        return msgspec.json.encode(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, st.dictionaries(_KEYS, _VALUES, max_size=4), max_size=5))
def test_random_documents_raise_only_config_error(doc: dict[str, dict[str, object]]) -> None:
    text = ""
    for table, body in doc.items():
        text += f"[{table}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in body.items())
    try:
        cfg = load_config_text(text)
    except ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.line > 0 or p.path == "" or "not found" in p.message, p
    else:
        assert isinstance(cfg, Config)


def test_holding_register_write_takes_int16_and_uint16(site: Path) -> None:
    for value, ok in ((-32768, True), (65535, True), (-32769, False), (True, False)):
        text = BASE.replace("value = false", f'value = {str(value).lower()}\nfunction = "holding"')
        problems = errors(site, text)
        assert (problems == []) is ok, (value, problems)


def test_crlf_line_endings_and_bom(site: Path) -> None:
    text = BASE.replace('type = "int16"', 'type = "int17"')
    path = site / "flux.toml"
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    _, problems = check_config(path)
    p = only(problems)
    assert (p.line, p.column) == (11, 8)


# --- issue #3 schema: Modbus RTU buses, several devices per Modbus source -----------------------

RTU = """\
[plugins.dec]

[sources.bus]
type = "modbus_rtu"
port = "/dev/ttyUSB9"
baudrate = 19200
chain = ["dec"]

[[sources.bus.devices]]
name = "meter1"
unit_id = 1

[[sources.bus.devices.registers]]
name = "voltage"
function = "input"
address = 0
type = "float32"

[[sources.bus.devices]]
name = "meter2"
unit_id = 2
registers = [{ name = "voltage", function = "input", address = 0, type = "float32" }]
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line containing ``needle``."""
    hits = [i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in line]
    assert len(hits) >= nth, f"{needle!r} not in the text"
    return hits[nth - 1]


def test_rtu_bus_loads_with_bus_defaults_given_to_its_devices(site: Path) -> None:
    cfg = load_config_text(RTU, str(site / "flux.toml"))
    bus = cfg.sources["bus"]
    assert isinstance(bus, ModbusRtuSource)
    assert (bus.port, bus.baudrate, bus.parity, bus.stopbits, bus.bytesize) == (
        "/dev/ttyUSB9",
        19200,
        "E",
        1,
        8,
    )
    assert [(d.name, d.unit_id) for d in bus.devices] == [("meter1", 1), ("meter2", 2)]
    assert all((d.interval, d.timeout) == (1.0, 0.2) for d in bus.devices)  # the bus's
    assert [r.name for r in bus.devices[1].registers] == ["voltage"]
    assert bus.turnaround == 0.005
    text = RTU.replace("unit_id = 2\n", 'unit_id = 2\ninterval = "250ms"\ntimeout = "50ms"\n')
    meter2 = load_config_text(text, str(site / "flux.toml")).sources["bus"].devices[1]
    assert (meter2.interval, meter2.timeout) == (0.25, 0.05)


def test_tcp_shorthand_becomes_one_device(site: Path) -> None:
    cfg = load_config_text(BASE, str(site / "flux.toml"))
    src = cfg.sources["boiler"]
    assert isinstance(src, ModbusTcpSource)
    assert src.devices == (
        ModbusDeviceConfig(
            name="boiler", unit_id=1, registers=src.registers, interval=1.0, timeout=1.0
        ),
    )
    text = BASE.replace(
        'host = "127.0.0.1"', 'host = "127.0.0.1"\ndevice = "b2"\nunit_id = 7\ninterval = "2s"'
    ).replace("[rules.overheat]", '[rules.overheat]\ndevice = "b2"')
    src = load_config_text(text, str(site / "flux.toml")).sources["boiler"]
    assert isinstance(src, ModbusTcpSource)
    (device,) = src.devices
    assert (device.name, device.unit_id, device.interval, device.timeout) == ("b2", 7, 2.0, 1.0)
    assert (src.device, src.unit_id) == ("b2", 7)  # the shorthand keys stay as written


GATEWAY = """\
[plugins.dec]

[sources.gw]
type = "modbus_tcp"
host = "10.0.0.9"
chain = ["dec"]
retries = 3
backoff_max = "30s"
devices = [
  { name = "pv", unit_id = 3, registers = [{ name = "pv_power", address = 0 }] },
  { name = "battery", unit_id = 4, registers = [{ name = "soc", address = 0 }] },
]

[actions.pv_off]
type = "modbus_write"
source = "gw"
device = "pv"
address = 0
value = false
"""


def test_tcp_source_with_several_devices(site: Path) -> None:
    cfg = load_config_text(GATEWAY, str(site / "flux.toml"))
    gw = cfg.sources["gw"]
    assert isinstance(gw, ModbusTcpSource)
    assert [(d.name, d.unit_id, d.interval) for d in gw.devices] == [
        ("pv", 3, 1.0),
        ("battery", 4, 1.0),
    ]
    assert (gw.retries, gw.backoff_max) == (3, 30.0)
    assert cfg.actions["pv_off"].device == "pv"  # type: ignore[union-attr]


def test_tcp_shorthand_and_devices_together_is_an_error(site: Path) -> None:
    text = GATEWAY.replace("retries = 3", 'retries = 3\nunit_id = 2\ndevice = "x"')
    problems = errors(site, text)
    assert {p.path for p in problems} == {"sources.gw.unit_id", "sources.gw.device"}
    for p in problems:
        assert "not both" in p.message
    assert by_path(problems, "sources.gw.unit_id").line == line_of(text, "unit_id = 2")


def test_modbus_write_names_the_device_when_a_source_has_several(site: Path) -> None:
    p = only(errors(site, GATEWAY.replace('device = "pv"\n', "")))
    assert p.path == "actions.pv_off.device"
    assert "2 devices (pv, battery)" in p.message
    assert p.line == line_of(GATEWAY, "[actions.pv_off]")
    p = only(errors(site, GATEWAY.replace('device = "pv"', 'device = "pvv"')))
    assert p.path == "actions.pv_off.device" and 'did you mean "pv"?' in p.message
    # a single-device source needs no device, and a wrong one is still caught
    assert errors(site, BASE) == []
    p = only(errors(site, BASE.replace("value = false", 'value = false\ndevice = "boiler2"')))
    assert p.path == "actions.burner_off.device" and "its devices: boiler" in p.message


@pytest.mark.parametrize(
    ("old", "new", "path", "fragment"),
    [
        ("baudrate = 19200", "baudrate = 100", "sources.bus.baudrate", "300 and 4000000"),
        ("baudrate = 19200", 'parity = "X"', "sources.bus.parity", "one of N, E, O"),
        ("baudrate = 19200", "stopbits = 3", "sources.bus.stopbits", "between 1 and 2"),
        ("baudrate = 19200", "bytesize = 6", "sources.bus.bytesize", "between 7 and 8"),
        ("baudrate = 19200", "retries = -1", "sources.bus.retries", "between 0 and 100"),
        ("baudrate = 19200", 'inter_frame = "2s"', "sources.bus.inter_frame", "at most 1s"),
        ("baudrate = 19200", 'turnaround = "-1ms"', "sources.bus.turnaround", "negative"),
        ('port = "/dev/ttyUSB9"', 'port = ""', "sources.bus.port", "must not be empty"),
        ("unit_id = 1", "unit_id = 0", "sources.bus.devices[0].unit_id", "broadcast"),
        ("unit_id = 2", "unit_id = 248", "sources.bus.devices[1].unit_id", "0 and 247"),
        ("unit_id = 2", "unit_id = 1", "sources.bus.devices[1].unit_id", "devices[0]"),
        ('name = "meter2"', 'name = "meter 2"', "sources.bus.devices[1].name", "valid name"),
        (
            'name = "meter2"',
            'name = "meter1"',
            "sources.bus.devices[1].name",
            'device name "meter1" is already used by sources.bus.devices[0].name',
        ),
        ("unit_id = 2", 'unit_id = 2\ninterval = "-1s"', "sources.bus.devices[1].interval", "neg"),
        (
            "unit_id = 2\n",
            'unit_id = 2\nprofile = "../x"\n',
            "sources.bus.devices[1].profile",
            'ending in ".toml"',
        ),
        (
            'type = "float32"\n',
            'type = "string"\n',
            "sources.bus.devices[0].registers[0].count",
            'a string needs "count"',
        ),
        (
            'type = "float32"\n',
            'type = "int16"\ncount = 2\n',
            "sources.bus.devices[0].registers[0].count",
            '"count" is only for type = "string"',
        ),
        (
            'type = "float32"\n',
            'type = "string"\ncount = 126\n',
            "sources.bus.devices[0].registers[0].count",
            "between 1 and 125",
        ),
        (
            'address = 0\ntype = "float32"',
            'address = 65534\ntype = "uint64"',
            "sources.bus.devices[0].registers[0].address",
            "a uint64 takes 4 registers: address must be at most 65532",
        ),
        (
            'address = 0\ntype = "float32"',
            'address = 65530\ntype = "string"\ncount = 10',
            "sources.bus.devices[0].registers[0].address",
            "a string takes 10 registers: address must be at most 65526",
        ),
        (
            'function = "input"\naddress = 0\ntype = "float32"',
            'function = "coil"\naddress = 0\ntype = "float64"',
            "sources.bus.devices[0].registers[0].type",
            'type must be "bool"',
        ),
        (
            'type = "float32"\n',
            'type = "float32"\ninterval = 0\n',
            "sources.bus.devices[0].registers[0].interval",
            "greater than 0",
        ),
    ],
)
def test_rtu_ranges_and_rules(site: Path, old: str, new: str, path: str, fragment: str) -> None:
    assert old in RTU
    text = RTU.replace(old, new, 1)
    p = only(errors(site, text))
    assert p.path == path
    assert fragment in p.message, p.message
    assert p.line > 0


def test_rtu_bus_needs_devices(site: Path) -> None:
    head = RTU.split("\n[[sources.bus.devices]]", maxsplit=1)[0]
    p = only(errors(site, head))
    assert p.path == "sources.bus.devices" and 'missing required key "devices"' in p.message
    p = only(errors(site, head + "devices = []\n"))
    assert p.path == "sources.bus.devices" and "at least one device" in p.message
    assert p.line == line_of(head + "devices = []\n", "devices = []")


def test_non_standard_baud_rate_is_a_warning(site: Path) -> None:
    problems = check(site, RTU.replace("baudrate = 19200", "baudrate = 9601"))
    p = only(problems)
    assert p.severity == "warning" and p.path == "sources.bus.baudrate"
    assert "not a standard baud rate" in p.message


def test_one_serial_port_one_source(site: Path) -> None:
    text = RTU + textwrap.dedent("""
        [sources.bus2]
        type = "modbus_rtu"
        port = "/dev/ttyUSB9"
        devices = [{ name = "meter3", registers = [{ name = "v", address = 0 }] }]

        [sources.gps]
        type = "serial"
        port = "/dev/ttyUSB9"
        """)
    problems = errors(site, text)
    assert {p.path for p in problems} == {"sources.bus2.port", "sources.gps.port"}
    assert all('already used by source "bus"' in p.message for p in problems)
    assert by_path(problems, "sources.gps.port").line == line_of(text, 'port = "/dev/ttyUSB9"', 3)


def test_device_names_are_unique_across_all_sources(site: Path) -> None:
    text = BASE + textwrap.dedent("""
        [sources.bus]
        type = "modbus_rtu"
        port = "/dev/ttyUSB0"
        devices = [{ name = "boiler", registers = [{ name = "x", address = 0 }] }]

        [sources.flats]
        type = "mqtt"
        device = "boiler"
        topics = [{ topic = "a/b" }]
        """)
    problems = errors(site, text)
    assert {p.path for p in problems} == {"sources.bus.devices[0].name", "sources.flats.device"}
    p = by_path(problems, "sources.flats.device")
    assert 'already used by source "boiler"' in p.message
    assert p.line == line_of(text, 'device = "boiler"')


def test_unknown_source_type_suggests_one(site: Path) -> None:
    p = only(errors(site, BASE.replace('type = "modbus_tcp"', 'type = "modbus_rtuu"')))
    assert p.path == "sources.boiler.type"
    assert "modbus_tcp, modbus_rtu, serial, mqtt" in p.message
    assert 'did you mean "modbus_rtu"?' in p.message


# --- serial and MQTT sources, serial_write -------------------------------------------------------

SERIAL = """\
[plugins.dec]

[sources.gps]
type = "serial"
port = "/dev/ttyACM0"
chain = ["dec"]
"""


def test_serial_source_loads(site: Path) -> None:
    text = SERIAL.replace("chain", 'delimiter = "\\r\\n"\nmax_frame = "1KiB"\nchain')
    src = load_config_text(text, str(site / "flux.toml")).sources["gps"]
    assert isinstance(src, SerialSource)
    assert (src.delimiter, src.max_frame, src.parity, src.framing) == (
        "\r\n",
        1024,
        "N",
        "delimiter",
    )


@pytest.mark.parametrize(
    ("extra", "path", "fragment"),
    [
        ('framing = "fixed"', "sources.gps.frame_length", 'needs "frame_length"'),
        ('framing = "fixed"\nframe_length = 0', "sources.gps.frame_length", 'needs "frame_length"'),
        (
            'framing = "fixed"\nframe_length = 64\nmax_frame = 32',
            "sources.gps.frame_length",
            "more than max_frame (32)",
        ),
        ('framing = "length_prefix"\nlength_bytes = 3', "sources.gps.length_bytes", "1, 2 or 4"),
        (
            'framing = "length_prefix"\nlength_offset = 10\nmax_frame = 8',
            "sources.gps.length_offset",
            "past max_frame",
        ),
        ('delimiter = ""', "sources.gps.delimiter", "needs a delimiter"),
        ("max_frame = 0", "sources.gps.max_frame", "at least 1"),
        ('framing = "idle"\nidle = 0', "sources.gps.idle", "greater than 0"),
        ('framing = "lines"', "sources.gps.framing", "delimiter, fixed, length_prefix, idle"),
        ('device = "a.b"', "sources.gps.device", "valid name"),
        ("bytesize = 5", "sources.gps.bytesize", "between 7 and 8"),
    ],
)
def test_serial_framing_rules(site: Path, extra: str, path: str, fragment: str) -> None:
    text = SERIAL.replace("chain", extra + "\nchain")
    p = only(errors(site, text))
    assert p.path == path and fragment in p.message, p
    assert p.line > 0


def test_keys_of_another_framing_are_warned_about(site: Path) -> None:
    text = SERIAL.replace("chain", "frame_length = 10\nchain")
    p = only(check(site, text))
    assert p.severity == "warning" and p.path == "sources.gps.frame_length"
    assert 'not used with framing = "delimiter"' in p.message


MQTT = """\
[plugins.dec]

[sources.flats]
type = "mqtt"
topics = [{ topic = "building/+/air", qos = 2 }, { topic = "site/#" }]
device_from_topic = "building/{device}/air"
chain = ["dec"]
"""


def test_mqtt_source_loads(site: Path) -> None:
    src = load_config_text(MQTT, str(site / "flux.toml")).sources["flats"]
    assert isinstance(src, MqttSource)
    assert src.topics == (
        MqttSubscription(topic="building/+/air", qos=2),
        MqttSubscription(topic="site/#", qos=1),
    )
    assert (src.host, src.port, src.keepalive) == ("127.0.0.1", 1883, 30.0)


@pytest.mark.parametrize(
    ("old", "new", "path", "fragment"),
    [
        ('"site/#"', '"site/#/x"', "sources.flats.topics[1].topic", "last level"),
        ('"site/#"', '"site/a+"', "sources.flats.topics[1].topic", "whole level"),
        ('"site/#"', '""', "sources.flats.topics[1].topic", "must not be empty"),
        ('"site/#"', '"building/+/air"', "sources.flats.topics[1].topic", "already subscribed"),
        ("qos = 2", "qos = 3", "sources.flats.topics[0].qos", "between 0 and 2"),
        (
            '"building/{device}/air"',
            '"building/air"',
            "sources.flats.device_from_topic",
            "exactly once",
        ),
        (
            '"building/{device}/air"',
            '"building/{device}/{device}"',
            "sources.flats.device_from_topic",
            "exactly once",
        ),
        (
            '"building/{device}/air"',
            '"building/flat_{device}/air"',
            "sources.flats.device_from_topic",
            "whole topic level",
        ),
        (
            'device_from_topic = "building/{device}/air"',
            'device_from_topic = "building/{device}/air"\ndevice = "flats"',
            "sources.flats.device_from_topic",
            "not both",
        ),
        (
            'chain = ["dec"]',
            'chain = ["dec"]\nreconnect_min = "10s"\nreconnect_max = "5s"',
            "sources.flats.reconnect_max",
            "at least reconnect_min (10s)",
        ),
        ('chain = ["dec"]', 'chain = ["dec"]\nport = 0', "sources.flats.port", "1 and 65535"),
        (
            'chain = ["dec"]',
            'chain = ["dec"]\nmax_inflight = 0',
            "sources.flats.max_inflight",
            "between 1",
        ),
    ],
)
def test_mqtt_rules(site: Path, old: str, new: str, path: str, fragment: str) -> None:
    assert old in MQTT
    p = only(errors(site, MQTT.replace(old, new, 1)))
    assert p.path == path and fragment in p.message, p
    key = path.split(".")[2].split("[", maxsplit=1)[0]
    assert p.line == line_of(MQTT.replace(old, new, 1), key)


def test_mqtt_needs_a_topic_and_a_matching_device_pattern(site: Path) -> None:
    text = MQTT.replace('[{ topic = "building/+/air", qos = 2 }, { topic = "site/#" }]', "[]")
    p = only(errors(site, text))
    assert p.path == "sources.flats.topics" and "at least one topic" in p.message
    text = MQTT.replace('"building/{device}/air"', '"plant/{device}"')
    p = only(check(site, text))
    assert p.severity == "warning" and p.path == "sources.flats.device_from_topic"
    assert "no subscribed topic can match" in p.message


SERIAL_WRITE = (
    SERIAL
    + """
[actions.ping]
type = "serial_write"
source = "gps"
data = "01 03 00 00 00 0a"
encoding = "hex"
"""
)


def test_serial_write_action(site: Path) -> None:
    cfg = load_config_text(SERIAL_WRITE, str(site / "flux.toml"))
    action = cfg.actions["ping"]
    assert isinstance(action, SerialWriteAction)
    assert (action.source, action.encoding) == ("gps", "hex")
    p = only(errors(site, SERIAL_WRITE.replace('"01 03 00 00 00 0a"', '"01 0x3"')))
    assert p.path == "actions.ping.data" and "not hex bytes" in p.message
    assert p.line == line_of(SERIAL_WRITE, "data =")
    p = only(errors(site, SERIAL_WRITE.replace('data = "01 03 00 00 00 0a"', 'data = ""')))
    assert p.path == "actions.ping.data" and "must not be empty" in p.message


def test_actions_need_the_right_kind_of_source(site: Path) -> None:
    text = (
        BASE
        + SERIAL.replace("[plugins.dec]\n", "")
        + textwrap.dedent("""
        [actions.to_boiler]
        type = "serial_write"
        source = "boiler"
        data = "x"

        [actions.to_gps]
        type = "modbus_write"
        source = "gps"
        address = 0
        value = true
        """)
    )
    problems = errors(site, text)
    assert {p.path for p in problems} == {"actions.to_boiler.source", "actions.to_gps.source"}
    assert (
        "serial_write needs a serial source"
        in by_path(problems, "actions.to_boiler.source").message
    )
    gps = by_path(problems, "actions.to_gps.source")
    assert "modbus_write needs a modbus_tcp or modbus_rtu source" in gps.message
    assert gps.line == line_of(text, 'source = "gps"')


def test_many_new_schema_errors_are_collected_with_their_lines(site: Path) -> None:
    text = (
        RTU.replace("baudrate = 19200", "baudrate = 100")
        .replace("unit_id = 2", "unit_id = 0")
        .replace('type = "float32"\n', 'type = "string"\n', 1)
        + MQTT.replace("[plugins.dec]\n", "").replace("qos = 2", "qos = 5")
        + SERIAL.replace("[plugins.dec]\n", "").replace("chain", 'framing = "fixed"\nchain')
        + '\n[actions.ping]\ntype = "serial_write"\nsource = "gps"\ndata = "zz"\nencoding = "hex"\n'
    )
    problems = check(site, text)
    expected = {
        "sources.bus.baudrate": line_of(text, "baudrate = 100"),
        "sources.bus.devices[1].unit_id": line_of(text, "unit_id = 0"),
        "sources.bus.devices[0].registers[0].count": line_of(
            text, "[[sources.bus.devices.registers]]"
        ),
        "sources.flats.topics[0].qos": line_of(text, "qos = 5"),
        "sources.gps.frame_length": line_of(text, "[sources.gps]"),
        "actions.ping.data": line_of(text, 'data = "zz"'),
    }
    assert {p.path: p.line for p in problems} == expected, "\n".join(map(str, problems))
    assert all(p.severity == "error" for p in problems)
    assert [p.line for p in problems] == sorted(p.line for p in problems)


def test_rule_conditions_see_rtu_device_registers(site: Path) -> None:
    text = RTU + textwrap.dedent("""
        [rules.overvoltage]
        device = "meter2"
        when = "voltage > 250.0"
        actions = ["noop"]

        [actions.noop]
        type = "modbus_write"
        source = "bus"
        device = "meter2"
        address = 0
        value = true
        """)
    assert errors(site, text) == []
    p = only(errors(site, text.replace('"voltage > 250.0"', "'voltage > \"250\"'")))
    assert p.path == "rules.overvoltage.when"
    problems = check(site, text.replace('device = "meter2"\nwhen', 'device = "meter9"\nwhen'))
    p = by_path(problems, "rules.overvoltage.device")
    assert p.severity == "warning" and 'did you mean "meter2"?' in p.message
    # meter9 has no registers: its rule cannot use meter2's
    assert (
        "undeclared reference to 'voltage'" in by_path(problems, "rules.overvoltage.when").message
    )


def test_example_config_contents() -> None:
    text = (ROOT / "config" / "example.toml").read_text(encoding="utf-8")
    cfg_path = str(ROOT / "config" / "example.toml")
    cfg, problems = check_config_text(text, cfg_path)
    if cfg is None:  # only missing plugin builds are acceptable here
        assert all("not found" in p.message for p in problems), problems
        return
    energy = cfg.sources["energy"]
    assert isinstance(energy, ModbusRtuSource)
    main, heat_pump = energy.devices
    assert (main.name, main.unit_id, main.profile, len(main.registers)) == (
        "main_meter",
        1,
        "eastron_sdm630",
        37,
    )
    total = [r for r in heat_pump.registers if r.name == "total_energy"]
    assert (
        len(total) == 1 and total[0].interval == 60.0
    )  # the device's entry replaced the profile's
    assert (heat_pump.interval, heat_pump.timeout) == (5.0, 0.3)
    assert isinstance(cfg.sources["gps"], SerialSource)
    assert isinstance(cfg.sources["flats"], MqttSource)


def test_serial_delimiter_must_be_bytes() -> None:
    text = '[sources.gps]\ntype = "serial"\nport = "/dev/ttyUSB9"\ndelimiter = "€"\n'
    _, problems = check_config_text(text)
    assert any(
        p.path == "sources.gps.delimiter" and "U+00FF" in p.message and p.line == 4
        for p in problems
    ), problems


def test_mqtt_client_ids_are_unique_and_tls_files_exist(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    text = textwrap.dedent(
        """\
        [sources.a]
        type = "mqtt"
        client_id = "gw1"
        topics = [{ topic = "a/#" }]
        tls = { ca_file = "ca.pem", cert_file = "client.pem" }

        [sources.b]
        type = "mqtt"
        client_id = "gw1"
        protocol = "3.1.1"
        topics = [{ topic = "b/#" }]
        """
    )
    path = tmp_path / "site.toml"
    path.write_text(text)
    config, problems = check_config(path)
    errors = {(p.path, p.line) for p in problems if p.severity == "error"}
    assert ("sources.b.client_id", 9) in errors
    assert ("sources.a.tls.cert_file", 5) in errors
    assert not any(p.path == "sources.a.tls.ca_file" for p in problems)
    assert config is None


# --- rules with time and state, actuators (issue #4) -------------------------------------------

RULES4 = (
    BASE
    + """
[actions.burner_on]
type = "modbus_write"
source = "boiler"
address = 0
value = true
"""
)


def test_rule_time_keys_load(site: Path) -> None:
    text = RULES4.replace(
        "[rules.overheat]",
        '[rules.overheat]\nfor = "1m30s"\ncooldown = "5m"\nmax_age = 30\n'
        'off_when = "temperature < 70.0"\noff_actions = ["burner_on"]\nseverity = "warning"\n'
        "allow_stale = true",
    )
    cfg = load_config_text(text, str(site / "flux.toml"))
    rule = cfg.rules["overheat"]
    assert (rule.for_, rule.cooldown, rule.max_age) == (90.0, 300.0, 30.0)
    assert rule.off_when == "temperature < 70.0" and rule.off_actions == ("burner_on",)
    assert (rule.severity, rule.allow_stale) == ("warning", True)


def test_for_is_the_toml_key_not_the_field_name(site: Path) -> None:
    text = RULES4.replace("[rules.overheat]", '[rules.overheat]\nfor_ = "30s"')
    p = only(errors(site, text))
    assert p.path == "rules.overheat.for_"
    assert 'unknown key "for_"; did you mean "for"?' in p.message


@pytest.mark.parametrize(
    ("line", "path", "message"),
    [
        ('for = "30 s"', "rules.overheat.for", "is not a duration"),
        ('cooldown = "-1s"', "rules.overheat.cooldown", "cannot be negative"),
        ('max_age = "5"', "rules.overheat.max_age", "has no unit"),
        ('severity = "critical"', "rules.overheat.severity", "expected one of debug"),
        ('off_actions = ["nope"]', "rules.overheat.off_actions[0]", 'no action named "nope"'),
    ],
)
def test_rule_time_keys_are_validated(site: Path, line: str, path: str, message: str) -> None:
    text = RULES4.replace("[rules.overheat]", f"[rules.overheat]\n{line}")
    p = by_path(errors(site, text), path)
    assert message in p.message
    assert p.line == 20 and p.column > 1


def test_off_when_type_error_points_into_the_expression(site: Path) -> None:
    text = RULES4.replace(
        "[rules.overheat]", '[rules.overheat]\noff_when = "temperature < \\"70\\""'
    )
    p = only(errors(site, text))
    assert p.path == "rules.overheat.off_when"
    assert "off_when" in p.message and "no matching overload" in p.message
    assert (p.line, p.column) == (20, 25)  # the '<' inside the string


def test_off_when_unknown_name(site: Path) -> None:
    text = RULES4.replace("[rules.overheat]", '[rules.overheat]\noff_when = "temprature < 70.0"')
    p = only(errors(site, text))
    assert p.path == "rules.overheat.off_when"
    assert "undeclared reference to 'temprature'" in p.message


def test_delta_and_age_type_check_in_when(site: Path) -> None:
    text = RULES4.replace(
        'when = "temperature > 80"', 'when = "delta.temperature > 5 && age.temperature < 60.0"'
    )
    assert errors(site, text) == []
    bad = RULES4.replace('when = "temperature > 80"', 'when = "delta.temperature > \\"5\\""')
    assert by_path(errors(site, bad), "rules.overheat.when")


def test_rule_tests_are_checked(site: Path) -> None:
    text = RULES4 + (
        "[[rules.overheat.tests]]\n"
        'name = "hot"\n'
        'given = [{ t = "0s", device = "boiler", name = "temperature", value = 90.0 },'
        ' { t = 1, device = "boilr", name = "temperature", value = 90.0 }]\n'
        'expect = ["burner_off", "burner_of"]\n'
    )
    problems = errors(site, text)
    p = by_path(problems, "rules.overheat.tests[0].given[1].device")
    assert 'no source reads a device named "boilr"; did you mean "boiler"?' in p.message
    p = by_path(problems, "rules.overheat.tests[0].expect[1]")
    assert 'did you mean "burner_off"?' in p.message
    assert len(problems) == 2


def test_rule_test_for_any_device_needs_a_device(site: Path) -> None:
    text = RULES4 + (
        '[[rules.overheat.tests]]\ngiven = [{ name = "temperature", value = 90.0 }]\n'
        'expect = ["burner_off"]\n'
    )
    p = only(errors(site, text))
    assert p.path == "rules.overheat.tests[0].given[0].device"


ACTUATOR = """
[actuators.burner]
on = "burner_on"
off = "burner_off"
min_on = "2m"
min_off = "30s"
max_switches = 6
window = "1h"
interlock = "temperature > 95.0"
interlock_device = "boiler"
inputs = ["boiler.temperature"]
stale_after = "1m"
"""


def test_actuator_loads(site: Path) -> None:
    cfg = load_config_text(RULES4 + ACTUATOR, str(site / "flux.toml"))
    act = cfg.actuators["burner"]
    assert (act.min_on, act.min_off, act.window, act.stale_after) == (120.0, 30.0, 3600.0, 60.0)
    assert act.inputs == ("boiler.temperature",)


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        (
            'on = "burner_on"',
            'on = "burner_onn"',
            "actuators.burner.on",
            'no action named "burner_onn"',
        ),
        ('min_on = "2m"', 'min_on = "2 minutes"', "actuators.burner.min_on", "is not a duration"),
        ('window = "1h"', "window = 0", "actuators.burner.window", "greater than 0"),
        (
            '"boiler.temperature"',
            '"boilr.temperature"',
            "actuators.burner.inputs[0]",
            'no source reads a device named "boilr"',
        ),
        (
            '"boiler.temperature"',
            '"temperature"',
            "actuators.burner.inputs[0]",
            '"device.measurement"',
        ),
        (
            'interlock_device = "boiler"',
            'interlock_device = "b"',
            "actuators.burner.interlock_device",
            'no source reads a device named "b"',
        ),
        (
            'interlock = "temperature > 95.0"',
            'interlock = "temperature > \\"95\\""',
            "actuators.burner.interlock",
            "no matching overload",
        ),
        (
            'off = "burner_off"',
            'off = "burner_on"',
            "actuators.burner.off",
            "two different actions",
        ),
    ],
)
def test_actuator_problems(site: Path, old: str, new: str, path: str, message: str) -> None:
    text = RULES4 + ACTUATOR.replace(old, new)
    p = by_path(errors(site, text), path)
    assert message in p.message
    assert p.line > 0 and p.column > 0


def test_interlock_error_names_the_actuator_and_column(site: Path) -> None:
    text = RULES4 + ACTUATOR.replace("temperature > 95.0", "temperatur > 95.0")
    p = only(errors(site, text))
    assert p.path == "actuators.burner.interlock"
    assert p.message.startswith("actuator 'burner': interlock:")
    assert p.column == len('interlock = "') + 1


def test_an_action_belongs_to_one_actuator(site: Path) -> None:
    text = RULES4 + ACTUATOR + '[actuators.other]\non = "burner_on"\noff = "x"\n'
    problems = errors(site, text)
    assert 'already belongs to actuator "burner"' in by_path(problems, "actuators.other.on").message
    assert 'no action named "x"' in by_path(problems, "actuators.other.off").message


def test_actuator_input_of_an_unknown_register_is_a_warning(site: Path) -> None:
    text = RULES4 + ACTUATOR.replace('"boiler.temperature"', '"boiler.pressure"')
    problems = check(site, text)
    p = by_path(problems, "actuators.burner.inputs[0]")
    assert p.severity == "warning" and 'no register named "pressure"' in p.message
    assert errors(site, text) == []


def test_audit_keys(site: Path) -> None:
    text = '[daemon]\naudit_max_size = "1MiB"\naudit_keep = 3\n' + RULES4
    cfg = load_config_text(text, str(site / "flux.toml"))
    assert (cfg.daemon.audit_max_size, cfg.daemon.audit_keep) == (2**20, 3)
    bad = '[daemon]\naudit_max_size = "1 parsec"\n' + RULES4
    assert by_path(errors(site, bad), "daemon.audit_max_size")


RULE_WITH_TESTS = RULES4.replace(
    """[rules.overheat]
when = "temperature > 80"
actions = ["burner_off"]""",
    """[rules.overheat]
when = "temperature > 85.0"
device = "boiler"
for = "30s"
off_when = "temperature < 70.0"
actions = ["burner_off"]
off_actions = ["burner_on"]

[[rules.overheat.tests]]
name = "hot for 30 s"
given = [
  { t = "0s", name = "temperature", value = 90.0 },
  { t = "20s", name = "temperature", value = 91.0 },
]
at = 30
expect = ["burner_off"]

[[rules.overheat.tests]]
name = "hot, then cool"
given = [
  { t = 0, name = "temperature", value = 90.0 },
  { t = 40, name = "temperature", value = 75.0 },
  { t = 50, name = "temperature", value = 60.0 },
  { t = 60, name = "temperature", value = 10.0, quality = "bad" },
]
expect = ["burner_off", "burner_on"]""",
)


def test_rule_test_cases_pass(site: Path) -> None:
    assert check(site, RULE_WITH_TESTS) == []


def test_failing_rule_test_case_is_an_error(site: Path) -> None:
    text = RULE_WITH_TESTS.replace("at = 30", "at = 29")
    p = only(errors(site, text))
    assert p.path == "rules.overheat.tests[0]"
    assert p.message == (
        "rule 'overheat' test 'hot for 30 s' failed: expected [burner_off], the rule asked for []"
    )
    assert p.line > 0


# --- [uplink] and [metrics] ----------------------------------------------------------------------


def test_uplink_and_metrics_load_with_defaults_and_conversions(site: Path) -> None:
    text = BASE + (
        '\n[uplink]\nhost = "broker.example"\noutbox_max_size = "1MiB"\n'
        'commit_interval = "50ms"\noutbox_file = "box/outbox.sqlite"\n'
        '\n[metrics]\nport = 9999\n'
    )
    cfg = load_config_text(text, str(site / "flux.toml"))
    assert cfg.uplink is not None
    assert cfg.uplink.outbox_max_size == 2**20
    assert cfg.uplink.commit_interval == pytest.approx(0.05)
    assert cfg.uplink.qos == 1 and cfg.uplink.format == "single"
    assert cfg.uplink.outbox_file == str(site / "box" / "outbox.sqlite")  # next to the file
    assert cfg.metrics.port == 9999 and cfg.metrics.host == "127.0.0.1"
    assert cfg.daemon.stall_timeout == 30.0 and cfg.daemon.shutdown_timeout == 20.0
    assert load_config_text(BASE, str(site / "flux.toml")).uplink is None


def test_uplink_problems_are_named_with_their_positions(site: Path) -> None:
    text = BASE + (
        '\n[uplink]\nhost = "broker.example"\ntopic = "gw/{gatway}/{device}"\nqos = 3\n'
        'reconnect_min = "10s"\nreconnect_max = "1s"\ntls = { ca_file = "missing-ca.pem" }\n'
        'client_id = "same"\n'
        '\n[sources.feed]\ntype = "mqtt"\nclient_id = "same"\n'
        'topics = [{ topic = "a/b" }]\nchain = ["dec"]\n'
    )
    probs = errors(site, text)
    topic = by_path(probs, "uplink.topic")
    assert "{gatway}" in topic.message and "{gateway}" in topic.message and topic.line > 0
    assert by_path(probs, "uplink.qos").line > 0  # 0, 1 and 2 are allowed (issue #14)
    assert "reconnect_min" in by_path(probs, "uplink.reconnect_max").message
    assert "missing-ca.pem" in by_path(probs, "uplink.tls.ca_file").message
    assert "already used" in by_path(probs, "uplink.client_id").message


def test_batch_format_with_a_per_measurement_topic_is_a_warning(site: Path) -> None:
    text = BASE + '\n[uplink]\nhost = "b"\nformat = "batch"\n'  # default topic has {name}
    probs = check(site, text)
    warn = by_path(probs, "uplink.topic")
    assert warn.severity == "warning" and "{name}" in warn.message
    text = BASE + '\n[uplink]\nhost = "b"\ntopic = "x/+/y"\n'
    assert "wildcards" in by_path(errors(site, text), "uplink.topic").message


@pytest.mark.parametrize(
    ("topic", "column"),
    [("up/{device:>12}", 4), ("up/{name!r}", 4), ("up/{device.x}", 4), ("up/{0}", 4)],
)
def test_uplink_topic_format_specs_are_refused(topic: str, column: int) -> None:
    """Regression: uplink topics were rendered with str.format, so format specs, conversions and
    indexing passed check-config and then shaped the topics."""
    text = f'[uplink]\nhost = "127.0.0.1"\ntopic = "{topic}"\n'
    config, problems = check_config_text(text, "up.toml")
    assert config is None
    [problem] = problems
    assert problem.path == "uplink.topic" and problem.line == 3
    assert problem.severity == "error" and problem.column >= column


def test_plugin_output_caps_and_rule_budget_are_config_keys(site: Path) -> None:
    # the plugin host and the rules engine read these (PluginLimits.from_config, rule_budget)
    caps = '[plugins.dec]\nmax_records_per_message = 10\nmax_output_bytes = "64KiB"'
    text = BASE.replace("[plugins.dec]", caps, 1)
    path = site / "flux.toml"
    path.write_text(text, encoding="utf-8")
    cfg, problems = check_config(path)
    assert cfg is not None, problems
    from flux_edge.plugins.host import PluginLimits

    limits = PluginLimits.from_config(cfg.plugins["dec"])
    assert (limits.max_records_per_message, limits.max_output_bytes) == (10, 65536)
    bad = BASE.replace("[plugins.dec]", "[plugins.dec]\nmax_records_per_message = 0", 1)
    (p,) = errors(site, bad)
    assert p.path == "plugins.dec.max_records_per_message" and "between 1 and" in p.message
