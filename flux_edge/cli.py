"""The `flux-edge` command line.

Exit codes: 0 ok; 1 runtime failure; 2 usage error; 75 (EX_TEMPFAIL) a transient failure at
start-up (out of memory, a full disk: systemd restarts it); 78 (EX_CONFIG) the configuration is
invalid (or a plugin file broken), which the systemd unit lists in RestartPreventExitStatus so a
bad file is not restarted in a loop.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import TextIO

from flux_edge import __version__
from flux_edge.errors import ConfigError, FluxError

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2
EX_TEMPFAIL = 75  # a transient failure (no memory, a full disk): systemd restarts the service
EX_CONFIG = 78


def _err(msg: str) -> None:
    print(f"flux-edge: error: {msg}", file=sys.stderr)


def _print_problems(problems: list[object], stream: TextIO) -> None:
    for p in problems:
        print(str(p), file=stream)


DEFAULT_CONFIG = "/etc/flux-edge/flux-edge.toml"


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Every subcommand that reads the daemon's config takes it the same way: ``-c FILE``,
    ``--config FILE`` or a plain ``FILE``; default $FLUX_EDGE_CONFIG, else DEFAULT_CONFIG.
    The resolved path is ``args.config_path`` (and ``args.config``)."""
    parser.add_argument("--config", "-c", metavar="FILE",
                        help=f"the config (default: $FLUX_EDGE_CONFIG or {DEFAULT_CONFIG})")
    parser.add_argument("config_file", nargs="?", metavar="FILE", help="the same as --config")
    parser.set_defaults(takes_config=True)


def _resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not getattr(args, "takes_config", False):
        return
    if args.config and args.config_file and args.config != args.config_file:
        parser.error("give the config once: FILE or --config FILE")
    path = (args.config or args.config_file or os.environ.get("FLUX_EDGE_CONFIG")
            or DEFAULT_CONFIG)
    args.config = args.config_path = args.path = path


def cmd_check_config(args: argparse.Namespace) -> int:
    from flux_edge.kinds import check_config

    config, problems = check_config(Path(args.path))
    _print_problems(list(problems), sys.stderr)
    errors = [p for p in problems if p.severity == "error"]
    if errors or config is None:
        print(
            f"{args.path}: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)",
            file=sys.stderr,
        )
        return EX_CONFIG
    print(f"{args.path}: ok ({len(config.sources)} source(s), {len(config.plugins)} plugin(s), "
          f"{len(config.rules)} rule(s), {len(config.actions)} action(s))")
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from flux_edge.errors import PluginLoadError
    from flux_edge.kinds import check_config
    from flux_edge.logs import setup_logging
    from flux_edge.runtime.daemon import Daemon

    config, problems = check_config(Path(args.config))
    _print_problems(list(problems), sys.stderr)
    if config is None or any(p.severity == "error" for p in problems):
        return EX_CONFIG
    # precedence: --log, then $FLUX_EDGE_LOG, then daemon.log_level from the file
    setup_logging(args.log or os.environ.get("FLUX_EDGE_LOG") or config.daemon.log_level)
    try:
        asyncio.run(Daemon(config, serve_metrics=True).run())
    except ConfigError:
        raise
    except (FluxError, OSError, MemoryError) as exc:
        if transient(exc):  # out of memory, a full disk: a restart may well succeed
            _err(f"{exc or type(exc).__name__} (a transient failure: exit {EX_TEMPFAIL}, "
                 "for systemd to restart the service)")
            return EX_TEMPFAIL
        if isinstance(exc, PluginLoadError):  # a restart cannot fix a broken .wasm
            _err(f"{exc}; fix the plugin or the config, then restart")
            return EX_CONFIG
        raise
    return EX_OK


# errnos that say "not now" rather than "never": restarting later may well succeed
_TRANSIENT_ERRNOS = frozenset({
    errno.ENOMEM, errno.EAGAIN, errno.ENOSPC, errno.EIO, errno.EMFILE, errno.ENFILE,
    errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.EADDRINUSE, errno.EROFS, errno.EDQUOT,
})
_TRANSIENT_TEXTS = ("cannot allocate memory", "out of memory", "resource temporarily unavailable",
                    "no space left on device", "failed to allocate", "mmap failed")


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failure of the moment: no memory, no disk, too
    many files, a busy resource. Such a failure at start-up exits ``EX_TEMPFAIL`` (75), which
    systemd restarts; 78 is only for what a restart cannot fix (RestartPreventExitStatus=78)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, MemoryError):
            return True
        if isinstance(cur, OSError) and cur.errno in _TRANSIENT_ERRNOS:
            return True
        if any(t in str(cur).lower() for t in _TRANSIENT_TEXTS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def cmd_demo(args: argparse.Namespace) -> int:
    from flux_edge.demo import run_demo
    from flux_edge.logs import setup_logging

    setup_logging(args.log or "warn")
    return run_demo(args.seconds, args.port, sys.stdout)


def cmd_plugin_new(args: argparse.Namespace) -> int:
    from flux_edge.plugins.tooling import new_plugin

    path = new_plugin(args.name, args.lang, Path(args.dir))
    print(f"created {path}; build it with: flux-edge plugin build {path}")
    return EX_OK


def cmd_plugin_build(args: argparse.Namespace) -> int:
    from flux_edge.plugins.tooling import build_plugin

    out = build_plugin(Path(args.dir), Path(args.out) if args.out else None)
    print(out)
    return EX_OK


def cmd_plugin_run(args: argparse.Namespace) -> int:
    from flux_edge.logs import setup_logging
    from flux_edge.plugins.run import run_plugin_cli

    setup_logging(args.log or "warn")
    return run_plugin_cli(
        Path(args.wasm),
        Path(args.config) if args.config else None,
        sys.stdin,
        sys.stdout,
        sys.stderr,
        batch=args.batch,
        wasi=args.wasi,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flux-edge",
        description="Edge gateway: read devices, normalize with Wasm plugins, evaluate rules, act.",
    )
    p.add_argument("--version", action="version", version=f"flux-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon from a TOML config")
    add_config_argument(run)
    run.add_argument("--log", help="log filter, e.g. 'info,plugin.modbus_decode=trace' "
                     "(default: $FLUX_EDGE_LOG or info)")
    run.set_defaults(func=cmd_run)

    chk = sub.add_parser("check-config", help="validate a config; exit 0 if valid, 78 if not")
    add_config_argument(chk)
    chk.set_defaults(func=cmd_check_config)

    demo = sub.add_parser("demo", help="run the pipeline against a simulated boiler")
    demo.add_argument("--seconds", type=float, default=None, help="stop after N seconds")
    demo.add_argument("--port", type=int, default=15020, help="simulator port (default 15020)")
    demo.add_argument("--log", help="log filter (default: warn)")
    demo.set_defaults(func=cmd_demo)

    from flux_edge.actions.audit_cli import add_audit_parser

    add_audit_parser(sub)
    from flux_edge.state.cli import add_state_parser

    add_state_parser(sub)
    from flux_edge.rules.replay_cli import add_rules_parser

    add_rules_parser(sub)

    plugin = sub.add_parser("plugin", help="create, build, try and list Wasm plugins")
    psub = plugin.add_subparsers(dest="plugin_command", required=True, metavar="SUBCOMMAND")
    new = psub.add_parser("new", help="scaffold a plugin folder")
    new.add_argument("name")
    new.add_argument("--lang", choices=["rust", "c"], default="rust")
    new.add_argument("--dir", default=".", help="parent directory (default: .)")
    new.set_defaults(func=cmd_plugin_new)
    build = psub.add_parser("build", help="build a plugin folder to .wasm")
    build.add_argument("dir")
    build.add_argument("--out", "-o", help="output .wasm path (default: DIR/NAME.wasm)")
    build.set_defaults(func=cmd_plugin_build)
    prun = psub.add_parser(
        "run", help="feed JSON Lines from stdin through a plugin, one JSON line out per result"
    )
    prun.add_argument("wasm")
    prun.add_argument("--config", help="plugin config (JSON or TOML object)")
    prun.add_argument("--batch", type=int, default=64, help="messages per plugin call")
    prun.add_argument("--wasi", action="store_true",
                      help="grant WASI (no preopened dirs, env or args), as `wasi = true` does")
    prun.add_argument("--log", help="log filter (default: warn)")
    prun.set_defaults(func=cmd_plugin_run)
    from flux_edge.commission import add_test_parser
    from flux_edge.console.cli import add_console_parser, add_status_parser

    add_status_parser(sub, add_config_argument)
    add_test_parser(sub, add_config_argument)
    add_console_parser(sub, add_config_argument)
    from flux_edge.plugins.catalog import add_catalog_parsers

    add_catalog_parsers(psub)
    return p


def main(argv: list[str] | None = None, *, signals_held: bool = False) -> int:
    """``signals_held``: SIGHUP/SIGTERM/SIGINT were blocked by ``__main__`` (the command line):
    every command but ``run`` lets them through at once; ``run`` once its handlers are in place
    (runtime/signals.py)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _resolve_config(args, parser)
    except SystemExit:
        if signals_held:
            from flux_edge.runtime.signals import unblock

            unblock()
        raise
    if signals_held and args.func is not cmd_run:
        from flux_edge.runtime.signals import unblock

        unblock()
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as exc:
        _print_problems(list(exc.problems), sys.stderr)
        return EX_CONFIG
    except FluxError as exc:
        _err(str(exc))
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    except MemoryError:
        _err(f"out of memory (exit {EX_TEMPFAIL})")
        return EX_TEMPFAIL
    except OSError as exc:
        _err(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return EX_TEMPFAIL if transient(exc) else EX_FAIL
    except BrokenPipeError:
        return EX_FAIL


if __name__ == "__main__":
    raise SystemExit(main())
