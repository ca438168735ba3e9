"""What the API shows, read from the running daemon's own counters and state: nothing on the
data path waits for it, and nothing here writes. Each function returns plain JSON data.

The rule engine's per-device state (``_rules``, ``_State``) and a plugin's quarantine are read
through their private attributes, read-only: the engine exposes counters, not timers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from flux_edge import __version__
from flux_edge.actions.audit_cli import audit_path
from flux_edge.plugins.host import Plugin

if TYPE_CHECKING:
    from flux_edge.console.live import LogBuffer, Trends
    from flux_edge.runtime.daemon import Daemon

_SECRET = re.compile(r"pass(word)?|secret|token|credential|psk|private|api_?key", re.I)
REDACTED = "********"


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, nd)


def summary(d: Daemon) -> dict[str, Any]:
    p = d.pipeline
    now = time.time()
    problems = d.monitor.check()
    out: dict[str, Any] = {
        "gateway": d.config.daemon.name or os.uname().nodename,
        "version": __version__,
        "started_at": d.started_at,
        "uptime_s": _r(now - d.started_at, 1),
        "healthy": not problems,
        "problems": problems,
        "reload_error": d.reload_error,
        "config": d.config.path,
    }
    if p is not None:
        devs = [h for src in p.sources.values() for h in src.health.values()]
        out["devices"] = {"total": len(devs), "online": sum(h.quality == "good" for h in devs)}
        out["readings"] = p.stats["plugins"].processed
        out["rules"] = {"total": len(p.engine.stats),
                        "failing": sum(1 for s in p.engine.stats.values() if s.consecutive_errors)}
        out["dead_letters"] = p.dead_letter_total
        out["overrides"] = dict(getattr(d, "overrides", {}))
    out["uplink"] = uplink(d)
    out["plugins_quarantined"] = [x["name"] for x in plugins(d) if x["quarantined"]]
    return out


def devices(d: Daemon, trends: Trends | None) -> list[dict[str, Any]]:
    p = d.pipeline
    if p is None:
        return []
    now = time.time()
    out = []
    for sname, src in p.sources.items():
        scfg = p.config.sources.get(sname)
        # a Modbus poller backs off a device that stopped answering (``failures``: the backoff
        # exponent); other sources only count errors
        polled = getattr(src, "_devices", {})
        for dev, h in src.health.items():
            backoff = getattr(polled.get(dev), "failures", None)
            if h.quality == "good":
                state = "online"
            elif backoff or (backoff is None and h.consecutive_errors >= 3):
                state = "back-off"
            elif h.consecutive_errors:
                state = "failing"
            else:
                state = "waiting"  # no answer yet
            values = []
            for m in sorted(p.latest.get(dev, {}).values(), key=lambda m: m.name):
                v: dict[str, Any] = {"name": m.name, "value": m.value, "unit": m.unit,
                                     "quality": m.quality, "ts": m.ts, "age_s": _r(now - m.ts)}
                if trends is not None:
                    v["trend"] = [(_r(t, 2), y) for t, y in trends.of(dev, m.name)]
                values.append(v)
            out.append({
                "source": sname, "type": type(scfg).__struct_config__.tag if scfg else "",
                "device": dev, "state": state, "quality": h.quality,
                "polls": h.polls, "errors": h.total_errors,
                "consecutive_errors": h.consecutive_errors, "missed_polls": h.missed_polls,
                "last_success_ts": h.last_success_ts,
                "last_success_age_s": _r(now - h.last_success_ts) if h.last_success_ts else None,
                "last_error": h.last_error, "failures": dict(h.failures), "values": values,
            })
    return out


def rules(d: Daemon) -> list[dict[str, Any]]:
    p = d.pipeline
    if p is None:
        return []
    engine = p.engine
    now = engine.now()  # rule timers are on the engine's duration clock (monotonic)
    out = []
    for r in engine.rules:
        spec = p.config.rules[r.name]
        st = r.stats
        per_device = []
        for dev, s in sorted(r.states.items()):
            pending = None
            if s.since is not None and r.for_ and not s.on:
                pending = _r(max(s.since + r.for_ - now, 0.0), 1)
            cooling = s.last_fire is not None and now < s.last_fire + r.cooldown
            state = ("firing" if s.on else "pending" if pending is not None
                     else "cooldown" if cooling else "armed")
            per_device.append({
                "device": dev or spec.device, "state": state, "true_since": s.since,
                "pending_left_s": pending, "last_fire": s.last_fire,
                "cooldown_left_s": (_r(s.last_fire + r.cooldown - now, 1)
                                    if cooling and s.last_fire is not None else None),
            })
        out.append({
            "name": r.name, "when": spec.when, "mode": spec.mode, "for_s": spec.for_,
            "cooldown_s": spec.cooldown, "device": spec.device, "actions": list(spec.actions),
            "off_actions": list(spec.off_actions), "description": spec.description,
            "state": ("error" if st.consecutive_errors else
                      next((x["state"] for x in per_device if x["state"] != "armed"), "armed")),
            "devices": per_device, "evaluations": st.evaluations, "firings": st.firings,
            "errors": st.errors, "consecutive_errors": st.consecutive_errors,
            "last_error": st.last_error, "last_fired_ts": st.last_fired_ts,
            "suppressed": st.suppressed,
        })
    return out


def actuators(d: Daemon) -> dict[str, Any]:
    p = d.pipeline
    if p is None:
        return {"actuators": [], "actions": []}
    overrides: dict[str, Any] = getattr(d, "overrides", {})
    acts = []
    for name in p.safety.actuator_names:
        cfg = p.config.actuators[name]
        st = p.safety.stats[name]
        internal = getattr(p.safety, "_actuators", {}).get(name)
        acts.append({
            "name": name, "state": p.safety.state(name), "on": cfg.on, "off": cfg.off,
            "safe": cfg.safe, "min_on_s": cfg.min_on, "min_off_s": cfg.min_off,
            "max_switches": cfg.max_switches, "interlock": cfg.interlock,
            "last_switch": getattr(internal, "last_switch", None),
            "tripped": getattr(internal, "tripped", ""),
            "override": overrides.get(name),
            "allowed": st.allowed, "switches": st.switches, "failures": st.failures,
            "blocked": st.blocked, "blocked_by": dict(st.blocked_by),
            "last_block_reason": st.last_block_reason, "last_block_ts": st.last_block_ts,
        })
    actions = [
        {"name": a, "type": type(cfg).__struct_config__.tag,
         "ok": p.action_counts.get(a, [0, 0, 0])[0], "failed": p.action_counts.get(a, [0, 0, 0])[1],
         "blocked": p.action_counts.get(a, [0, 0, 0])[2],
         "actuators": list(p.safety.actuators_of(a))}
        for a, cfg in p.config.actions.items()
    ]
    return {"actuators": acts, "actions": actions}


def audit(d: Daemon, limit: int = 100, actuator: str = "") -> list[dict[str, Any]]:
    """The last records of the audit log (newest first), read from its file."""
    path = Path(audit_path(d.config))
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - 256 * 1024, 0))
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and (not actuator or rec.get("actuator") == actuator):
            out.append(rec)
            if len(out) >= limit:
                break
    return out


_versions: dict[str, str] = {}


def _version(path: Path) -> str:
    key = str(path)
    if key not in _versions:
        from flux_edge.plugins.manifest import ManifestError, read_manifest

        try:
            m = read_manifest(path)
        except (OSError, ManifestError):
            m = None
        _versions[key] = m.version if m is not None else ""
    return _versions[key]


def _plugin_instances(d: Daemon) -> dict[str, list[Plugin]]:
    p = d.pipeline
    return p.plugins_by_name() if p is not None else {}


def plugins(d: Daemon) -> list[dict[str, Any]]:
    out = []
    now = time.monotonic()
    for name, instances in sorted(_plugin_instances(d).items()):
        calls = sum(i.stats.calls for i in instances)
        total = sum(i.stats.total_call_s for i in instances)
        qs = [getattr(i, "_q", None) for i in instances]
        active = [q for q in qs if q is not None and q.active]
        until = max((q.until for q in active if q.until is not None), default=None)
        last_failure = next((q.last_failure for q in qs if q is not None and q.last_failure), "")
        out.append({
            "name": name, "version": _version(instances[0].path), "instances": len(instances),
            "calls": calls, "messages": sum(i.stats.messages for i in instances),
            "errors": sum(i.stats.errors for i in instances),
            "failures": sum(i.stats.failures for i in instances),
            "timeouts": sum(i.stats.timeouts for i in instances),
            "traps": sum(i.stats.traps for i in instances),
            "quarantines": sum(i.stats.quarantines for i in instances),
            "mean_call_ms": _r(total / calls * 1000) if calls else None,
            "quarantined": bool(active),
            "quarantine_left_s": _r(until - now, 1) if until is not None else None,
            "last_failure": last_failure,
        })
    return out


def uplink(d: Daemon) -> dict[str, Any] | None:
    up = d.uplink
    if up is None:
        return None
    oldest = up.oldest_ts()
    st = up.stats
    return {
        "connected": up.connected, "outbox": up.depth(), "outbox_bytes": up.depth_bytes(),
        "oldest_age_s": _r(max(time.time() - oldest, 0.0), 1) if oldest is not None else 0.0,
        "published": st.published, "acked": st.acked, "dropped": st.dropped,
        "publish_errors": st.publish_errors, "last_error": getattr(st, "last_error", ""),
        "host": d.config.uplink.host if d.config.uplink else "",
    }


def redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if key and _SECRET.search(key) and value not in ("", None, False):
        if isinstance(value, str) and key.endswith(("_file", "file")):
            return value  # a path, not the secret itself
        return REDACTED
    return value


def config(d: Daemon) -> dict[str, Any]:
    data = msgspec.to_builtins(d.config)
    return {"path": d.config.path, "config": redact(data)}


def logs(buffer: LogBuffer | None, after: int = 0) -> list[dict[str, Any]]:
    if buffer is None:
        return []
    return [r for r in buffer.records if r["seq"] > after]


def status(d: Daemon) -> dict[str, Any]:
    """What the live stream sends every two seconds: everything but the trends, the config,
    the audit trail and the log."""
    return {"summary": summary(d), "devices": devices(d, None), "rules": rules(d),
            **actuators(d), "plugins": plugins(d), "ts": time.time()}
