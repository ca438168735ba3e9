"""The ``mqtt`` source kind: subscriptions on a broker, each message's payload going to the plugin
chain. Its config struct, checks and factory; the client is ``mqtt_in.py`` over
``flux_edge.mqtt``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta

from flux_edge.config import SourceSpec, Table, TlsConfig
from flux_edge.config.kinds import Context, Devices, Kind, _default_devices
from flux_edge.config.tables import resolve_tls_files
from flux_edge.config.values import (
    DURATION,
    HOST,
    NAME,
    SECRET,
    Key,
    Rule,
    _got,
)
from flux_edge.mqtt.topics import DevicePattern, check_filter, filters_overlap

if TYPE_CHECKING:
    from flux_edge.config.validate import _Validator
    from flux_edge.sources import Emit, Source, SourceEnv, StatusCallback


class MqttSubscription(Table, frozen=True):
    # MQTT filter, wildcards + and # allowed
    topic: Annotated[str, Meta(min_length=1), Rule(check=check_filter)]
    qos: Annotated[int, Meta(ge=0, le=2)] = 1  # 0, 1 or 2


class MqttSource(SourceSpec, frozen=True, kw_only=True, tag="mqtt"):
    """Subscriptions on a broker; each message's payload goes to the plugin chain."""

    topics: tuple[MqttSubscription, ...]
    host: Annotated[str, Meta(min_length=1), HOST] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    client_id: str = ""  # default: flux-edge-<daemon.name>-<source>
    username: str = ""
    password: Annotated[str, SECRET] = ""  # text, { file = ... } or { credential = ... }
    keepalive: Annotated[float, Meta(ge=0, le=65535), DURATION] = 30.0
    # fixed device name; default: the source's table name
    device: Annotated[str, NAME] = ""
    # e.g. "site/{device}/telemetry": the {device} level names it
    device_from_topic: Annotated[str, Rule(check=_check_device_pattern)] = ""
    reconnect_min: Annotated[float, Meta(gt=0), DURATION] = 1.0
    reconnect_max: Annotated[float, Meta(gt=0), DURATION] = 60.0
    # QoS 1/2 messages in flight (paho's default 20 costs throughput)
    max_inflight: Annotated[int, Meta(ge=1, le=65535)] = 100
    # messages waiting for the pipeline before reading pauses
    buffer_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    protocol: Literal["5", "3.1.1"] = "5"
    tls: TlsConfig | None = None  # set (even empty: tls = {}) to connect with TLS
    # a busy connection is read at most once per linger, so one wake-up carries many messages
    # (the first message after a quiet spell is read at once); 0 = read every message at once
    linger: Annotated[float, Meta(ge=0, le=1), DURATION] = 0.002

    def plugin_context(self, name: str, key: str) -> dict[str, Any]:
        return {"device": self.device or name}


_DEVICE_LEVEL = "{device}"


def _check_device_pattern(value: str) -> str | None:
    try:
        DevicePattern(value)
    except ValueError as exc:
        return str(exc)
    return None


def _mqtt_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    topics = out.get("topics")
    if clean and topics is not None and not topics:
        v.report(
            (*path, "topics"),
            'subscribe to at least one topic: topics = [{ topic = "site/+/telemetry" }]',
        )
    seen: dict[str, int] = {}
    for index, subscription in enumerate(topics or []):
        topic = subscription.get("topic")
        if not isinstance(topic, str):
            continue
        if topic in seen:
            v.report(
                (*path, "topics", index, "topic"),
                f'topic "{topic}" is already subscribed by topics[{seen[topic]}]',
            )
        else:
            seen[topic] = index
    pattern = out.get("device_from_topic", "")
    if out.get("device") and pattern:
        v.report(
            (*path, "device_from_topic"),
            'give either "device" (one fixed name) or "device_from_topic" (a name taken from '
            "each message's topic), not both",
        )
    elif clean and pattern and seen:
        wildcard = pattern.replace(_DEVICE_LEVEL, "+")
        if not any(filters_overlap(wildcard, topic) for topic in seen):
            v.report(
                (*path, "device_from_topic"),
                f"no subscribed topic can match {_got(pattern)}, so no message would get its "
                f"device name from it; subscribed: {', '.join(seen)}",
                warning=True,
            )
    low, high = out.get("reconnect_min", 1.0), out.get("reconnect_max", 60.0)
    if clean and high < low:
        v.report(
            (*path, "reconnect_max"),
            f"must be at least reconnect_min ({low:g}s), got {high:g}s",
        )


def _cross_check(ctx: Context, name: str, src: dict[str, Any]) -> None:
    """Two clients with one client id (two sources, or a source and the uplink) would keep
    kicking each other off the broker; TLS files must exist."""
    ids: dict[str, str] = ctx.memo.setdefault("mqtt.client_ids", {})
    cid = src.get("client_id", "")
    if isinstance(cid, str) and cid:
        if cid in ids:
            ctx.report(
                ("sources", name, "client_id"),
                f'client id "{cid}" is already used by source "{ids[cid]}": the broker would '
                "disconnect one whenever the other connects; give each source its own",
            )
        else:
            ids[cid] = name
            uplink = ctx.data.get("uplink")
            if isinstance(uplink, dict) and uplink.get("client_id") == cid:
                ctx.report(
                    ("uplink", "client_id"),
                    f'client id "{cid}" is already used by an MQTT source; give the uplink its own',
                )
    resolve_tls_files(ctx.v, src.get("tls"), ("sources", name, "tls"), ctx.base_dir)


def _devices(name: str, src: dict[str, Any]) -> Devices:
    if src.get("device_from_topic"):
        return Devices(dynamic=True)
    return _default_devices(name, src)


def make_source(
    name: str, cfg: MqttSource, emit: Emit, on_status: StatusCallback, env: SourceEnv
) -> Source:
    from flux_edge.sources.mqtt_in import MqttSourceClient  # paho: only when used

    return MqttSourceClient(
        name, cfg, emit, on_status=on_status, gateway_name=env.gateway, durable=env.durable,
        emit_nowait=env.emit_nowait
    )


KIND = Kind(
    section="sources",
    tag="mqtt",
    rank=30,
    struct=MqttSource,
    factory=make_source,
    table_checks={MqttSource: _mqtt_checks},
    cross_check=_cross_check,
    devices=_devices,
)
