"""Numbers as a person would write them: the shortest form at the declared precision.

A register value scaled by 0.1 is computed as ``696 * 0.1 == 69.60000000000001``; the register
map says it has one decimal, so it is sent as ``69.6``. ``round(x, d)`` gives the double nearest
to the decimal at ``d`` places, and Python's (and msgspec's) float formatting writes the shortest
text that reads back as that double, so the two together never show false digits.

Precision comes from, in order: the encoder's ``precision`` table (``"device.name"`` then
``"name"``), its ``decimals``, the declared precision of the point (a Modbus register's
``scale``: 0.1 -> 1, 0.01 -> 2, 0.5 -> 1, 1 -> 0), else none (the value's shortest form).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from flux_edge.model import Value

__all__ = ["Precision", "decimals_of_scale", "declared_precision", "ns", "rounded"]


def decimals_of_scale(scale: float, offset: float = 0.0) -> int | None:
    """Decimals a register value times ``scale`` plus ``offset`` has (None: not decimal)."""
    worst = 0
    for x in (scale, offset):
        if not math.isfinite(x):
            return None
        exp = Decimal(repr(x)).normalize().as_tuple().exponent
        if not isinstance(exp, int):
            return None
        worst = max(worst, -exp)
    return worst if worst <= 15 else None


def declared_precision(sources: Mapping[str, Any]) -> dict[tuple[str, str], int]:
    """``(device, name) -> decimals`` from every Modbus register map in ``sources`` (duck-typed
    on ``devices[].registers[].scale``, so this module needs no source code)."""
    out: dict[tuple[str, str], int] = {}
    for src in sources.values():
        for dev in getattr(src, "devices", ()) or ():
            dname = getattr(dev, "name", "")
            for reg in getattr(dev, "registers", ()) or ():
                scale = getattr(reg, "scale", 1.0)
                offset = getattr(reg, "offset", 0.0)
                if scale == 1.0 and offset == 0.0:
                    continue
                d = decimals_of_scale(scale, offset)
                if d is not None:
                    out[(dname, reg.name)] = d
    return out


class Precision:
    """The decimals of each (device, name); ``round(value)`` applies them to floats."""

    __slots__ = ("_by_name", "_by_point", "_declared", "_default")

    def __init__(
        self,
        declared: Mapping[tuple[str, str], int] | None = None,
        decimals: int | None = None,
        table: Mapping[str, int] | None = None,
    ) -> None:
        self._default = decimals if decimals is not None and decimals >= 0 else None
        # held, not copied: the runtime fills it from the register maps (Uplink.bind)
        self._declared: Mapping[tuple[str, str], int] = declared if declared is not None else {}
        self._by_point: dict[tuple[str, str], int] = {}
        self._by_name: dict[str, int] = {}
        for key, d in (table or {}).items():
            if "." in key:
                dev, _, name = key.partition(".")
                self._by_point[(dev, name)] = d
            else:
                self._by_name[key] = d

    def of(self, device: str, name: str) -> int | None:
        key = (device, name)
        d = self._by_point.get(key)
        if d is None:
            d = self._by_name.get(name)
        if d is None:
            d = self._declared.get(key, self._default)
        return d

    def round(self, device: str, name: str, value: Value) -> Value:
        if type(value) is float:
            d = self.of(device, name)
            if d is not None and math.isfinite(value):
                return rounded(value, d)
        return value


def rounded(value: float, decimals: int) -> float:
    """``value`` at ``decimals`` places; 0 decimals keeps a float (``70.0``), -0.0 becomes 0.0."""
    r = round(value, decimals)
    return r + 0.0 if r == 0 else r


def ns(ts: float) -> int:
    """Nanoseconds of a timestamp in seconds, from its shortest decimal form (so
    ``1732780000.123`` is ``1732780000123000000``, not the double's binary tail)."""
    return int(Decimal(repr(ts)).scaleb(9).to_integral_value())


def ms(ts: float) -> int:
    return int(Decimal(repr(ts)).scaleb(3).to_integral_value())


def all_points(items: Iterable[tuple[str, str]]) -> list[str]:
    return [f"{d}.{n}" for d, n in items]
