"""What every uplink encoder is: a config struct, a factory, and the runtime interface the
sender drives.

An encoder turns measurements into what one upstream platform accepts. It works in two steps,
so that store-and-forward holds for every format:

- ``stage(measurements)`` at ``Uplink.add()``: group the measurements (one reading = the
  consecutive measurements of one source and device with one timestamp) and return the rows the
  outbox stores: ``(ts, topic, payload)``. Rows survive restarts and outages.
- ``wire(oid, rows)`` at send time: the MQTT messages of one outbox unit, in order. Most
  encoders send the stored payload as it is; Sparkplug builds its protobuf here, because its
  ``seq`` and aliases belong to the MQTT session the message is sent in, not to the one it was
  stored in. A unit counts as delivered when its last message is acknowledged.

Session messages (births, discovery configs, ThingsBoard connects) come from ``on_connect()``
and ``wire()``; they are state, not data, so they are rebuilt per session instead of stored.

Pure: no MQTT, no SQLite. The sender (``sender.py``) owns the I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import msgspec
from msgspec import Meta

from flux_edge.config.schema import Table
from flux_edge.model import Measurement

if TYPE_CHECKING:
    from flux_edge.config.kinds import Context
    from flux_edge.config.values import Key
    from flux_edge.uplink.commands import UpstreamCommand
    from flux_edge.uplink.outbox import Row

__all__ = [
    "EncoderEnv",
    "EncoderKind",
    "EncoderSpec",
    "Message",
    "StagedRow",
    "readings",
]


class EncoderSpec(Table, frozen=True, tag_field="type"):
    """The config struct of an encoder kind: ``[uplink.encoder] type = "..."``.

    ``decimals``: digits after the point for every float (-1, the default: the measurement's
    declared precision: the register map's ``scale``, else the shortest form of the value).
    ``precision``: decimals per measurement, by ``"device.name"`` or ``"name"``.
    ``commands``: command name -> action name, what upstream may ask (``uplink/commands.py``);
    ``command_topic``: a plain MQTT command topic (``<command_topic>/<name>``, JSON params,
    answered on ``<command_topic>/<name>/reply``), for any encoder; "" = none."""

    decimals: Annotated[int, Meta(ge=-1, le=15)] = -1
    precision: dict[str, Annotated[int, Meta(ge=0, le=15)]] = msgspec.field(
        default_factory=dict)
    commands: dict[str, Annotated[str, Meta(min_length=1)]] = msgspec.field(
        default_factory=dict)
    command_topic: str = ""


class StagedRow(NamedTuple):
    ts: float  # the reading's time (the outbox's age)
    topic: str
    payload: bytes


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool = False
    qos: int | None = None  # None: the uplink's qos


@dataclass(frozen=True, slots=True)
class EncoderEnv:
    """What an encoder learns from the daemon: the gateway name, the declared precision of
    measurements (``(device, name) -> decimals``), the status topic the uplink keeps (its will),
    and where it may keep small state across restarts (Sparkplug's bdSeq)."""

    gateway: str
    precision: dict[tuple[str, str], int] = field(default_factory=dict)
    status_topic: str = ""
    state_dir: str = ""


class Encoder:
    """The runtime interface (see the module docstring). Defaults: stateless, one message per
    row, nothing on connect."""

    rows_per_publish: int = 1  # rows with the same topic the sender may give one wire() call
    commands: bool = False  # it subscribes to command topics

    def stage(self, measurements: Sequence[Measurement]) -> list[StagedRow] | None:
        """Rows to store; None: the outbox's own record format (``records``)."""
        raise NotImplementedError

    def wire(self, oid: bytes, rows: Sequence[Row]) -> list[Message]:
        return [Message(rows[0].topic, rows[0].payload)]

    def will(self) -> Message | None:
        """The last will, replacing the uplink's status will (Sparkplug: NDEATH)."""
        return None

    def on_connect(self) -> list[Message]:
        """Messages sent first on every (re)connect, before any row."""
        return []

    def on_disconnect(self) -> None:
        """The session ended: what it established (births, connects) is gone."""

    def on_close(self) -> list[Message]:
        """Messages sent on a clean shutdown, before the DISCONNECT."""
        return []

    def extra_commands(self) -> dict[str, str]:
        """Command names -> actions the encoder's own options declare (HA switches)."""
        return {}

    def subscriptions(self) -> list[str]:
        """Topic filters the uplink subscribes to on its own connection (commands)."""
        return []

    def on_message(self, topic: str, payload: bytes) -> str | UpstreamCommand | None:
        """A message on one of ``subscriptions()``: what it asks of the uplink ("rebirth":
        send the session messages again; a command to run), or None."""
        return None


TableCheck = Callable[["Context", dict[str, Any], "Key"], None]


@dataclass(frozen=True, slots=True)
class EncoderKind:
    """One encoder: its tag, config struct, factory ``(spec, env) -> Encoder`` and the checks
    across its fields (reported with key paths below ``uplink.encoder``)."""

    tag: str
    struct: type[EncoderSpec]
    factory: Callable[[Any, EncoderEnv], Encoder]
    check: TableCheck | None = None
    rank: int = 100


def readings(measurements: Sequence[Measurement]) -> list[Sequence[Measurement]]:
    """The measurements grouped by reading: consecutive runs with one source, device and ts
    (what one poll, MQTT message or frame produced)."""
    out: list[Sequence[Measurement]] = []
    start = 0
    n = len(measurements)
    for i in range(1, n + 1):
        if i == n:
            out.append(measurements[start:i])
            break
        a, b = measurements[i - 1], measurements[i]
        if a.device != b.device or a.ts != b.ts or a.source != b.source:
            out.append(measurements[start:i])
            start = i
    return out
