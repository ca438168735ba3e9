"""The uplink's checks at load time (a ``Domain`` of the config loader): its topics use our
placeholder syntax (``topics.py``), the encoder table is one encoder kind's (``encoders/``), TLS
files exist, reconnect bounds are in order, a batch topic
does not name a measurement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flux_edge.config.kinds import Context, Domain
from flux_edge.config.schema import UplinkConfig, _default
from flux_edge.config.tables import resolve_tls_files
from flux_edge.config.values import _is_number, _Rule
from flux_edge.uplink.encoders.registry import encoder_kinds, union
from flux_edge.uplink.topics import check_uplink_topic


def _check_encoder(ctx: Context, up: dict[str, object],
                   where: tuple[str, ...] = ("uplink",)) -> None:
    """``[uplink.encoder]`` against its kind's struct (every problem at its key path), then the
    kind's own checks (templates, topics)."""
    table = up.get("encoder")
    if not isinstance(table, dict) or not table:
        return
    path = (*where, "encoder")
    checked = ctx.v.check(table, union(), path)
    if not isinstance(checked, dict) or not ctx.clean(path):
        return
    commands = checked.get("commands", {})
    if isinstance(commands, dict) and commands:
        declared = list(ctx.entries("actions"))
        for name, action in commands.items():
            if isinstance(action, str) and action not in declared:
                ctx.report((*path, "commands", name), ctx.missing_ref("action", action, declared))
    kind = encoder_kinds()[checked["type"]]
    if kind.check is not None:
        kind.check(ctx, checked, path)
    up["encoder"] = table


def _check_extra(ctx: Context, up: dict[str, Any]) -> None:
    """``[uplink.extra.NAME]``: each a whole uplink table (no ``extra`` of its own), with an
    outbox file and a client id of its own."""
    extra = up.get("extra")
    if not isinstance(extra, dict):
        return
    outboxes: dict[str, tuple[str, ...]] = {
        str(up.get("outbox_file", "") or "outbox.sqlite"): ("uplink",)}
    clients: dict[str, tuple[str, ...]] = {}
    if up.get("client_id"):
        clients[str(up["client_id"])] = ("uplink",)
    for name, table in extra.items():
        path = ("uplink", "extra", name)
        if not isinstance(table, dict):
            ctx.report(path, "expected a table like [uplink]")
            continue
        if "extra" in table:
            ctx.report((*path, "extra"), "an extra uplink cannot have extras of its own",
                       at="key")
            continue
        checked = ctx.v.check(table, UplinkConfig, path)
        _check_encoder(ctx, table, path)
        if not isinstance(checked, dict) or not ctx.clean(path):
            continue
        resolve_tls_files(ctx.v, checked.get("tls"), (*path, "tls"), ctx.base_dir)
        extra[name] = checked  # durations and sizes as numbers, as the struct takes them
        outbox = str(checked.get("outbox_file", "") or f"outbox-{name}.sqlite")
        if outbox in outboxes:
            ctx.report((*path, "outbox_file"), f"{outbox} is also the outbox of "
                       f"{'.'.join(outboxes[outbox])}: each uplink needs its own")
        outboxes[outbox] = path
        client = str(checked.get("client_id", ""))
        if client and client in clients:
            ctx.report((*path, "client_id"), f"client id {client!r} is also that of "
                       f"{'.'.join(clients[client])}: a broker drops one of two clients "
                       "with the same id")
        clients[client] = path


def _check_uplink(ctx: Context) -> None:
    """TLS files must exist; reconnect bounds in order; a batch topic should not name a
    measurement (each publish carries many)."""
    v, data, base_dir = ctx.v, ctx.data, ctx.base_dir
    up = data.get("uplink")
    if not isinstance(up, dict):
        return
    resolve_tls_files(v, up.get("tls"), ("uplink", "tls"), base_dir)
    _check_encoder(ctx, up)
    _check_extra(ctx, up)
    outbox = up.get("outbox_file", "")
    if isinstance(outbox, str) and outbox and not Path(outbox).is_absolute():
        up["outbox_file"] = str(base_dir / outbox)
    lo, hi = up.get("reconnect_min", 1.0), up.get("reconnect_max", 60.0)
    if _is_number(lo) and _is_number(hi) and lo > hi:
        v.report(("uplink", "reconnect_max"),
                 f"must be >= reconnect_min ({lo} s), got {hi} s")
    topic = up.get("topic", _default(UplinkConfig, "topic"))
    if up.get("format") == "batch" and isinstance(topic, str) and "{name}" in topic:
        v.report(
            ("uplink", "topic"),
            "format = \"batch\" groups records by topic, and {name} makes one topic per "
            "measurement, so batches would hold one record each; use a topic without {name}, "
            'e.g. "flux-edge/{gateway}/{device}"',
            warning=True,
        )


DOMAIN = Domain(
    name="uplink",
    rules={
        (UplinkConfig, "topic"): _Rule(nonempty=True, check=check_uplink_topic),
        (UplinkConfig, "status_topic"): _Rule(check=check_uplink_topic),
    },
    references=_check_uplink,
)
