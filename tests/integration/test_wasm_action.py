"""The ``wasm`` action end to end: a serial device on a pty sends a JSON reading, a rule fires,
the vendor_frame plugin (plugins/examples/vendor_frame, built by plugins/build-all.sh) turns the
command into a vendor frame and a serial_write action's port carries it back to the device."""

from __future__ import annotations

import asyncio
from functools import reduce
from pathlib import Path

import pytest

from flux_edge.actions.wasm_kind import WasmAction
from flux_edge.errors import ConfigError
from flux_edge.kinds import load_config_text
from flux_edge.model import Outcome
from flux_edge.runtime.daemon import run_pipeline
from flux_edge.runtime.pipeline import Observers
from tests.conftest import bundled_wasm
from tests.support.mosquitto import Mosquitto, mosquitto  # noqa: F401 - the fixture
from tests.support.serial_device import SerialDevice

pytestmark = pytest.mark.integration

CONFIG = """
[daemon]
state_dir = "{state}"

[plugins.json_normalize.config]
fields = [{{ path = "temp", name = "temp", unit = "C" }}]

[plugins.vendor_frame]
file = "{vendor_frame}"

[sources.boiler_link]
type = "serial"
port = "{port}"
device = "boiler1"
chain = ["json_normalize"]

[rules.overheat]
device = "boiler1"
when = "temp > 80.0"
inputs = {{ temp = "double" }}
actions = ["{action}"]

[actions.raw_port]
type = "serial_write"
source = "boiler_link"
data = "unused"

[actions.cool_frame]
type = "{type}"
plugin = "vendor_frame"
target = "{target}"
"""


def expected_frame(text: str) -> bytes:
    body = text.encode("ascii")
    lrc = reduce(lambda a, b: a ^ b, body, 0)
    return b"\x02" + body + b"\x03" + bytes([lrc])


def test_rule_fires_a_wasm_action_and_the_device_receives_the_frame(tmp_path: Path) -> None:
    bundled_wasm("json_normalize")
    wasm = bundled_wasm("vendor_frame")
    outcomes: list[Outcome] = []

    async def go() -> bytes:
        async with SerialDevice() as dev:
            text = CONFIG.format(
                state=tmp_path / "state", vendor_frame=wasm, port=dev.path,
                action="cool_frame", type="wasm", target="raw_port",
            )
            config = load_config_text(text, str(tmp_path / "site.toml"))
            done = asyncio.Event()

            def on_outcome(o: Outcome) -> None:
                outcomes.append(o)
                done.set()

            stop = asyncio.Event()
            runner = asyncio.create_task(
                run_pipeline(config, observers=Observers(outcomes=[on_outcome]), stop=stop)
            )
            try:
                want = len(expected_frame("boiler1:cool_frame:81.5"))
                # the port is opened by the source; resend until the reading gets through
                for _ in range(50):
                    await dev.send(b'{"temp": 81.5}\n')
                    try:
                        await asyncio.wait_for(done.wait(), 0.2)
                        break
                    except TimeoutError:
                        continue
                got = await dev.wait_received(want, within=5.0)
            finally:
                stop.set()
                await runner
            return got

    got = asyncio.run(go())
    assert outcomes and outcomes[0].ok, outcomes[0].error if outcomes else "no outcome"
    assert outcomes[0].command.action == "cool_frame"
    frame = expected_frame("boiler1:cool_frame:81.5")
    assert frame[-1] == 0x11  # XOR of "boiler1:cool_frame:81.5", worked out once
    assert got[: len(frame)] == frame


def test_a_wasm_action_cannot_target_a_modbus_write(tmp_path: Path) -> None:
    text = CONFIG.format(
        state=tmp_path / "state", vendor_frame=tmp_path / "vf.wasm", port="/dev/null",
        action="cool_frame", type="wasm", target="valve",
    ) + """
[sources.plc]
type = "modbus_tcp"
host = "127.0.0.1"
port = 1502

[actions.valve]
type = "modbus_write"
source = "plc"
address = 1
value = true
"""
    (tmp_path / "vf.wasm").write_bytes(b"\0asm\1\0\0\0")
    with pytest.raises(ConfigError) as ei:
        load_config_text(text, str(tmp_path / "site.toml"))
    assert 'action "valve" is a modbus_write action' in str(ei.value)
    assert "serial_write or mqtt_publish" in str(ei.value)


def test_the_sample_config_is_valid() -> None:
    bundled_wasm("json_normalize")
    bundled_wasm("vendor_frame")
    folder = Path(__file__).resolve().parents[2] / "plugins" / "examples" / "vendor_frame"
    text = (folder / "sample-config.toml").read_text(encoding="utf-8")
    config = load_config_text(text, str(folder / "site.toml"))
    action = config.actions["boiler_frame"]
    assert isinstance(action, WasmAction) and action.target == "boiler_port"


def test_a_wasm_action_publishes_the_frame_through_an_mqtt_publish_action(
    mosquitto: Mosquitto,  # noqa: F811
) -> None:
    from flux_edge.actions.mqtt_publish import MqttPublishExecutor
    from flux_edge.actions.mqtt_publish_kind import MqttPublishAction
    from flux_edge.actions.wasm_action import WasmActionExecutor
    from flux_edge.model import Command, Measurement
    from flux_edge.mqtt import MqttClient
    from flux_edge.plugins.host import PluginHost, PluginLimits

    wasm = bundled_wasm("vendor_frame")
    target_cfg = MqttPublishAction(
        source="site", topic="site/{device}/cmd", payload="not this", qos=1
    )
    cause = Measurement(device="boiler1", name="temp", value=81.5, ts=1.0)
    cmd = Command(rule="overheat", action="cool_frame", ts=2.0, cause=cause)
    got: list[tuple[str, bytes, int, bool]] = []

    async def scenario() -> None:
        arrived = asyncio.Event()

        def on_message(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            got.append((topic, payload, qos, retain))
            arrived.set()

        sub = MqttClient("watcher", mosquitto.host, mosquitto.port)
        sub.subscribe("site/#", 1, on_message)
        gw = MqttClient("gw", mosquitto.host, mosquitto.port)
        with PluginHost(None) as host:
            plugin = host.load("vendor_frame", wasm, PluginLimits(), {})
            try:
                await sub.connect(timeout=10)
                await sub.wait_subscribed("site/#")
                await gw.connect(timeout=10)
                target = MqttPublishExecutor("site_cmd", target_cfg, gw)
                ex = WasmActionExecutor(
                    "cool_frame", WasmAction(plugin="vendor_frame", target="site_cmd"),
                    plugin, target,
                )
                outcome = await ex.execute(cmd)
                assert outcome.ok, outcome.error
                await asyncio.wait_for(arrived.wait(), 10)
                # no device: the plugin refuses, and the outcome says it was the plugin step
                refused = await ex.execute(Command(rule="r", action="cool_frame", ts=3.0))
                assert not refused.ok
                assert "the plugin step failed" in refused.error
                assert "has no device to address" in refused.error
            finally:
                await gw.close()
                await sub.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    topic, payload, qos, _retain = got[0]
    assert topic == "site/boiler1/cmd" and qos == 1
    assert payload == expected_frame("boiler1:cool_frame:81.5")


def test_an_act_only_plugin_in_a_chain_is_refused(tmp_path: Path) -> None:
    from flux_edge.errors import ConfigError, PluginLoadError
    from flux_edge.plugins import manifest as mf

    wasm = bundled_wasm("vendor_frame")
    text = """
[daemon]
state_dir = "{state}"

[plugins.vendor_frame]
file = "{wasm}"

[sources.link]
type = "serial"
port = "/dev/null"
chain = ["vendor_frame"]
"""
    # check-config already knows from the module's manifest
    with pytest.raises(ConfigError, match="does not export flux_process"):
        load_config_text(text.format(state=tmp_path / "state", wasm=wasm))
    # a module without a manifest is refused when the pipeline loads it
    bare = tmp_path / "vendor_frame.wasm"
    bare.write_bytes(mf.remove_section(wasm.read_bytes(), mf.SECTION))
    config = load_config_text(text.format(state=tmp_path / "state", wasm=bare))
    with pytest.raises(PluginLoadError, match="does not export flux_process"):
        asyncio.run(asyncio.wait_for(run_pipeline(config, stop=asyncio.Event()), 10))
