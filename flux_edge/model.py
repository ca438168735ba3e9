"""The types that cross stage boundaries, and nothing else.

    devices -> sources -> Reading -> plugins -> Measurement -> rules -> Command -> actions
    -> Outcome

All are frozen msgspec Structs: cheap to create, encoded to JSON without copies, and immutable so a
stage can never change what another stage holds. ``gc=False`` where every field is a scalar.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Quality = Literal["good", "stale", "bad"]
Value = bool | int | float | str

# Reading.kind values, shared with the plugin ABI (docs/plugin-abi.md, flux_edge/plugins/abi.py).
KIND_BYTES = 0  # payload holds raw bytes (serial frame, MQTT payload)
KIND_REGISTERS = 1  # registers hold 16-bit words (coils/discrete inputs: one word 0/1 per bit)
KIND_MEASUREMENT = 2  # payload holds a measurement as JSON (a later step of a plugin chain)

# Modbus function codes used in Reading.function.
FN_COIL = 1
FN_DISCRETE = 2
FN_HOLDING = 3
FN_INPUT = 4


class Reading(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """Raw data from one source, before any plugin has looked at it."""

    source: str
    device: str
    ts: float  # unix seconds when it was received
    kind: int = KIND_BYTES
    payload: bytes = b""
    registers: tuple[int, ...] = ()
    function: int = 0  # Modbus function code the registers were read with
    address: int = 0  # first register address of ``registers``
    topic: str = ""  # MQTT topic or serial port, when there is one


class Measurement(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """One normalized value. Rules and the uplink see only these."""

    device: str
    name: str
    value: Value
    ts: float
    unit: str = ""
    quality: Quality = "good"
    source: str = ""


class ErrorRecord(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """A message that could not be processed: the dead-letter record. Nothing vanishes."""

    stage: str  # "source" | "plugin" | "rules" | "actions" | "uplink"
    source: str
    device: str
    ts: float
    error: str
    plugin: str = ""


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """A rule asks an action to run."""

    rule: str
    action: str
    ts: float
    cause: Measurement | None = None
    params: dict[str, Any] = {}


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What happened when an action ran."""

    command: Command
    ok: bool
    ts: float
    latency_s: float
    verified: Value | None = None
    error: str = ""
