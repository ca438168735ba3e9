"""Stage 1: devices -> ``Reading``.

Each protocol lives in its own module, the only one importing its library
(``modbus/client.py`` is the only pymodbus import, ``serial.py`` the only pyserial import;
MQTT goes through ``flux_edge.mqtt``).
This package module holds only what every source shares, so a config that uses no Modbus source
never pays for importing pymodbus.

Each source kind is declared in one module (``serial_kind.py``, ``mqtt_kind.py``,
``modbus/kind.py``): its config struct, its checks and its factory, a ``SourceFactory`` that the
pipeline calls with the entry's name and struct (docs/architecture.md, "Adding a source kind").

Every source class follows the same shape (the runtime relies on it):

    Source(name, cfg, emit, *, on_status=None, ...)
        name: the source's table name; cfg: its config struct
        emit: ``async (Reading) -> None``; awaiting it is back-pressure
        on_status: ``(device, quality, error) -> None``, called when a device's state changes
            (quality "bad" when it stops answering, "good" when it recovers), so the runtime can
            mark that device's last measurements
    await source.run()      runs until cancelled; never raises anything else
    await source.close()    releases the port/connection
    source.health           dict device name -> SourceHealth
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from flux_edge.model import Quality, Reading

Emit = Callable[[Reading], Awaitable[None]]
StatusCallback = Callable[[str, Quality, str], None]


@dataclass(frozen=True, slots=True)
class SourceEnv:
    """What the pipeline offers a source besides its config. ``gateway``: the daemon's name.
    ``durable``: for sources whose data can be re-sent (MQTT QoS 1/2), a call that returns a
    future done once everything read so far is in the outbox (None: no uplink, nothing to wait
    for). ``emit_nowait``: see below; a source that uses it still uses ``emit`` when it returns
    False (no room: back-pressure) and while readings wait in its own buffer (order)."""

    gateway: str = ""
    durable: Callable[[], Any] | None = None
    # take a reading now if there is room (True), without waiting: for sources whose data
    # arrives in a callback (MQTT), so a wake-up's readings need no task of their own
    emit_nowait: Callable[[Reading], bool] | None = None


@dataclass
class SourceHealth:
    """What the runtime (health, metrics, status) can read about one device. Wall-clock times."""

    last_success_ts: float | None = None  # unix time of the last poll that read every block
    consecutive_errors: int = 0
    total_errors: int = 0
    polls: int = 0  # polls attempted
    missed_polls: int = 0  # schedule slots skipped because a poll overran its interval
    last_error: str = ""
    quality: Literal["good", "bad"] = "bad"  # "bad" until the first successful poll
    # failed requests by reason (Modbus: modbus/replies.py REASONS: timeout, crc, unit_id, ...)
    failures: dict[str, int] = field(default_factory=dict)


class Source(Protocol):
    """What the runtime needs of every source (see the module docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def health(self) -> Mapping[str, SourceHealth]: ...

    async def run(self) -> None: ...

    async def close(self) -> None: ...


class SourceFactory(Protocol):
    """A source kind's factory: ``(name, cfg, emit, on_status, env) -> Source``."""

    def __call__(
        self, name: str, cfg: Any, emit: Emit, on_status: StatusCallback, env: SourceEnv
    ) -> Source: ...
