"""SunSpec discovery in the config (``discover = "sunspec"``, ``models``, ``bases``): check-config
reports mistakes at their key paths, a loaded config carries the keys to every device, and the
poller plans a group for the discovered models (plugins/sunspec's config: its manifest, below)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from flux_edge.errors import Problem
from flux_edge.kinds import check_config, load_config
from flux_edge.sources.modbus.poller import ModbusBusPoller
from flux_edge.sources.modbus.spec import ModbusTcpSource
from flux_edge.sources.modbus.sunspec import model_blocks
from tests.conftest import BUNDLED


def check(tmp_path: Path, text: str) -> list[Problem]:
    path = tmp_path / "flux.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    _, problems = check_config(path)
    return problems


SHORTHAND = """
[sources.pv]
type = "modbus_tcp"
host = "127.0.0.1"
discover = "sunspec"
models = [1, 103]
bases = [40000]
"""

DEVICES = """
[sources.pv]
type = "modbus_tcp"
host = "127.0.0.1"

[[sources.pv.devices]]
name = "inverter"
unit_id = 1
discover = "sunspec"

[[sources.pv.devices]]
name = "meter"
unit_id = 2
discover = "sunspec"
models = [203]
"""


def test_discovery_in_both_forms_loads_without_warnings(tmp_path: Path) -> None:
    for text in (SHORTHAND, DEVICES):
        assert check(tmp_path, text) == []  # no "has no registers" warning either
        cfg = load_config(tmp_path / "flux.toml")
        source = cfg.sources["pv"]
        assert isinstance(source, ModbusTcpSource)
        assert all(d.discover == "sunspec" for d in source.devices)
    assert source.devices[1].models == (203,)
    (tmp_path / "flux.toml").write_text(SHORTHAND, encoding="utf-8")
    (device,) = load_config(tmp_path / "flux.toml").sources["pv"].devices  # type: ignore[attr-defined]
    assert (device.name, device.models, device.bases) == ("pv", (1, 103), (40000,))


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        (SHORTHAND.replace('"sunspec"', '"sunspek"'), "sources.pv.discover",
         'did you mean "sunspec"'),
        (SHORTHAND.replace('discover = "sunspec"\n', ""), "sources.pv.models",
         '"models" is for SunSpec discovery: add discover = "sunspec"'),
        (SHORTHAND.replace("[1, 103]", "[1, 65535]"), "sources.pv.models[1]",
         "must be between 1 and 65534"),
        (SHORTHAND.replace("[1, 103]", "[103, 103]"), "sources.pv.models[1]",
         "model id 103 is listed twice"),
        (SHORTHAND.replace("[40000]", "[65534]"), "sources.pv.bases[0]",
         "must be between 0 and 65532"),
        (DEVICES.replace("models = [203]", "bases = [0]").replace(
            'unit_id = 2\ndiscover = "sunspec"\n',
            'unit_id = 2\nregisters = [{ name = "x", address = 0 }]\n'),
         "sources.pv.devices[1].bases", '"bases" is for SunSpec discovery'),
        (DEVICES.replace('host = "127.0.0.1"\n', 'host = "127.0.0.1"\ndiscover = "sunspec"\n'),
         "sources.pv.discover", 'give either the single-device keys'),
    ],
)  # fmt: skip
def test_mistakes_are_reported_at_their_key_paths(
    tmp_path: Path, text: str, path: str, message: str
) -> None:
    problems = [p for p in check(tmp_path, text) if p.severity == "error"]
    found = [p for p in problems if p.path == path]
    assert found, "\n".join(map(str, problems))
    assert message in found[0].message
    assert found[0].line > 0


def test_the_poller_plans_a_group_for_the_models(tmp_path: Path) -> None:
    (tmp_path / "flux.toml").write_text(DEVICES, encoding="utf-8")
    source = load_config(tmp_path / "flux.toml").sources["pv"]
    assert isinstance(source, ModbusTcpSource)

    class NoLink:
        async def close(self) -> None: ...

    async def emit(_: object) -> None: ...

    poller = ModbusBusPoller("pv", source, emit, link_factory=lambda *a: NoLink())  # type: ignore[arg-type, return-value]
    (group,) = poller.plans["inverter"]
    assert group.points == ("SunSpec models",) and group.blocks == ()
    assert [(b.address, b.count) for b in model_blocks(40002, 300)] == [
        (40002, 125), (40127, 125), (40252, 50)
    ]  # fmt: skip


def test_check_config_checks_the_plugins_config_against_its_manifest(tmp_path: Path) -> None:
    if not (BUNDLED / "sunspec.wasm").exists():
        pytest.skip("plugins/build-all.sh has not built sunspec")
    text = SHORTHAND + 'chain = ["sunspec"]\n\n[plugins.sunspec.config]\nnames = "models"\n'
    problems = check(tmp_path, text)
    (problem,) = [p for p in problems if p.severity == "error"]
    assert problem.path == "plugins.sunspec.config.names"
    assert '"point"' in problem.message and '"model"' in problem.message
