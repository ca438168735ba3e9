"""The console's checks at load time (a ``Domain`` of the config loader): a bind beyond
loopback needs TLS, certificate files exist, the key needs its certificate."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from flux_edge.config.kinds import Context, Domain


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_console(ctx: Context) -> None:
    v, data, base_dir = ctx.v, ctx.data, ctx.base_dir
    con = data.get("console")
    if not isinstance(con, dict):
        return
    host = con.get("host", "127.0.0.1")
    tls = con.get("tls", "auto")
    if isinstance(host, str) and not is_loopback(host) and tls == "off":
        v.report(
            ("console", "tls"),
            f'the console listens beyond loopback (host = "{host}"): a LAN bind requires TLS; '
            'set tls = "auto" or "on" (a self-signed certificate is made on first start '
            "unless cert_file is set), or host = \"127.0.0.1\"",
        )
    for key in ("cert_file", "key_file", "users_file"):
        value = con.get(key, "")
        if isinstance(value, str) and value and not Path(value).is_absolute():
            con[key] = str(base_dir / value)
    cert, key = con.get("cert_file", ""), con.get("key_file", "")
    if key and not cert:
        v.report(("console", "key_file"), "key_file needs cert_file (the certificate it signs)")
    for name in ("cert_file", "key_file"):
        value = con.get(name, "")
        if isinstance(value, str) and value and not Path(value).is_file():
            v.report(("console", name), f"{value}: no such file")


DOMAIN = Domain(name="console", references=_check_console)
