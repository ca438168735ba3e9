"""The kind registries: what ``flux_edge.kinds`` finds, and a kind added from one module
(tests/support/counter_kind.py) checked by the loader like the built-in ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_edge.config import Kind, Registry, SourceSpec
from flux_edge.kinds import KINDS, check_config_text, discover
from tests.support import counter_kind

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def counter() -> Iterator[Kind]:
    KINDS.sources.add(counter_kind.KIND)
    try:
        yield counter_kind.KIND
    finally:
        KINDS.sources.remove("counter")


def test_discovery_finds_every_kind_and_domain() -> None:
    kinds = discover()
    assert kinds.sources.tags == ["modbus_tcp", "modbus_rtu", "serial", "mqtt"]
    assert kinds.actions.tags == ["modbus_write", "serial_write", "mqtt_publish", "wasm"]
    assert sorted(d.name for d in kinds.domains) == ["actuators", "console", "plugins", "rules",
                                                       "uplink"]


def test_every_kind_is_documented_in_the_configuration_reference() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for kind in KINDS.each():
        assert f'type = "{kind.tag}"' in reference, f"docs/configuration.md: no {kind.tag} example"


def test_a_registry_refuses_two_kinds_with_one_tag_and_a_struct_of_another_tag() -> None:
    registry = Registry("sources", [counter_kind.KIND])
    with pytest.raises(ValueError, match="two sources kinds"):
        registry.add(counter_kind.KIND)
    with pytest.raises(ValueError, match="tagged"):
        Kind(section="sources", tag="other", struct=counter_kind.CounterSource,
             factory=counter_kind.make_source)
    with pytest.raises(ValueError, match="not a actions"):
        Registry("actions", [counter_kind.KIND])


CONFIG = """\
[daemon]
state_dir = "/tmp/x"

[sources.ticks]
type = "counter"
interval = "{interval}"
start = {start}
"""


def test_a_new_kind_is_listed_where_a_type_is_unknown(counter: Kind) -> None:
    _, problems = check_config_text('[sources.a]\ntype = "countr"\n')
    (p,) = problems
    assert p.path == "sources.a.type" and (p.line, p.column) == (2, 8)
    assert "modbus_tcp, modbus_rtu, serial, mqtt, counter" in p.message
    assert 'did you mean "counter"?' in p.message


def test_a_new_kinds_fields_are_checked_at_their_lines(counter: Kind) -> None:
    config, problems = check_config_text(CONFIG.format(interval="soon", start=-1))
    assert config is None
    by_path = {p.path: p for p in problems}
    assert by_path["sources.ticks.interval"].line == 6
    assert "duration" in by_path["sources.ticks.interval"].message
    # the table check runs only on a table without other errors
    config, problems = check_config_text(CONFIG.format(interval="1s", start=-1))
    (p,) = problems
    assert (p.path, p.line, p.message) == ("sources.ticks.start", 7, "a count starts at 0 or more")
    _, problems = check_config_text(CONFIG.format(interval="1s", start=0) + "intervall = 3\n")
    (p,) = problems
    assert p.path == "sources.ticks.intervall" and 'did you mean "interval"?' in p.message


def test_a_new_kind_loads_into_its_struct_and_takes_part_in_references(counter: Kind) -> None:
    config, problems = check_config_text(
        CONFIG.format(interval="250ms", start=5)
        + '\n[sources.other]\ntype = "counter"\ndevice = "ticks"\n'
    )
    # device names are unique across sources, whatever their kind
    (p,) = problems
    assert p.path == "sources.other.device" and "already used" in p.message
    config, problems = check_config_text(CONFIG.format(interval="250ms", start=5))
    assert problems == [] and config is not None
    spec = config.sources["ticks"]
    assert isinstance(spec, counter_kind.CounterSource) and isinstance(spec, SourceSpec)
    assert (spec.interval, spec.start, spec.chain) == (0.25, 5, ())
    assert KINDS.sources.of(spec) is counter
