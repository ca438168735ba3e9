"""The ``modbus_write`` action kind: write a coil or holding register through a Modbus source,
read it back and compare. Its config struct, checks and factory; the executor is
``modbus_write.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from msgspec import Meta

from flux_edge.actions.targets import target_source
from flux_edge.config import ActionSpec
from flux_edge.config.kinds import Context, Kind
from flux_edge.config.values import DURATION, NAME, Key, _got, _suggest

if TYPE_CHECKING:
    from flux_edge.actions import ActionEnv, Executor
    from flux_edge.config.validate import _Validator


class ModbusWriteAction(ActionSpec, frozen=True, kw_only=True, tag="modbus_write"):
    writes_device: ClassVar[bool] = True

    # the modbus source (TCP endpoint or RTU bus) to write through
    source: Annotated[str, Meta(min_length=1)]
    address: Annotated[int, Meta(ge=0, le=65535)]
    value: bool | int
    function: Literal["coil", "holding"] = "coil"
    # the device (unit id) on that source; required when it has several
    device: Annotated[str, NAME] = ""
    verify: bool = True  # read back and compare
    # further attempts after a failed or unverified write, within `timeout`
    retries: Annotated[int, Meta(ge=0, le=10)] = 1
    timeout: Annotated[float, Meta(gt=0), DURATION] = 1.0


def _value_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean:
        return
    value = out["value"]
    if out.get("function", "coil") == "coil":
        if not isinstance(value, bool):
            v.report((*path, "value"), f"a coil takes true or false, got {_got(value)}")
    elif isinstance(value, bool) or not -32768 <= value <= 65535:
        v.report(
            (*path, "value"),
            "a holding register takes an integer from -32768 to 65535 (negative values are "
            f"written as 16-bit two's complement), got {_got(value)}",
        )


def _cross_check(ctx: Context, aname: str, action: dict[str, Any]) -> None:
    """The source is a Modbus source, and the device one of its devices."""
    found = target_source(
        ctx, aname, action, kinds=("modbus_tcp", "modbus_rtu"), needs="a modbus_tcp or modbus_rtu"
    )
    if found is None:
        return
    target, src = found
    kind = ctx.kind_of("sources", src)
    names = [d.name for d in kind.devices(target, src).declared] if kind else []
    path: Key = ("actions", aname)
    device = action.get("device", "")
    listed = ", ".join(names) or "none"
    if not device and len(names) > 1:
        ctx.report(
            (*path, "device"),
            f'source "{target}" has {len(names)} devices ({listed}): say which one this '
            'action writes to with device = "..."',
            at="key",
            where=path,
        )
    elif device and device not in names:
        ctx.report(
            (*path, "device"),
            f'source "{target}" has no device named "{device}"; '
            f"{_suggest(device, names)}its devices: {listed}",
        )


def make_executor(name: str, cfg: ModbusWriteAction, env: ActionEnv) -> Executor:
    from flux_edge.actions.modbus_write import ModbusWriteExecutor

    return ModbusWriteExecutor(name, cfg, env.source(cfg.source))


KIND = Kind(
    section="actions",
    tag="modbus_write",
    rank=10,
    struct=ModbusWriteAction,
    factory=make_executor,
    table_checks={ModbusWriteAction: _value_checks},
    cross_check=_cross_check,
)
