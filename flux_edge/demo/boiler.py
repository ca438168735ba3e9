"""A simulated boiler behind a Modbus TCP server, for the demo and for tests.

Register map (unit 1):

- holding 0: water temperature, int16, 0.1 °C (553 = 55.3 °C); read-only in spirit (the
  physics overwrites it every step)
- holding 1: setpoint, int16, 0.1 °C (informational: the boiler does not regulate itself)
- coil 0: burner (on = heating), written by the controller

Physics, accelerated so the demo cycles between 60 and 80 °C in 10-20 s: the temperature rises
``RISE`` °C/s while the burner is on and falls ``FALL`` °C/s while it is off, staying between
``AMBIENT`` and ``MAX_TEMP``. As in a real boiler, a high-limit safety cut-out switches the
burner off at ``HIGH_LIMIT`` °C (the controller is expected to act long before).

``start()`` runs a step every ``tick`` seconds of wall time; tests call ``step(dt)`` instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from flux_edge.sim.modbus_server import SimulatedModbusServer

log = logging.getLogger("flux_edge.demo.boiler")

TEMPERATURE_REGISTER = 0
SETPOINT_REGISTER = 1
BURNER_COIL = 0


class BoilerSimulator:
    RISE = 2.5  # °C per second, burner on
    FALL = 2.0  # °C per second, burner off
    AMBIENT = 15.0  # it never cools below this
    MAX_TEMP = 110.0
    HIGH_LIMIT = 95.0  # safety cut-out: the burner is switched off at this temperature
    MAX_STEP = 1.0  # a longer gap between steps (loop stalled, suspended) counts as this

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 15020,
        *,
        device_id: int = 1,
        start_temperature: float = 55.0,
        setpoint: float = 70.0,
        burner: bool = True,
        tick: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = SimulatedModbusServer(host, port, device_id)
        self.device_id = device_id
        self.tick = tick
        self._clock = clock
        self._temperature = start_temperature
        self._task: asyncio.Task[None] | None = None
        self.on_step: Callable[[float], None] | None = None  # called with the new temperature
        self.server.set_holding(SETPOINT_REGISTER, round(setpoint * 10))
        self.server.set_coil(BURNER_COIL, burner)
        self._last_burner = burner
        self._publish()

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        """The port it listens on (the real one after ``start()`` when created with port 0)."""
        return self.server.port

    @property
    def temperature(self) -> float:
        """Water temperature in °C (full precision; the register holds it to 0.1 °C)."""
        return self._temperature

    @property
    def burner(self) -> bool:
        return self.server.get_coil(BURNER_COIL)

    @burner.setter
    def burner(self, on: bool) -> None:
        self.server.set_coil(BURNER_COIL, on)

    @property
    def setpoint(self) -> float:
        word = self.server.get_holding(SETPOINT_REGISTER)
        return (word - 0x10000 if word >= 0x8000 else word) / 10

    def _publish(self) -> None:
        self.server.set_holding(TEMPERATURE_REGISTER, round(self._temperature * 10))

    def step(self, dt: float) -> None:
        """Advance the physics by ``dt`` seconds (of simulated time)."""
        on = self.burner
        if on != self._last_burner:
            log.info("burner switched %s at %.1f °C", "on" if on else "off", self._temperature)
            self._last_burner = on
        rate = self.RISE if on else -self.FALL
        self._temperature = min(self.MAX_TEMP, max(self.AMBIENT, self._temperature + rate * dt))
        if on and self._temperature >= self.HIGH_LIMIT:
            log.warning(
                "high-limit cut-out: burner forced off at %.1f °C (is the controller running?)",
                self._temperature,
            )
            self.burner = False
            self._last_burner = False
        self._publish()
        if self.on_step is not None:
            self.on_step(self._temperature)

    async def _physics(self) -> None:
        last = self._clock()
        while True:
            await asyncio.sleep(self.tick)
            now = self._clock()
            self.step(min(now - last, self.MAX_STEP))
            last = now

    async def start(self) -> None:
        """Listen and start the physics. Raises SourceError when the port cannot be bound."""
        await self.server.start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._physics(), name="boiler-physics"
            )
        log.info("simulated boiler on %s:%d (unit %d)", self.host, self.port, self.device_id)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # stop() itself is being cancelled
        await self.server.stop()
