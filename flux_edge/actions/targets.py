"""The reference every device-writing action kind checks: its ``source`` names a source of a
kind it can write through."""

from __future__ import annotations

from typing import Any

from flux_edge.config.kinds import Context
from flux_edge.config.values import Key


def target_source(
    ctx: Context,
    aname: str,
    action: dict[str, Any],
    *,
    kinds: tuple[str, ...],
    needs: str,
    why: str = "",
) -> tuple[str, dict[str, Any]] | None:
    """(name, checked table) of the source action ``aname`` writes through, if it is one of
    ``kinds``; else report why not and return None. ``needs``: "a serial" etc., for messages."""
    target = action.get("source")
    sources = ctx.names("sources")
    if sources is None or not isinstance(target, str) or not target:
        return None
    path: Key = ("actions", aname)
    if target not in sources:
        ctx.report((*path, "source"), ctx.missing_ref("source", target, sources))
        return None
    src = ctx.entries("sources").get(target)
    if src is None:
        return None  # the source itself is broken: already reported
    kind = src.get("type")
    if kind not in kinds:
        ctx.report(
            (*path, "source"),
            f'source "{target}" is a {kind} source: {action.get("type")} needs {needs} '
            f"source{why}",
        )
        return None
    return target, src
