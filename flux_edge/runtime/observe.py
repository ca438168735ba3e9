"""What the daemon tells the outside: the STATUS line, /healthz and the Prometheus metrics.

Everything here reads counters the stages keep anyway; nothing on the data path waits for it.
Metric names follow Prometheus conventions (``flux_edge_`` prefix, ``_total`` counters,
base units). The list, with meanings, is in docs/operations.md.
"""

from __future__ import annotations

import collections
import os
import time
from typing import TYPE_CHECKING, Any

from flux_edge import __version__
from flux_edge.plugins.host import CALL_BUCKETS, Plugin
from flux_edge.runtime.metrics import MetricsWriter
from flux_edge.runtime.queues import BoundedQueue
from flux_edge.state.clock import SYSTEM_CLOCK
from flux_edge.state.faults import StoreHealth

if TYPE_CHECKING:
    from flux_edge.runtime.daemon import Daemon

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _count(n: int) -> str:
    return f"{n:,}"


def stores(daemon: Daemon) -> list[StoreHealth]:
    """Every durable store's health (flux_edge.state.faults)."""
    out: list[StoreHealth] = []
    if daemon.uplink is not None:
        out += daemon.uplink.store_health
    p = daemon.pipeline
    if p is not None:
        out += [p.store.health, p.audit.health, p.safety_health]
    return out


def status_line(daemon: Daemon) -> str:
    """One short line for `systemctl status`: what runs and whether data flows."""
    parts: list[str] = []
    if daemon.reload_error:
        parts.append(f"reload failed, old config kept: {daemon.reload_error[:80]}")
    p = daemon.pipeline
    if p is None:
        return "; ".join([*parts, "starting"])
    devices = [h for src in p.sources.values() for h in src.health.values()]
    bad = sum(1 for h in devices if h.quality != "good")
    dev = f"{len(devices)} device(s)" + (f", {bad} not answering" if bad else "")
    parts.append(f"{dev}; {_count(p.stats['plugins'].processed)} readings")
    up = daemon.uplink
    if up is not None:
        link = "uplink up" if up.connected else "uplink DOWN"
        parts.append(f"{link}, outbox {_count(up.depth())}"
                     + (f", {_count(up.stats.dropped)} dropped" if up.stats.dropped else ""))
    bad_stores = [s for s in stores(daemon) if s.degraded]
    if bad_stores:
        parts.append("STORE DEGRADED: " + ", ".join(f"{s.name} ({s.reason})" for s in bad_stores))
    quarantined, failing = degraded_user_code(daemon)
    if quarantined:
        parts.append("PLUGIN QUARANTINED: " + ", ".join(quarantined))
    if failing:
        parts.append("RULE FAILING: " + ", ".join(failing))
    stuck = daemon.monitor.check()
    if stuck:
        parts.append("STUCK: " + stuck[0])
    return "; ".join(parts)


def degraded_user_code(daemon: Daemon) -> tuple[list[str], list[str]]:
    """Plugins in quarantine and rules whose last evaluations all failed (by name): user code
    that is degraded, not hung. The daemon goes on serving everything else, so /healthz stays
    200 and the watchdog is fed; both are named in /healthz, STATUS= and the metrics."""
    quarantined = sorted(
        name for name, insts in _plugins(daemon).items() if any(i.quarantined for i in insts)
    )
    p = daemon.pipeline
    failing = sorted(p.engine.failing()) if p is not None else []
    return quarantined, failing


def health_report(daemon: Daemon) -> tuple[bool, dict[str, object]]:
    """/healthz: healthy while no critical stage is stuck (what the watchdog checks)."""
    problems = daemon.monitor.check()
    all_stores = stores(daemon)
    quarantined, failing = degraded_user_code(daemon)
    degraded = any(s.degraded for s in all_stores) or bool(quarantined or failing)
    # a degraded store (disk full, read-only) is reported, but stays 200: the daemon is alive
    # and retries by itself; a restart would not free a byte
    body: dict[str, object] = {
        "status": "stuck" if problems else "degraded" if degraded else "ok",
        "stores": {s.name: s.describe() for s in all_stores},
        "clock": {"synchronized": SYSTEM_CLOCK.synced(), "problem": SYSTEM_CLOCK.reason()},
        "problems": problems,
        "plugins_quarantined": quarantined,
        "rules_failing": failing,
        "stages": daemon.monitor.snapshot(),
        "loop_lag_s": round(daemon.monitor.loop_lag, 6),
    }
    if daemon.reload_error:
        body["reload_error"] = daemon.reload_error
    if daemon.uplink is not None:
        body["uplink"] = {"connected": daemon.uplink.connected,
                          "outbox": daemon.uplink.depth(),
                          "dropped": daemon.uplink.stats.dropped}
    return not problems, body


def stage_busy(snapshot: dict[str, dict[str, float | bool | None]]) -> list[
    tuple[dict[str, str], float]
]:
    """flux_edge_stage_busy_seconds from HealthMonitor.snapshot(): seconds on the current unit
    of work, 0 while idle."""
    out = []
    for stage, info in snapshot.items():
        busy = info.get("busy")
        out.append(({"stage": stage}, float(busy) if isinstance(busy, float) else 0.0))
    return out


def _plugins(daemon: Daemon) -> dict[str, list[Plugin]]:
    p = daemon.pipeline
    return p.plugins_by_name() if p is not None else {}


def render_metrics(daemon: Daemon) -> str:
    w = MetricsWriter()
    p = daemon.pipeline
    gateway = daemon.config.daemon.name or os.uname().nodename
    w.gauge("flux_edge_info", "Version and gateway name.",
            [({"version": __version__, "gateway": gateway}, 1)])
    w.gauge("flux_edge_start_time_seconds", "Unix time the daemon started.",
            [({}, daemon.started_at)])
    w.gauge("flux_edge_process_resident_memory_bytes", "Resident set size.", [({}, _rss_bytes())])
    t = os.times()
    w.counter("flux_edge_process_cpu_seconds_total", "User + system CPU time.",
              [({}, t.user + t.system)])
    w.counter("flux_edge_reloads_total", "Configuration reloads, by result.",
              [({"result": "ok"}, daemon.reloads_ok),
               ({"result": "failed"}, daemon.reloads_failed)])
    w.gauge("flux_edge_event_loop_lag_seconds", "How late the watchdog feeder woke last time.",
            [({}, daemon.monitor.loop_lag)])
    snap = daemon.monitor.snapshot()
    w.gauge("flux_edge_stage_busy_seconds",
            "How long each stage has been on its current unit of work (0 = idle).",
            stage_busy(snap))
    w.gauge("flux_edge_healthy", "1 while no critical stage is stuck (the watchdog is fed).",
            [({}, 0 if daemon.monitor.check() else 1)])
    if p is not None:
        w.counter("flux_edge_stage_processed_total", "Units processed per stage.",
                  [({"stage": s}, st.processed) for s, st in p.stats.items()])
        w.counter("flux_edge_stage_errors_total", "Errors per stage.",
                  [({"stage": s}, st.errors) for s, st in p.stats.items()])
        queues: list[BoundedQueue[Any]] = [p.readings, p.measurements, p.commands, p.upstream]
        w.gauge("flux_edge_queue_depth", "Items waiting between stages.",
                [({"queue": q.name}, len(q)) for q in queues])
        w.gauge("flux_edge_queue_capacity", "Capacity of each queue.",
                [({"queue": q.name}, q.capacity) for q in queues])
        w.counter("flux_edge_queue_blocked_total",
                  "Times a producer waited for room (back-pressure).",
                  [({"queue": q.name}, q.blocked_total) for q in queues])
        w.counter("flux_edge_queue_dropped_total", "Items dropped by a full queue.",
                  [({"queue": q.name}, q.dropped_total) for q in queues])
        w.counter("flux_edge_dead_letters_total",
                  "Messages that could not be processed (logged with the reason).",
                  [({}, p.dead_letter_total)])
        polls, errors, up, last_ok, failures = [], [], [], [], []
        for sname, src in p.sources.items():
            for dev, h in src.health.items():
                labels = {"source": sname, "device": dev}
                failures += [({**labels, "reason": r}, n) for r, n in sorted(h.failures.items())]
                polls.append((labels, h.polls))
                errors.append((labels, h.total_errors))
                up.append((labels, 1 if h.quality == "good" else 0))
                if h.last_success_ts is not None:
                    last_ok.append((labels, h.last_success_ts))
        w.counter("flux_edge_device_polls_total", "Polls (or messages) per device.", polls)
        w.counter("flux_edge_device_errors_total", "Failed polls/errors per device.", errors)
        w.counter("flux_edge_device_failures_total",
                  "Failed requests per device by reason (timeout, crc, unit_id, function_code, "
                  "byte_count, garbage, truncated, exception, ...).", failures)
        w.gauge("flux_edge_device_up", "1 while the device answers (quality good).", up)
        w.gauge("flux_edge_device_last_success_timestamp_seconds",
                "Unix time of the device's last good poll or message.", last_ok)
        rules = p.engine.stats
        w.counter("flux_edge_rule_evaluations_total", "Condition evaluations per rule.",
                  [({"rule": r}, st.evaluations) for r, st in rules.items()])
        w.counter("flux_edge_rule_firings_total", "Times each rule fired.",
                  [({"rule": r}, st.firings) for r, st in rules.items()])
        w.counter("flux_edge_rule_errors_total", "Evaluation errors per rule.",
                  [({"rule": r}, st.errors) for r, st in rules.items()])
        w.counter("flux_edge_action_outcomes_total",
                  "Action runs by result (blocked = refused by the safety layer).",
                  [({"action": a, "result": res}, n)
                   for a, counts in p.action_counts.items()
                   for res, n in zip(("ok", "failed", "blocked"), counts, strict=True)])
    plugins = _plugins(daemon)
    calls, msgs, perr, touts, traps, quar, hist = [], [], [], [], [], [], []
    dead: list[tuple[dict[str, str], float]] = []
    for name, instances in sorted(plugins.items()):
        labels = {"plugin": name}
        reasons: collections.Counter[str] = collections.Counter()
        for i in instances:
            reasons.update(i.stats.dead_letters)
        dead += [({"plugin": name, "reason": r}, n) for r, n in sorted(reasons.items())]
        calls.append((labels, sum(i.stats.calls for i in instances)))
        msgs.append((labels, sum(i.stats.messages for i in instances)))
        perr.append((labels, sum(i.stats.errors for i in instances)))
        touts.append((labels, sum(i.stats.timeouts for i in instances)))
        traps.append((labels, sum(i.stats.traps for i in instances)))
        quar.append((labels, sum(i.stats.quarantines for i in instances)))
        counts = [sum(c) for c in zip(*(i.stats.call_counts for i in instances), strict=True)]
        hist.append((labels, counts, sum(i.stats.total_call_s for i in instances), sum(counts)))
    w.counter("flux_edge_plugin_calls_total", "Plugin calls (one call carries a batch).", calls)
    w.counter("flux_edge_plugin_messages_total", "Messages passed to plugins.", msgs)
    w.counter("flux_edge_plugin_errors_total", "Messages a plugin rejected or failed.", perr)
    w.counter("flux_edge_plugin_timeouts_total", "Calls stopped at their time limit.", touts)
    w.counter("flux_edge_plugin_traps_total", "Calls that trapped (crashed) in the guest.", traps)
    w.counter("flux_edge_plugin_quarantines_total", "Times a plugin was quarantined.", quar)
    w.counter("flux_edge_plugin_dead_letters_total",
              "Error records a plugin's messages became, by reason.", dead)
    w.histogram("flux_edge_plugin_call_seconds", "Wall time per plugin call.", CALL_BUCKETS, hist)
    if p is not None:
        rule_errors = [
            ({"rule": r, "reason": reason}, n)
            for r, st in sorted(p.engine.stats.items())
            for reason, n in sorted(st.errors_by_reason.items())
        ]
        w.counter("flux_edge_rule_error_reasons_total",
                  "Evaluations of a rule that failed, by reason (flux_edge.rules.cel).",
                  rule_errors)
        w.gauge("flux_edge_rule_consecutive_errors",
                "Failed evaluations of a rule in a row (0 once one succeeds).",
                [({"rule": r}, st.consecutive_errors) for r, st in sorted(p.engine.stats.items())])
    w.gauge("flux_edge_clock_synchronized",
            "1 while the wall clock is known to be right (systemd-timesyncd's flag, or a "
            "plausible year where there is no timesyncd).",
            [({}, 1 if SYSTEM_CLOCK.synced() else 0)])
    w.counter("flux_edge_measurements_unsynced_total",
              "Measurements recorded upstream while the wall clock was not synchronised "
              "(their records carry \"clock\": \"unsynced\").",
              [({}, SYSTEM_CLOCK.unsynced_stamps)])
    all_stores = stores(daemon)
    w.gauge("flux_edge_store_degraded",
            "1 while a durable store cannot be written (label reason: disk full, read-only, "
            "I/O error, ...).",
            [({"store": s.name, "path": s.path, "reason": s.reason}, 1 if s.degraded else 0)
             for s in all_stores])
    w.counter("flux_edge_store_write_failures_total", "Failed writes per durable store.",
              [({"store": s.name, "path": s.path}, s.failures) for s in all_stores])
    up_link = daemon.uplink
    if up_link is not None:
        st = up_link.stats
        w.counter("flux_edge_uplink_dropped_by_reason_total",
                  "Records dropped unsent, by reason (outbox_full, store_unavailable, "
                  "unpublishable, shutdown).",
                  [({"reason": r}, n) for r, n in sorted(st.dropped_by_reason.items())])
        oldest = up_link.oldest_ts()
        w.gauge("flux_edge_uplink_connected", "1 while connected to the upstream broker.",
                [({}, 1 if up_link.connected else 0)])
        w.gauge("flux_edge_outbox_records", "Records waiting in the outbox.",
                [({}, up_link.depth())])
        w.gauge("flux_edge_outbox_bytes", "Bytes the waiting records take (payload estimate).",
                [({}, up_link.depth_bytes())])
        w.gauge("flux_edge_outbox_oldest_age_seconds",
                "Age of the oldest waiting measurement (0 = empty).",
                [({}, max(time.time() - oldest, 0.0) if oldest is not None else 0.0)])
        w.counter("flux_edge_uplink_acked_total",
                  "Records the upstream broker acknowledged.", [({}, st.acked)])
        w.counter("flux_edge_uplink_published_total", "Publishes sent upstream.",
                  [({}, st.published)])
        w.counter("flux_edge_uplink_dropped_total",
                  "Records dropped because the outbox was full (oldest first).",
                  [({}, st.dropped)])
        w.counter("flux_edge_uplink_publish_errors_total", "Failed publishes (retried).",
                  [({}, st.publish_errors)])
        cs = up_link.command_stats
        w.counter("flux_edge_uplink_commands_total",
                  "Commands from upstream by outcome (ok, unknown, denied, failed; "
                  "[uplink] and every [uplink.extra.*] together).",
                  [({"status": k}, n) for k, n in (
                      ("ok", cs.ok + sum(e.command_stats.ok for e in up_link.extras.values())),
                      ("unknown", cs.unknown + sum(
                          e.command_stats.unknown for e in up_link.extras.values())),
                      ("denied", cs.denied + sum(
                          e.command_stats.denied for e in up_link.extras.values())),
                      ("failed", cs.failed + sum(
                          e.command_stats.failed for e in up_link.extras.values())))])
        if up_link.extras:
            w.gauge("flux_edge_uplink_extra_connected",
                    "1 while an [uplink.extra.NAME] is connected to its broker.",
                    [({"uplink": n}, 1 if e.connected else 0)
                     for n, e in up_link.extras.items()])
            w.gauge("flux_edge_uplink_extra_outbox_records",
                    "Records waiting in an [uplink.extra.NAME]'s outbox.",
                    [({"uplink": n}, e.depth()) for n, e in up_link.extras.items()])
    return w.text()
