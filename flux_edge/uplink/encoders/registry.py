"""The encoder kinds of this build, found by module (every module of the package with ``KIND``)."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

import msgspec

import flux_edge.uplink.encoders as _package
from flux_edge.errors import UplinkError
from flux_edge.uplink.encoders.base import Encoder, EncoderEnv, EncoderKind, EncoderSpec

__all__ = ["DEFAULT", "build", "encoder_kinds", "spec_of"]

DEFAULT = "records"


@functools.cache
def encoder_kinds() -> dict[str, EncoderKind]:
    found: list[EncoderKind] = []
    for info in pkgutil.iter_modules(_package.__path__, _package.__name__ + "."):
        kind = getattr(importlib.import_module(info.name), "KIND", None)
        if isinstance(kind, EncoderKind):
            found.append(kind)
    found.sort(key=lambda k: (k.rank, k.tag))
    return {k.tag: k for k in found}


def union() -> Any:
    """The tagged union of every encoder's struct (for the schema walk and msgspec)."""
    structs: list[Any] = [k.struct for k in encoder_kinds().values()]
    out: Any = structs[0]
    for s in structs[1:]:
        out = out | s
    return out


def spec_of(table: dict[str, Any]) -> EncoderSpec:
    """The encoder struct of a checked ``[uplink.encoder]`` table (records if empty)."""
    if not table:
        table = {"type": DEFAULT}
    try:
        spec: EncoderSpec = msgspec.convert(table, union())
    except msgspec.ValidationError as exc:
        raise UplinkError(f"uplink.encoder: {exc}") from exc
    return spec


def build(spec: EncoderSpec, env: EncoderEnv) -> Encoder:
    kind = encoder_kinds()[str(type(spec).__struct_config__.tag)]
    return kind.factory(spec, env)
