"""The ``serial_write`` action kind: send fixed bytes (text or hex) on a serial source's port. Its
config struct, checks and factory; the executor is ``serial_write.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta

from flux_edge.actions.targets import target_source
from flux_edge.config import ActionSpec
from flux_edge.config.kinds import Context, Kind
from flux_edge.config.values import DURATION, Key, _got

if TYPE_CHECKING:
    from flux_edge.actions import ActionEnv, Executor
    from flux_edge.config.validate import _Validator


class SerialWriteAction(ActionSpec, frozen=True, kw_only=True, tag="serial_write"):
    source: Annotated[str, Meta(min_length=1)]  # the serial source whose port is written
    data: Annotated[str, Meta(min_length=1)]  # what to send
    encoding: Literal["text", "hex"] = "text"  # text: UTF-8 with TOML escapes; hex: "01 03 00"
    timeout: Annotated[float, Meta(gt=0), DURATION] = 1.0


def _serial_write_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean or out.get("encoding", "text") != "hex":
        return
    try:
        bytes.fromhex(out["data"])
    except ValueError:
        v.report(
            (*path, "data"),
            f"{_got(out['data'])} is not hex bytes: write pairs of hex digits, optionally "
            'separated by spaces, like "01 03 00 00 00 0a"',
        )


def _cross_check(ctx: Context, aname: str, action: dict[str, Any]) -> None:
    target_source(ctx, aname, action, kinds=("serial",), needs="a serial")


def make_executor(name: str, cfg: SerialWriteAction, env: ActionEnv) -> Executor:
    from flux_edge.actions.serial_write import SerialWriteExecutor

    return SerialWriteExecutor(name, cfg, env.source(cfg.source))


KIND = Kind(
    section="actions",
    tag="serial_write",
    rank=20,
    struct=SerialWriteAction,
    factory=make_executor,
    table_checks={SerialWriteAction: _serial_write_checks},
    cross_check=_cross_check,
)
