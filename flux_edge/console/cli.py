"""`flux-edge console user|token ...` (the users file) and `flux-edge status` (a summary from
the running daemon's /api/v1)."""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from flux_edge.console.auth import (
    ROLES,
    ConsoleAuthError,
    add_token,
    add_user,
    read_users,
    remove_token,
    remove_user,
)
from flux_edge.errors import FluxError

EX_OK, EX_FAIL = 0, 1


def _users_path(args: argparse.Namespace) -> Path:
    if args.users_file:
        return Path(args.users_file)
    from flux_edge.kinds import load_config

    config = load_config(args.config_path)
    if config.console.users_file:
        return Path(config.console.users_file)
    return Path(config.daemon.state_dir) / "console" / "users.json"


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ConsoleAuthError("the two passwords differ")
    return first


def cmd_user(args: argparse.Namespace) -> int:
    path = _users_path(args)
    if args.user_command == "add":
        add_user(path, args.name, args.role, _password(args))
        print(f"{path}: user {args.name} ({args.role}) saved")
    elif args.user_command == "remove":
        if not remove_user(path, args.name):
            raise ConsoleAuthError(f"no user {args.name!r} in {path}")
        print(f"{path}: user {args.name} removed (their sessions end at their next request)")
    else:
        data = read_users(path)
        for name, u in sorted(data["users"].items()):
            print(f"user  {name:24} {u.get('role')}")
        for t in sorted(data["tokens"].values(), key=lambda t: str(t.get("name"))):
            print(f"token {t.get('name')!s:24} {t.get('role')}")
    return EX_OK


def cmd_token(args: argparse.Namespace) -> int:
    path = _users_path(args)
    if args.token_command == "add":
        token = add_token(path, args.name, args.role)
        print(token)
        print(f"(token {args.name} ({args.role}) saved in {path}; it is shown only now: send it "
              "as 'Authorization: Bearer TOKEN')", file=sys.stderr)
    else:
        if not remove_token(path, args.name):
            raise ConsoleAuthError(f"no token {args.name!r} in {path}")
        print(f"{path}: token {args.name} removed")
    return EX_OK


def add_console_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                       add_config: Any) -> None:
    con = sub.add_parser("console", help="manage the web console's users and tokens")
    csub = con.add_subparsers(dest="console_command", required=True, metavar="SUBCOMMAND")
    user = csub.add_parser("user", help="add, remove or list console users")
    usub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    token = csub.add_parser("token", help="add or remove tokens for scripts")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    for parser, name, func in (
        (usub.add_parser("add", help="add a user or set a password (asked twice)"), True, cmd_user),
        (usub.add_parser("remove", help="remove a user"), True, cmd_user),
        (usub.add_parser("list", help="list users and tokens"), False, cmd_user),
        (tsub.add_parser("add", help="make a token (printed once)"), True, cmd_token),
        (tsub.add_parser("remove", help="remove a token"), True, cmd_token),
    ):
        add_config(parser)
        parser.add_argument("--users-file", help="the users file (default: from the config)")
        if name:
            parser.add_argument("name")
        parser.set_defaults(func=func)
    for parser in (usub.choices["add"], tsub.choices["add"]):
        parser.add_argument("--role", choices=ROLES, required=True)
    usub.choices["add"].add_argument("--password-stdin", action="store_true",
                                     help="read the password from the first line of stdin")


# --- status ------------------------------------------------------------------------------------


def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    from flux_edge.console.app import local_token_path
    from flux_edge.console.checks import is_loopback
    from flux_edge.kinds import load_config

    config = load_config(args.config_path)
    con = config.console
    if not con.enabled and not args.port:
        raise FluxError(f"{config.path}: the console is not enabled ([console] enabled = true), "
                        "and `flux-edge status` reads it")
    host = args.host or ("127.0.0.1" if con.host in ("0.0.0.0", "::") else con.host)
    port = args.port or con.port
    token = args.token or os.environ.get("FLUX_EDGE_TOKEN", "")
    if not token:
        try:
            token = local_token_path(config.daemon.state_dir).read_text().strip()
        except OSError as exc:
            raise FluxError(
                f"no token: run as the service user (or root) to use "
                f"{local_token_path(config.daemon.state_dir)}, or pass --token / $FLUX_EDGE_TOKEN "
                f"(flux-edge console token add NAME --role viewer) ({exc.strerror})"
            ) from exc
    tls = con.tls == "on" or (con.tls == "auto" and not is_loopback(con.host))
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context()
        cert = Path(con.cert_file) if con.cert_file else (
            Path(config.daemon.state_dir) / "console" / "console-cert.pem")
        try:
            ctx.load_verify_locations(cert)
            ctx.check_hostname = not is_loopback(host)
        except (OSError, ssl.SSLError):
            if not is_loopback(host):
                raise
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # this machine, its own certificate unreadable
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/api/v1/status", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        raise FluxError(f"cannot reach the console on {host}:{port}: {exc}; is the daemon "
                        "running?") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise FluxError(f"the console answered {resp.status}: {body.decode(errors='replace')}")
    data: dict[str, Any] = json.loads(body)
    return data


def _age(s: float | None) -> str:
    if s is None:
        return "never"
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


def print_status(data: dict[str, Any], out: Any) -> None:
    s = data["summary"]
    health = "healthy" if s["healthy"] else "STUCK: " + "; ".join(s["problems"])
    print(f"{s['gateway']}: flux-edge {s['version']}, up {s['uptime_s'] / 3600:.1f} h, {health}",
          file=out)
    if s.get("reload_error"):
        print(f"  last reload failed: {s['reload_error']}", file=out)
    devs = s.get("devices", {})
    print(f"devices: {devs.get('online', 0)}/{devs.get('total', 0)} online", file=out)
    for d in data["devices"]:
        err = f" - {d['last_error']}" if d["state"] != "online" and d["last_error"] else ""
        print(f"  {d['device']:20} {d['state']:9} last ok {_age(d['last_success_age_s'])}{err}",
              file=out)
    active = [r for r in data["rules"] if r["state"] != "armed"]
    print(f"rules: {len(data['rules'])}, {len(active)} not idle", file=out)
    for r in active:
        print(f"  {r['name']:20} {r['state']}"
              + (f" - {r['last_error']}" if r["state"] == "error" else ""), file=out)
    for a in data["actuators"]:
        o = a["override"]
        held = f", held {o['state']} by {o['user']}" if o else ""
        print(f"actuator {a['name']}: {a['state'] or 'unknown'}{held}", file=out)
    for p in data["plugins"]:
        if p["quarantined"]:
            print(f"plugin {p['name']}: QUARANTINED - {p['last_failure']}", file=out)
    up = s.get("uplink")
    if up:
        link = "connected" if up["connected"] else "DOWN"
        print(f"uplink: {link}, outbox {up['outbox']} (oldest {up['oldest_age_s']:.0f} s), "
              f"{up['dropped']} dropped", file=out)


def cmd_status(args: argparse.Namespace) -> int:
    data = _fetch(args)
    if args.json:
        json.dump(data, sys.stdout, indent=1)
        print()
    else:
        print_status(data, sys.stdout)
    return EX_OK if data["summary"]["healthy"] else EX_FAIL


def add_status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                      add_config: Any) -> None:
    p = sub.add_parser("status", help="a summary of the running daemon (from its console API)")
    add_config(p)
    p.add_argument("--host", help="the console's address (default: from the config)")
    p.add_argument("--port", type=int, default=0, help="its port (default: from the config)")
    p.add_argument("--token", help="a console token (default: $FLUX_EDGE_TOKEN, else the "
                   "daemon's local token in <state_dir>/console/local.token)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_status)
