"""check-config's warnings about exposure (issue #13, item 8): settings that work but leave a
gateway open. Each is a warning at its key, not an error: the operator may mean it.

- ``verify_hostname = false`` in any TLS table: anyone on the path can pose as the broker;
- a password sent to a broker that is neither TLS nor on this host: it crosses the network in
  clear text;
- secrets written in a file that other users can read (mode o+r): move them to a file of their
  own or a systemd credential (config/secrets.py), or ``chmod 640`` the file;
- the metrics endpoint bound beyond loopback: /metrics and /healthz have no authentication.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from typing import TYPE_CHECKING, Any

from flux_edge.config.values import Key, _fmt_path

if TYPE_CHECKING:
    from flux_edge.config.validate import _Validator

__all__ = ["check_security", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (localhost, 127.0.0.0/8, ::1, a Unix path)."""
    h = host.strip().strip("[]").lower()
    if h in ("localhost", "localhost.localdomain", "ip6-localhost") or h.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return h.endswith(".localhost")


def _tables(data: Any, path: Key = ()) -> list[tuple[Key, dict[str, Any]]]:
    out: list[tuple[Key, dict[str, Any]]] = []
    stack: list[tuple[Key, Any]] = [(path, data)]
    while stack:
        p, value = stack.pop()
        if isinstance(value, dict):
            out.append((p, value))
            stack.extend(((*p, k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*p, i), v) for i, v in enumerate(value))
    return out


def check_security(v: _Validator, data: dict[str, Any], config_path: str) -> None:
    """Report the warnings above on checked ``data`` (secrets already resolved)."""
    for path, table in _tables(data):
        if path and path[-1] == "tls" and table.get("verify_hostname") is False:
            v.report(
                (*path, "verify_hostname"),
                "verify_hostname = false: the broker's certificate is not checked against its "
                "name, so anyone on the network path can pose as the broker (and read what is "
                "sent, the password included)",
                warning=True,
            )
        host = table.get("host")
        if table.get("password") and isinstance(host, str) and table.get("tls") is None \
                and not is_loopback(host):
            v.report(
                (*path, "password"),
                f"a password sent to {host} without TLS crosses the network in clear text: "
                "add a tls table (tls = {} for the system's CAs)",
                at="key",
                warning=True,
            )
    metrics = data.get("metrics")
    if isinstance(metrics, dict) and metrics.get("enabled", True):
        mhost = metrics.get("host", "127.0.0.1")
        if isinstance(mhost, str) and not is_loopback(mhost):
            v.report(
                ("metrics", "host"),
                f"metrics on {mhost}: /metrics and /healthz answer anyone who can reach this "
                "address, without authentication (bind 127.0.0.1 and scrape through a tunnel "
                "or a reverse proxy)",
                warning=True,
            )
    if v.secrets and config_path:
        try:
            mode = os.stat(config_path).st_mode
        except OSError:
            return
        if mode & stat.S_IROTH:
            keys = ", ".join(_fmt_path(p) for p in v.secrets)
            v.report(
                v.secrets[0],
                f"this file holds secrets ({keys}) and every user of this machine can read it "
                f"(mode {stat.S_IMODE(mode):04o}): chmod 640 it (group flux-edge), or take them "
                'from a file of their own or a systemd credential: { credential = "name" }',
                at="key",
                warning=True,
            )
