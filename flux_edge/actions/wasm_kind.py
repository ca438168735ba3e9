"""The ``wasm`` action kind: ask a plugin (its ``flux_act`` export) what to send and send it through
another action's transport. Its config struct, checks and factory; the executor is
``wasm_action.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from msgspec import Meta

from flux_edge.config import ActionSpec
from flux_edge.config.kinds import Context, Kind
from flux_edge.config.values import DURATION, Key
from flux_edge.errors import ActionError

if TYPE_CHECKING:
    from flux_edge.actions import ActionEnv, Executor


class WasmAction(ActionSpec, frozen=True, kw_only=True, tag="wasm"):
    """Ask a plugin (its ``flux_act`` export) what to send, and send those bytes through another
    action's transport: a serial_write's port or an mqtt_publish's broker, topic, qos, retain."""

    builds_late: ClassVar[bool] = True

    plugin: Annotated[str, Meta(min_length=1)]  # a declared [plugins.NAME] that exports flux_act
    # the serial_write or mqtt_publish action whose transport carries the bytes
    target: Annotated[str, Meta(min_length=1)]
    # seconds for the send (the plugin call has the plugin's own timeout)
    timeout: Annotated[float, Meta(gt=0), DURATION] = 1.0

    def plugin_name(self) -> str:
        return self.plugin


# the action kinds whose transport a wasm action can borrow (they implement ``send``)
_TRANSPORTS = ("serial_write", "mqtt_publish")


def _cross_check(ctx: Context, aname: str, action: dict[str, Any]) -> None:
    """The plugin is declared; the target is a serial_write or mqtt_publish action."""
    pname = action.get("plugin")
    plugins = ctx.names("plugins")
    if isinstance(pname, str) and pname and plugins is not None and pname not in plugins:
        ctx.report(("actions", aname, "plugin"), ctx.missing_ref("plugin", pname, plugins))
    target = action.get("target")
    if not isinstance(target, str) or not target:
        return
    actions = ctx.entries("actions")
    where: Key = ("actions", aname, "target")
    if target not in actions:
        ctx.report(where, ctx.missing_ref("action", target, list(actions)))
        return
    kind = actions[target].get("type")
    if kind not in _TRANSPORTS:
        ctx.report(
            where,
            f'action "{target}" is a {kind} action: a wasm action sends its plugin\'s bytes '
            "through a serial_write or mqtt_publish action",
        )


def _plugins(action: dict[str, Any]) -> list[str]:
    pname = action.get("plugin")
    return [pname] if isinstance(pname, str) and pname else []


def make_executor(name: str, cfg: WasmAction, env: ActionEnv) -> Executor:
    from flux_edge.actions.mqtt_publish import MqttPublishExecutor
    from flux_edge.actions.serial_write import SerialWriteExecutor
    from flux_edge.actions.wasm_action import WasmActionExecutor

    target = env.executor(cfg.target)
    if not isinstance(target, SerialWriteExecutor | MqttPublishExecutor):
        raise ActionError(
            name, f"target {cfg.target!r} is not a serial_write or mqtt_publish action"
        )
    plugin = env.load_plugin(name, cfg)
    try:
        return WasmActionExecutor(
            name, cfg, plugin, target, wall=env.clock, offload=env.offload
        )
    except ActionError:
        plugin.close()
        raise


KIND = Kind(
    section="actions",
    tag="wasm",
    rank=40,
    struct=WasmAction,
    factory=make_executor,
    cross_check=_cross_check,
    plugins=_plugins,
)
