"""The ``mqtt_publish`` action kind: publish a message rendered from the command over an MQTT
source's broker connection. Its config struct, checks and factory; the executor is
``mqtt_publish.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from flux_edge.actions.targets import target_source
from flux_edge.actions.templates import TemplateError, compile_template
from flux_edge.config import ActionSpec
from flux_edge.config.kinds import Context, Kind
from flux_edge.config.values import Key, _Rule
from flux_edge.mqtt.topics import check_topic

if TYPE_CHECKING:
    from flux_edge.actions import ActionEnv, Executor
    from flux_edge.config.validate import _Validator


class MqttPublishAction(ActionSpec, frozen=True, kw_only=True, tag="mqtt_publish"):
    """Publish a message rendered from the command over an MQTT source's broker connection."""

    concurrent: ClassVar[bool] = True

    source: str  # an MQTT source whose broker connection is used
    topic: str  # template: {device} {name} {value} {unit} {quality} {rule} {action} {ts}
    payload: str  # template; {value:json} etc. render JSON values
    qos: int = 1  # 0, 1 or 2
    retain: bool = False
    timeout: float = 5.0  # seconds: connection wait + publish + broker acknowledgement


RULES: dict[tuple[type, str], _Rule] = {
    (MqttPublishAction, "source"): _Rule(nonempty=True),
    (MqttPublishAction, "topic"): _Rule(nonempty=True),
    (MqttPublishAction, "qos"): _Rule(min=0, max=2),
    (MqttPublishAction, "timeout"): _Rule(kind="duration", positive=True),
}


def _mqtt_publish_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    for field in ("topic", "payload"):
        text = out.get(field)
        if not isinstance(text, str) or not v.clean((*path, field)):
            continue
        try:
            template = compile_template(text)
        except TemplateError as exc:
            v.report_in_string((*path, field), exc.message, exc.column)
            continue
        if field == "topic":  # the literal parts, each placeholder standing for one character
            problem = check_topic(template.render(dict.fromkeys(template.names, "x")))
            if problem:
                v.report((*path, field), problem)


def _cross_check(ctx: Context, aname: str, action: dict[str, Any]) -> None:
    target_source(
        ctx, aname, action, kinds=("mqtt",), needs="an mqtt", why=" (its broker connection is used)"
    )


def make_executor(name: str, cfg: MqttPublishAction, env: ActionEnv) -> Executor:
    from flux_edge.actions.mqtt_publish import MqttPublishExecutor

    return MqttPublishExecutor(name, cfg, env.source(cfg.source).client)


KIND = Kind(
    section="actions",
    tag="mqtt_publish",
    rank=30,
    struct=MqttPublishAction,
    factory=make_executor,
    rules=RULES,
    table_checks={MqttPublishAction: _mqtt_publish_checks},
    cross_check=_cross_check,
)
