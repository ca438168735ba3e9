"""The Modbus source kinds, ``modbus_tcp`` and ``modbus_rtu``: structs (``spec.py``), checks
(``checks.py``), device profiles (``profiles.py``), the RTU bus budget (``budget.py``) and the
factory, registered with the loader and the pipeline through ``KINDS``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flux_edge.config.kinds import Kind
from flux_edge.sources.modbus import budget, checks, profiles
from flux_edge.sources.modbus.spec import ModbusRtuSource, ModbusTcpSource

if TYPE_CHECKING:
    from flux_edge.sources import Emit, Source, SourceEnv, StatusCallback


def make_source(
    name: str,
    cfg: ModbusTcpSource | ModbusRtuSource,
    emit: Emit,
    on_status: StatusCallback,
    env: SourceEnv,
) -> Source:
    from flux_edge.sources.modbus.poller import ModbusBusPoller  # pymodbus: only when used

    return ModbusBusPoller(name, cfg, emit, on_status=on_status)


KINDS = (
    Kind(
        section="sources",
        tag="modbus_tcp",
        rank=10,
        struct=ModbusTcpSource,
        factory=make_source,
        table_checks=checks.TABLE_CHECKS,
        normalize=profiles.normalize,
        devices=checks.devices,
    ),
    Kind(
        section="sources",
        tag="modbus_rtu",
        rank=11,
        struct=ModbusRtuSource,
        factory=make_source,
        table_checks=checks.TABLE_CHECKS,
        normalize=profiles.normalize,
        built_check=budget.check_budget,
        devices=checks.devices,
        exclusive="port",
    ),
)
