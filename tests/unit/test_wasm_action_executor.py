"""WasmActionExecutor with a real plugin (tests/fixtures/wat/act.wat, which answers with the
command JSON) and a target that records what it was asked to send."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_edge.actions.wasm_action import WasmActionExecutor
from flux_edge.actions.wasm_kind import WasmAction
from flux_edge.errors import ActionError
from flux_edge.model import Command, Measurement
from flux_edge.plugins.host import PluginHost, PluginLimits

WAT = Path(__file__).resolve().parent.parent / "fixtures" / "wat"


class Recorder:
    name = "port"

    def __init__(self, fail: str = "") -> None:
        self.sent: list[tuple[bytes, Command, float | None]] = []
        self.fail = fail

    async def send(self, data: bytes, cmd: Command, limit: float | None = None) -> None:
        if self.fail:
            raise ActionError(self.name, self.fail)
        self.sent.append((data, cmd, limit))


@pytest.fixture
def host() -> Iterator[PluginHost]:
    with PluginHost(None) as h:
        yield h


def cmd(rule: str = "hot") -> Command:
    cause = Measurement(device="b1", name="temp", value=81.5, ts=1.0)
    return Command(rule=rule, action="frame", ts=2.0, cause=cause)


def test_sends_the_plugin_bytes_through_the_target(host: PluginHost) -> None:
    plugin = host.load("act", WAT / "act.wat", PluginLimits(), {})
    target = Recorder()
    ex = WasmActionExecutor("frame", WasmAction(plugin="act", target="port", timeout=0.5),
                            plugin, target, wall=lambda: 42.0)
    out = asyncio.run(ex.execute(cmd()))
    assert out.ok and out.error == "" and out.ts == 42.0 and out.latency_s > 0
    (data, sent_cmd, limit), = target.sent
    assert json.loads(data)["device"] == "b1" and sent_cmd == cmd() and limit == 0.5


@pytest.mark.parametrize(
    ("rule", "fail", "expect"),
    [
        ("trap", "", "the plugin step failed: plugin 'act': trap: unreachable"),
        ("no", "", "the plugin step failed: plugin 'act': flux_act failed the command"),
        ("hot", "port closed", "the send step (through 'port') failed: action 'port': port closed"),
    ],
)
def test_failures_say_which_step(host: PluginHost, rule: str, fail: str, expect: str) -> None:
    plugin = host.load("act", WAT / "act.wat", PluginLimits(), {})
    ex = WasmActionExecutor("frame", WasmAction(plugin="act", target="port"), plugin,
                            Recorder(fail))
    out = asyncio.run(ex.execute(cmd(rule)))
    assert not out.ok
    assert out.error.startswith("action 'frame': ")
    assert expect in out.error


def test_a_plugin_without_flux_act_is_refused(host: PluginHost) -> None:
    plugin = host.load("echo", WAT / "echo.wat", PluginLimits(), {"source": {"name": "s"}})
    with pytest.raises(ActionError, match="does not export flux_act"):
        WasmActionExecutor("frame", WasmAction(plugin="echo", target="port"), plugin, Recorder())


CONFIG = """
[plugins.act]
file = "{wasm}"

[sources.link]
type = "serial"
port = "/dev/null"

[actions.port]
type = "serial_write"
source = "link"
data = "x"

[actions.frame]
type = "wasm"
plugin = "{plugin}"
target = "{target}"
timeout = "{timeout}"
"""


@pytest.mark.parametrize(
    ("plugin", "target", "timeout", "expect"),
    [
        ("nope", "port", "1s", 'actions.frame.plugin: error: no plugin named "nope"'),
        ("act", "prot", "1s", 'actions.frame.target: error: no action named "prot"'),
        ("act", "frame", "1s", 'action "frame" is a wasm action'),
        ("act", "port", "0s", "actions.frame.timeout"),
    ],
)
def test_config_errors(plugin: str, target: str, timeout: str, expect: str) -> None:
    from flux_edge.errors import ConfigError
    from flux_edge.kinds import load_config_text

    text = CONFIG.format(wasm=WAT / "act.wat", plugin=plugin, target=target, timeout=timeout)
    with pytest.raises(ConfigError) as ei:
        load_config_text(text, "/tmp/site.toml")
    assert expect in str(ei.value)


def test_config_ok_and_the_plugin_counts_as_used() -> None:
    from flux_edge.kinds import check_config_text

    text = CONFIG.format(wasm=WAT / "act.wat", plugin="act", target="port", timeout="2s")
    config, problems = check_config_text(text, "/tmp/site.toml")
    assert config is not None and config.actions["frame"] == WasmAction(
        plugin="act", target="port", timeout=2.0
    )
    assert not [p for p in problems if "act" in p.message], problems
