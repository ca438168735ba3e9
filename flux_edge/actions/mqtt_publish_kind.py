"""The ``mqtt_publish`` action kind: publish a message rendered from the command over an MQTT
source's broker connection. Its config struct, checks and factory; the executor is
``mqtt_publish.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from msgspec import Meta

from flux_edge.actions.targets import target_source
from flux_edge.actions.templates import TemplateError, compile_template
from flux_edge.config import ActionSpec
from flux_edge.config.kinds import Context, Kind
from flux_edge.config.values import DURATION, Key
from flux_edge.mqtt.topics import check_topic

if TYPE_CHECKING:
    from flux_edge.actions import ActionEnv, Executor
    from flux_edge.config.validate import _Validator


class MqttPublishAction(ActionSpec, frozen=True, kw_only=True, tag="mqtt_publish"):
    """Publish a message rendered from the command over an MQTT source's broker connection."""

    concurrent: ClassVar[bool] = True

    source: Annotated[str, Meta(min_length=1)]  # an MQTT source whose broker connection is used
    # template: {device} {name} {value} {unit} {quality} {rule} {action} {ts}
    topic: Annotated[str, Meta(min_length=1)]
    payload: str  # template; {value:json} etc. render JSON values
    qos: Annotated[int, Meta(ge=0, le=2)] = 1  # 0, 1 or 2
    retain: bool = False
    # seconds: connection wait + publish + broker acknowledgement
    timeout: Annotated[float, Meta(gt=0), DURATION] = 5.0


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
    table_checks={MqttPublishAction: _mqtt_publish_checks},
    cross_check=_cross_check,
)
