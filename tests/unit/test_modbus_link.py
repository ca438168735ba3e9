"""ModbusBusPoller over the link seam, with the in-process simulated link (flux_edge/sim/
modbus_link.py): no sockets, no pymodbus, on virtual time. The same poller code drives the
real TCP and RTU clients (tests/integration/test_modbus*.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from flux_edge.errors import SourceError
from flux_edge.sim.modbus_link import SimulatedModbusBus, SimulatedModbusLink
from flux_edge.sources.modbus.link import ModbusExceptionResponse, ModbusLink
from flux_edge.sources.modbus.poller import ModbusBusPoller
from flux_edge.sources.modbus.spec import (
    ModbusDeviceConfig,
    ModbusRtuSource,
    ModbusTcpSource,
    RegisterConfig,
)
from tests.support import Collector, StatusLog, VirtualTime, run, stop_task


def devices(*units: int, address: int = 0) -> tuple[ModbusDeviceConfig, ...]:
    reg = RegisterConfig(name="t", address=address, function="holding", type="uint16")
    return tuple(ModbusDeviceConfig(name=f"d{u}", unit_id=u, registers=(reg,)) for u in units)


def test_simulated_link_is_a_modbus_link() -> None:
    link: ModbusLink = SimulatedModbusBus().link("s", ModbusTcpSource(host="sim"), 1.0)
    assert isinstance(link, SimulatedModbusLink)


def test_dead_device_is_isolated_and_the_others_keep_polling() -> None:
    vt = VirtualTime()
    bus = SimulatedModbusBus(device_id=(1, 2, 3), sleep=vt.sleep)
    for u in (1, 2, 3):
        bus.set_words("holding", 0, [u * 10], device_id=u)
    bus.silence(2)
    cfg = ModbusRtuSource(
        port="sim0", devices=devices(1, 2, 3), interval=1.0, timeout=0.2, retries=1,
        backoff_max=8.0,
    )
    out, status = Collector(), StatusLog()

    async def main() -> None:
        poller = ModbusBusPoller(
            "line", cfg, out, on_status=status, clock=vt.clock, sleep=vt.sleep,
            link_factory=bus.link,
        )
        assert len(bus.links) == 1  # an RTU line: one link for every device
        task = asyncio.create_task(poller.run())
        start = vt.now
        while vt.now < start + 60.0:
            await vt.sleep(0.05)
        good = {d: sum(r.device == d for r in out.readings) for d in ("d1", "d3")}
        # the live devices poll about once a second; the dead one costs them no more than one
        # timeout per backoff (1, 2, 4, 8, 8, ... s)
        assert all(55 <= n <= 62 for n in good.values()), good
        assert not [r for r in out.readings if r.device == "d2"]
        assert [c[:2] for c in status.calls] == [("d2", "bad")]
        assert poller.health["d2"].quality == "bad"
        assert poller.health["d1"].quality == "good" and poller.health["d1"].total_errors == 0
        probes = bus.request_count(device_id=2)
        assert 2 <= probes <= 12, probes  # 2 attempts at first, then one probe per backoff
        # it comes back by itself at its next probe
        bus.silence(2, False)
        while vt.now < start + 75.0:
            await vt.sleep(0.05)
        assert [c[:2] for c in status.calls] == [("d2", "bad"), ("d2", "good")]
        assert [r.registers for r in out.readings if r.device == "d2"][-1] == (20,)
        await stop_task(task)
        assert bus.links[0].closed

    run(main())


def test_tcp_links_per_device_or_per_endpoint() -> None:
    per_device = ModbusTcpSource(host="sim", devices=devices(1, 2), timeout=0.5)
    bus = SimulatedModbusBus(device_id=(1, 2))
    ModbusBusPoller("s", per_device, Collector(), link_factory=bus.link)
    assert [link.timeout for link in bus.links] == [0.5, 0.5]
    bus.links.clear()
    ModbusBusPoller("s", per_device, Collector(), link_factory=bus.link, tcp_connections="endpoint")
    assert len(bus.links) == 1


def test_writes_and_exception_responses_through_the_seam() -> None:
    vt = VirtualTime()
    bus = SimulatedModbusBus(device_id=(1, 2), size=16, sleep=vt.sleep)
    cfg = ModbusTcpSource(host="sim", devices=(*devices(1), *devices(2, address=100)))
    out = Collector()

    async def main() -> None:
        poller = ModbusBusPoller("s", cfg, out, clock=vt.clock, sleep=vt.sleep,
                                 link_factory=bus.link)
        assert await poller.write("d1", "holding", 3, -2, verify=True) == 0xFFFE
        assert await poller.write("d1", "coil", 4, True, verify=True) is True
        assert bus.get_words("holding", 3, device_id=1) == (0xFFFE,)
        with pytest.raises(SourceError, match="does not fit"):
            await poller.write("d1", "holding", 3, 70000, verify=False)
        await poller.poll_once("d1")
        with pytest.raises(ModbusExceptionResponse, match="ILLEGAL_DATA_ADDRESS") as refused:
            await poller.poll_once("d2")  # register 100 of a 16-register device
        assert refused.value.code == 2
        bus.silence(1)
        with pytest.raises(SourceError, match="no response"):
            await poller.poll_once("d1")
        await poller.close()

    run(main())


def test_the_seam_does_not_import_pymodbus() -> None:
    """A poller over a simulated link, its package and the planner load no pymodbus (the real
    links, client.py, load it when a poller makes its first one)."""
    code = (
        "import sys\n"
        "import flux_edge.sources.modbus\n"
        "from flux_edge.sources.modbus.spec import ModbusTcpSource\n"
        "from flux_edge.sim.modbus_link import SimulatedModbusBus\n"
        "from flux_edge.sources.modbus.poller import ModbusBusPoller\n"
        "async def emit(r): pass\n"
        "ModbusBusPoller('s', ModbusTcpSource(host='sim', unit_id=1), emit,\n"
        "                link_factory=SimulatedModbusBus().link)\n"
        "assert 'pymodbus' not in sys.modules, 'pymodbus imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
