"""The Modbus bus poller: one ``ModbusBusPoller`` per source (a TCP endpoint or an RTU bus)
with all its devices, and their per-device state. It talks to its devices through the link seam
(link.py: ``ModbusLink``), never to pymodbus: the real links are the TCP and RTU clients
(client.py, made by ``open_link``, the default ``link_factory``), and a simulated link
(flux_edge/sim/modbus_link.py) plugs in the same way.

Each device's points are polled in ``PollGroup``s (per-point intervals) on fixed schedules
without drift. TCP devices are polled concurrently, one connection each; an RTU bus carries
exactly one request at a time, from one scheduler that runs the due polls in order. A device
that stops answering is backed off (exponentially, up to ``backoff_max``) and, while backed
off, not polled at all: when its backoff ends it gets one probe, so it costs the others at
most one timeout per backoff period. It recovers by itself. ``on_status`` hears each change.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from flux_edge.errors import SourceError
from flux_edge.logs import RateLimitedLog
from flux_edge.model import FN_COIL, FN_HOLDING, KIND_REGISTERS, Reading
from flux_edge.sources import Emit, SourceHealth, StatusCallback
from flux_edge.sources.modbus.link import (
    DEVICE_DOWN_CODES,
    BadReply,
    LinkFactory,
    ModbusExceptionResponse,
    ModbusLink,
)
from flux_edge.sources.modbus.plan import PollGroup, ReadBlock, bus_devices, plan_device
from flux_edge.sources.modbus.spec import ModbusDeviceConfig, ModbusRtuSource, ModbusTcpSource
from flux_edge.sources.modbus.sunspec import TOPIC_PREFIX, DiscoveryError, SunSpecMap, discover

__all__ = ["ModbusBusPoller", "ModbusTcpPoller"]


def _real_links() -> LinkFactory:
    """The TCP and RTU clients: imported when the first poller without a ``link_factory`` is
    built, so importing this module does not import pymodbus."""
    from flux_edge.sources.modbus.client import open_link

    return open_link


class _Unreachable(Exception):
    """A device did not answer one request in any of its attempts."""

    def __init__(self, error: SourceError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(eq=False)
class _Link:
    """One connection (TCP) or port (RTU), and the lock that keeps one request on it at a time."""

    client: ModbusLink
    devices: list[_Device] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last: _Device | None = None  # the device of the last request (stray bytes are its)
    noise_seen: int = 0  # the client's count of stray bytes when last looked at

    def stray_bytes(self) -> int:
        """Bytes that arrived while no request waited since the last call (a late answer, the
        tail of a bad frame, line noise); links that cannot tell say 0."""
        total = int(getattr(self.client, "noise_bytes", 0))
        new, self.noise_seen = total - self.noise_seen, total
        return new


@dataclass(eq=False)
class _Device:
    cfg: ModbusDeviceConfig
    timeout: float
    groups: list[PollGroup]
    link: _Link
    health: SourceHealth = field(default_factory=SourceHealth)
    state: Literal["good", "bad"] | None = None  # None until it first answers or fails
    epoch: int = 0  # bumped when its schedule is rebuilt: older heap entries are dropped
    start: float = 0.0  # the schedule's origin: slot k of a group is due at start + k*interval
    slots: list[int] = field(default_factory=list)  # next slot of each group
    failures: int = 0  # unreachable polls/probes in a row: the backoff exponent
    refused: set[ReadBlock] = field(default_factory=set)  # blocks answered with an exception
    unexpected_logged: bool = False
    key: str = ""  # its config key path: sources.NAME or sources.NAME.devices[i]
    sunspec_group: PollGroup | None = None  # the group that reads the discovered models
    sunspec: SunSpecMap | None = None  # None: (re)discover at its next poll
    discovery_failures: int = 0  # failed discoveries in a row
    discovery_retry: float = 0.0  # no discovery before (clock), when it has other groups

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def label(self) -> str:
        return f"device {self.cfg.name!r} (unit {self.cfg.unit_id})"


_Entry = tuple[float, int, _Device, int, int]  # due, sequence, device, group (-1: probe), epoch
_Outcome = Literal["ok", "refused", "unreachable", "error"]


class ModbusBusPoller:
    """Polls every device of one Modbus source (a TCP endpoint or an RTU bus); emits one
    ``Reading`` per read request, with ``device`` set to the device's name.

    Schedules: each device's ``PollGroup`` (see ``plan_device``) has slot k due at start +
    k * interval, without drift. A poll that starts late runs once for the latest slot already
    due and skips (counts in ``missed_polls``) the older ones; on a busy RTU bus the due polls
    run in order of their due times, so no device starves.

    TCP: every device has its own connection and schedule (``tcp_connections="device"``), so
    devices behind one endpoint are polled concurrently; ``"endpoint"`` shares one connection
    among them, polled in turn. RTU: one port, one schedule, exactly one request on the line at
    a time, with the inter-frame silence kept between frames (``ModbusRtuClient``).

    Fault isolation: a request is tried ``1 + retries`` times within a poll, each bounded by the
    device's timeout. A device that does not answer is marked bad (``on_status(device, "bad",
    error)``, one warning) and backed off: ``backoff_min`` doubling up to ``backoff_max``,
    aligned to its fastest group's slots. While backed off it is not polled at all; at the end
    of each backoff it gets one probe (its fastest group, one attempt), so a dead device costs
    the others at most one timeout per backoff period. When it answers, ``on_status(device,
    "good", "")`` and its schedule resumes. Exception responses (the device is alive but refuses
    a block) are counted errors, logged once per block, and never back off.

    Links: ``link_factory(name, cfg, timeout)`` makes each (see link.py); by default the real
    TCP and RTU clients (``client.open_link``). ``write`` shares the device's link (serialised
    with the polls). ``run()`` ends only by cancellation and then closes every link.
    """

    def __init__(
        self,
        name: str,
        cfg: ModbusTcpSource | ModbusRtuSource,
        emit: Emit,
        *,
        on_status: StatusCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff_min: float = 1.0,
        tcp_connections: Literal["device", "endpoint"] = "device",
        link_factory: LinkFactory | None = None,
    ) -> None:
        if cfg.interval <= 0:
            raise ValueError(f"source {name!r}: interval must be > 0, got {cfg.interval}")
        self.name = name
        self.cfg = cfg
        self._emit = emit
        self._on_status = on_status
        self._clock = clock
        self._wall = wall
        self._sleep = sleep  # tests pair it with ``clock`` to run schedules on virtual time
        self._attempts = 1 + max(0, cfg.retries)
        self._backoff_min = backoff_min
        self._backoff_max = max(cfg.backoff_max, backoff_min)
        self._log = logging.getLogger(f"flux_edge.source.{name}")
        # one line per device and reason a minute: a device sending garbage on every poll
        self._bad_log = RateLimitedLog(self._log, 60.0)
        devices = bus_devices(cfg, name)
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"source {name!r}: device names must be unique, repeated: {dup}")
        self.plans: dict[str, list[PollGroup]] = {}
        sunspec_groups: dict[str, PollGroup] = {}
        for d in devices:
            try:
                groups = plan_device(d, cfg.interval, cfg.max_gap)
            except ValueError as exc:
                raise ValueError(f"source {name!r}: {exc}") from None
            if d.discover == "sunspec":  # its blocks are known once discovered
                group = PollGroup(d.interval or cfg.interval, (), ("SunSpec models",))
                sunspec_groups[d.name] = group
                groups = sorted([*groups, group], key=lambda g: g.interval)
            self.plans[d.name] = groups
        self._links: list[_Link] = []
        self._devices: dict[str, _Device] = {}
        open_link = link_factory or _real_links()
        shared: _Link | None = None
        if isinstance(cfg, ModbusRtuSource) or tcp_connections == "endpoint":
            shared = _Link(open_link(name, cfg, cfg.timeout))  # an RTU line, a TCP endpoint
            self._links.append(shared)
        for d in devices:
            timeout = d.timeout if d.timeout > 0 else cfg.timeout
            link = shared
            if link is None:  # a TCP device: a connection of its own
                link = _Link(open_link(name, cfg, timeout))
                self._links.append(link)
            dev = _Device(d, timeout, self.plans[d.name], link)
            dev.sunspec_group = sunspec_groups.get(d.name)
            index = next((i for i, x in enumerate(cfg.devices) if x.name == d.name), -1)
            dev.key = f"sources.{name}" + (f".devices[{index}]" if index >= 0 else "")
            link.devices.append(dev)
            self._devices[d.name] = dev
        self.health: dict[str, SourceHealth] = {n: d.health for n, d in self._devices.items()}

    # -- running --

    async def run(self) -> None:
        """Poll until cancelled. Never raises anything but CancelledError."""
        try:
            async with asyncio.TaskGroup() as tg:
                for i, link in enumerate(self._links):
                    tg.create_task(self._run_link(link), name=f"modbus {self.name} link {i}")
        finally:
            await self.close()

    async def _run_link(self, link: _Link) -> None:
        heap: list[_Entry] = []
        seq = itertools.count()

        def push(dev: _Device, group: int, due: float) -> None:
            heapq.heappush(heap, (due, next(seq), dev, group, dev.epoch))

        start = self._clock()
        for dev in link.devices:
            dev.start = start
            dev.slots = [0] * len(dev.groups)
            for gi in range(len(dev.groups)):
                push(dev, gi, start)
        if not heap:
            await asyncio.Event().wait()  # nothing to poll (write-only devices): idle
        me = asyncio.current_task()
        while True:
            if me is not None and me.cancelling():
                raise asyncio.CancelledError  # a cancellation something below swallowed
            due, _, dev, gi, epoch = heap[0]
            if epoch != dev.epoch:
                heapq.heappop(heap)
                continue
            delay = due - self._clock()
            if delay > 0:
                await self._sleep(delay)
                continue
            heapq.heappop(heap)
            probe = gi < 0
            outcome = await self._poll_guarded(dev, 0 if probe else gi, 1 if probe else None)
            now = self._clock()
            if outcome == "unreachable":
                self._back_off(dev, now, push)
            elif probe:
                self._resume(dev, now, push)
            else:
                self._next_slot(dev, gi, now, push)

    def _next_slot(
        self, dev: _Device, gi: int, now: float, push: Callable[[_Device, int, float], None]
    ) -> None:
        """Schedule group ``gi`` after its slot ran: the next slot, or the latest one already
        due if the poll overran (the ones in between are counted as missed)."""
        interval = dev.groups[gi].interval
        k = dev.slots[gi]
        latest = math.floor((now - dev.start) / interval + 1e-9)
        nxt = max(k + 1, latest)
        dev.health.missed_polls += nxt - (k + 1)
        dev.slots[gi] = nxt
        push(dev, gi, dev.start + nxt * interval)

    def _back_off(
        self, dev: _Device, now: float, push: Callable[[_Device, int, float], None]
    ) -> None:
        """Stop polling ``dev``; schedule one probe at the end of its backoff, on a slot of its
        fastest group (group 0)."""
        dev.failures += 1
        backoff = min(self._backoff_max, self._backoff_min * 2.0 ** min(dev.failures - 1, 32))
        interval = dev.groups[0].interval
        k = max(dev.slots[0] + 1, math.ceil((now + backoff - dev.start) / interval - 1e-9))
        dev.slots[0] = k
        dev.epoch += 1  # drops its pending entries
        push(dev, -1, dev.start + k * interval)

    def _resume(
        self, dev: _Device, now: float, push: Callable[[_Device, int, float], None]
    ) -> None:
        """The probe was answered: group 0 carries on from the probe's slot, every other group
        polls at once (its latest due slot); slots lost while backed off are not 'missed'."""
        dev.epoch += 1
        for gi, group in enumerate(dev.groups):
            latest = math.floor((now - dev.start) / group.interval + 1e-9)
            if gi == 0:
                dev.slots[0] = max(dev.slots[0] + 1, latest)
            else:
                dev.slots[gi] = max(dev.slots[gi], latest)
            push(dev, gi, dev.start + dev.slots[gi] * group.interval)

    # -- one poll --

    async def _read(self, dev: _Device, block: ReadBlock, attempts: int) -> tuple[int, ...]:
        link = dev.link
        last: SourceError | None = None
        for _ in range(attempts):
            try:
                async with link.lock:
                    self._stray(link)
                    link.last = dev
                    return await link.client.read(block, dev.cfg.unit_id, per_request=dev.timeout)
            except ModbusExceptionResponse as exc:
                self._failed(dev, exc)
                if exc.code not in DEVICE_DOWN_CODES:
                    raise
                last = exc  # the device failed, or a gateway says it is not there
            except SourceError as exc:
                self._failed(dev, exc)
                last = exc
        assert last is not None
        raise _Unreachable(last)

    def _stray(self, link: _Link) -> None:
        """Bytes between two transactions belong to the one before (its late or trailing
        bytes, or noise on its line): counted on that device as ``unsolicited``, never data."""
        stray = link.stray_bytes()
        dev = link.last
        if stray and dev is not None:
            failures = dev.health.failures
            failures["unsolicited"] = failures.get("unsolicited", 0) + 1
            self._bad_log.warning(
                f"{dev.name}\0unsolicited",
                "%s: %d byte(s) arrived after its last transaction (a late answer, the rest of a "
                "bad frame, or line noise): dropped", dev.label, stray,
            )

    def _failed(self, dev: _Device, exc: SourceError) -> None:
        """Count one failed request by its reason; a bad reply gets a (rate-limited) line."""
        reason = getattr(exc, "reason", "link")
        failures = dev.health.failures
        failures[reason] = failures.get(reason, 0) + 1
        if isinstance(exc, BadReply):
            self._bad_log.warning(
                f"{dev.name}\0{reason}", "%s: bad reply (%s), not used: %s", dev.label, reason, exc
            )

    async def _poll_group(self, dev: _Device, group: PollGroup, attempts: int) -> None:
        """Read every block of ``group`` and emit a Reading per block.

        Raises ``_Unreachable`` when a request got no answer in ``attempts`` tries (the rest
        of the poll is skipped). A block answered with an exception response does not stop the
        others; the first such error is raised at the end.
        """
        if group is dev.sunspec_group:
            await self._poll_sunspec(dev, attempts)
            return
        refused: ModbusExceptionResponse | None = None
        for block in group.blocks:
            try:
                words = await self._read(dev, block, attempts)
            except ModbusExceptionResponse as exc:
                self._answered(dev)
                refused = refused or exc
                if block not in dev.refused:
                    dev.refused.add(block)
                    self._log.warning(
                        "%s refuses %s: %s (its points stay without values; logged again "
                        "when it reads)", dev.label, block.describe(), exc,
                    )
                continue
            self._answered(dev)
            if dev.refused and block in dev.refused:
                dev.refused.discard(block)
                self._log.info("%s: %s reads again", dev.label, block.describe())
            await self._emit(
                Reading(
                    source=self.name,
                    device=dev.cfg.name,
                    ts=self._wall(),
                    kind=KIND_REGISTERS,
                    registers=words,
                    function=block.function,
                    address=block.address,
                )
            )
        if refused is not None:
            raise refused

    async def _poll_sunspec(self, dev: _Device, attempts: int) -> None:
        """Read every discovered SunSpec model of ``dev`` (discovering them first when not
        known: at its first poll, after it was unreachable, after a model was refused) and emit
        one Reading per model: the whole block after its header, ``topic`` "sunspec/<id>".

        Raises ``DiscoveryError`` when discovery fails, ``_Unreachable`` as any poll, and a
        model block refused with an exception response (the map may have changed: it is
        discovered again at the next poll)."""
        if dev.sunspec is None:
            if len(dev.groups) > 1 and self._clock() < dev.discovery_retry:
                return  # its registers are polled; discovery waits for its back-off
            dev.sunspec = await self._discover(dev, attempts)
        for model in dev.sunspec.polled:
            words: list[int] = []
            try:
                for block in model.blocks:
                    words.extend(await self._read(dev, block, attempts))
            except ModbusExceptionResponse as exc:
                self._answered(dev)
                dev.sunspec = None
                self._log.warning(
                    "%s refuses SunSpec model %s: %s (discovering its models again)",
                    dev.label, model.describe(), exc,
                )
                raise
            self._answered(dev)
            await self._emit(
                Reading(
                    source=self.name,
                    device=dev.cfg.name,
                    ts=self._wall(),
                    kind=KIND_REGISTERS,
                    registers=tuple(words),
                    function=FN_HOLDING,
                    address=model.start,
                    topic=f"{TOPIC_PREFIX}{model.id}",
                )
            )

    async def _discover(self, dev: _Device, attempts: int) -> SunSpecMap:
        async def read(block: ReadBlock) -> tuple[int, ...]:
            return await self._read(dev, block, attempts)

        cfg = dev.cfg
        found = await discover(read, self.name, dev.key, cfg.bases, cfg.models)
        dev.discovery_failures = 0
        self._log.info("%s: %s", dev.label, found.describe())
        if found.missing:
            self._log.warning(
                "%s: %s.models: model(s) %s not on the device; polling the others",
                dev.label, dev.key, ", ".join(map(str, found.missing)),
            )
        return found

    def _discovery_failed(self, dev: _Device, exc: DiscoveryError) -> None:
        """Count a failed discovery; retry it on its own back-off when the device has register
        groups that still poll (a SunSpec-only device is backed off as a whole)."""
        dev.discovery_failures += 1
        failures = dev.health.failures
        failures[exc.reason] = failures.get(exc.reason, 0) + 1
        n = dev.discovery_failures
        dev.discovery_retry = self._clock() + min(
            self._backoff_max, self._backoff_min * 2.0 ** min(n - 1, 32)
        )
        if len(dev.groups) == 1:
            self._unreachable(dev, exc)
            return
        self._count_error(dev, str(exc))
        if n == 1:
            self._log.warning("%s: %s (retrying with back-off)", dev.label, exc)

    async def _poll_guarded(self, dev: _Device, gi: int, attempts: int | None) -> _Outcome:
        """One poll of one group that never raises (but CancelledError)."""
        outcome = await self._poll_outcome(dev, gi, attempts)
        dev.health.polls += 1  # counted when over: polls - total_errors = complete polls
        return outcome

    async def _poll_outcome(self, dev: _Device, gi: int, attempts: int | None) -> _Outcome:
        h = dev.health
        try:
            await self._poll_group(dev, dev.groups[gi], attempts or self._attempts)
        except _Unreachable as exc:
            self._unreachable(dev, exc.error)
            return "unreachable"
        except DiscoveryError as exc:
            self._discovery_failed(dev, exc)
            return "unreachable" if len(dev.groups) == 1 else "refused"
        except ModbusExceptionResponse as exc:
            self._count_error(dev, str(exc))
            return "refused"
        except Exception as exc:  # noqa: BLE001 - a poller must survive anything (emit failing)
            self._count_error(dev, f"unexpected error: {exc!r}")
            if not dev.unexpected_logged:
                dev.unexpected_logged = True
                self._log.warning(
                    "%s: poll failed: %s: %s (logged once until a poll succeeds)",
                    dev.label, type(exc).__name__, exc,
                )
                self._log.debug("%s: the failed poll's traceback", dev.label, exc_info=exc)
            return "error"
        h.last_success_ts = self._wall()
        h.consecutive_errors = 0
        dev.unexpected_logged = False
        return "ok"

    # -- state --

    def _status(self, dev: _Device, quality: Literal["good", "bad"], error: str) -> None:
        if self._on_status is None:
            return
        try:
            self._on_status(dev.cfg.name, quality, error)
        except Exception:  # noqa: BLE001 - the runtime's callback must not stop the bus
            self._log.exception("on_status callback failed for %s", dev.label)

    def _answered(self, dev: _Device) -> None:
        """The device answered a request (data or an exception response)."""
        if dev.state == "good":
            return
        h = dev.health
        if dev.state == "bad":
            self._log.info(
                "%s answers again after %d failed poll(s)", dev.label, h.consecutive_errors
            )
        else:
            groups = ", ".join(
                f"{'SunSpec models' if g is dev.sunspec_group else f'{len(g.blocks)} request(s)'}"
                f" every {g.interval:g} s"
                for g in dev.groups
            )
            self._log.info("polling %s on %s: %s", dev.label, self._where(dev), groups)
        previous = dev.state
        dev.state = "good"
        h.quality = "good"
        dev.failures = 0
        if previous == "bad":
            self._status(dev, "good", "")

    def _unreachable(self, dev: _Device, error: SourceError) -> None:
        self._count_error(dev, str(error))
        dev.health.quality = "bad"
        dev.sunspec = None  # discovered again when it answers
        if dev.state != "bad":
            dev.state = "bad"
            if isinstance(error, DiscoveryError):
                what = "fails SunSpec discovery"
            elif isinstance(error, BadReply):
                what = "gives no valid reply"
            else:
                what = "does not answer"
            self._log.warning(
                "%s %s: %s (backing off; logged again when it answers)", dev.label, what, error
            )
            self._status(dev, "bad", str(error))
        else:
            self._log.debug(
                "%s still does not answer (%d polls): %s",
                dev.label, dev.health.consecutive_errors, error,
            )

    @staticmethod
    def _count_error(dev: _Device, message: str) -> None:
        h = dev.health
        h.total_errors += 1
        h.consecutive_errors += 1
        h.last_error = message

    def _where(self, dev: _Device) -> str:
        cfg = self.cfg
        if isinstance(cfg, ModbusRtuSource):
            return f"{cfg.port} ({cfg.baudrate} baud)"
        return f"{cfg.host}:{cfg.port}"

    def _device(self, device: str) -> _Device:
        if device in self._devices:
            return self._devices[device]
        names = ", ".join(sorted(self._devices))
        if not device:
            if len(self._devices) == 1:
                return next(iter(self._devices.values()))
            raise SourceError(
                self.name, f"the source has {len(self._devices)} devices ({names}): name one"
            )
        raise SourceError(self.name, f"no device {device!r} on this source (devices: {names})")

    # -- for tests, tools and actions --

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    async def poll_once(self, device: str = "") -> None:
        """Poll every group of one device once, now ("" = the only device). Raises SourceError
        (an exception response, or the error of a request that was never answered)."""
        dev = self._device(device)
        for group in dev.groups:
            try:
                await self._poll_group(dev, group, self._attempts)
            except _Unreachable as exc:
                raise exc.error from None

    async def write(
        self,
        device: str,
        function: Literal["coil", "holding"],
        address: int,
        value: bool | int,
        verify: bool,
    ) -> bool | int:
        """Write one coil or holding register of ``device`` ("" = the only device) over its
        link, serialised with the polls. With ``verify``, read it back and return what the
        device holds (a coil as bool, a register as 0..65535); else return what was written.
        Raises SourceError."""
        dev = self._device(device)
        client, unit, limit = dev.link.client, dev.cfg.unit_id, dev.timeout
        async with dev.link.lock:
            if function == "coil":
                await client.write_coil(address, bool(value), unit, per_request=limit)
                if not verify:
                    return bool(value)
                (bit,) = await client.read(ReadBlock(FN_COIL, address, 1), unit, per_request=limit)
                return bool(bit)
            await client.write_register(address, int(value), unit, per_request=limit)
            if not verify:
                return int(value) & 0xFFFF
            (word,) = await client.read(ReadBlock(FN_HOLDING, address, 1), unit, per_request=limit)
            return word

    def device_unit(self, device: str = "") -> int:
        """The unit id of ``device`` ("" = the only device). Raises SourceError."""
        return self._device(device).cfg.unit_id

    async def close(self) -> None:
        for link in self._links:
            await link.client.close()


ModbusTcpPoller = ModbusBusPoller  # the name before RTU buses (issue #2)
