# The first instruction: hold SIGHUP/SIGTERM/SIGINT until the daemon's handlers are installed
# (flux_edge/runtime/signals.py). Only the standard library's signal module is imported first.
import signal as _signal

_signal.pthread_sigmask(
    _signal.SIG_BLOCK, {_signal.SIGHUP, _signal.SIGTERM, _signal.SIGINT}
)


def main() -> int:
    """The ``flux-edge`` command (the console script points here, not at cli.main, so the
    signals are held before the command line module is imported)."""
    from flux_edge.cli import main as cli_main

    return cli_main(signals_held=True)


if __name__ == "__main__":
    raise SystemExit(main())
