"""MQTT for flux-edge: topic rules and the one client adapter over paho-mqtt (2.x).

- :mod:`~flux_edge.mqtt.topics`: topic names, filters and device patterns (pure; the config
  checker uses them without importing paho).
- :mod:`~flux_edge.mqtt.client`: :class:`MqttClient`, paho driven from the asyncio loop, shared
  by MQTT sources, the ``mqtt_publish`` action and the uplink; its design is in that module.
- :mod:`~flux_edge.mqtt.common`: :class:`MqttError`, :class:`TlsSettings`, :class:`Will`, the
  callback types and :class:`MqttStats`.
- :mod:`~flux_edge.mqtt.inbound`: the client's receive side (buffered reads, dispatch, ordered
  acknowledgements); :mod:`~flux_edge.mqtt.codec`: its PUBLISH decoder (pure bytes).
- :mod:`~flux_edge.mqtt.paho_internals`: every use of paho's private internals, and the
  start-up check of them (on failure the client falls back to paho's own reading).

Importing this package does not import paho; creating the first ``MqttClient`` does.
"""

from flux_edge.mqtt.client import MqttClient
from flux_edge.mqtt.common import (
    ConnectionCallback,
    Handler,
    MqttError,
    MqttStats,
    SubscribeErrorCallback,
    TlsSettings,
    Will,
)
from flux_edge.mqtt.paho_internals import PahoCompatError, check_paho_internals
from flux_edge.mqtt.topics import (
    MAX_TOPIC_BYTES,
    DevicePattern,
    check_filter,
    check_topic,
    device_from_topic,
    filters_overlap,
    topic_matches,
)

__all__ = [
    "MAX_TOPIC_BYTES",
    "ConnectionCallback",
    "DevicePattern",
    "Handler",
    "MqttClient",
    "MqttError",
    "MqttStats",
    "PahoCompatError",
    "SubscribeErrorCallback",
    "TlsSettings",
    "Will",
    "check_filter",
    "check_paho_internals",
    "check_topic",
    "device_from_topic",
    "filters_overlap",
    "topic_matches",
]
