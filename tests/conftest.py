"""Shared test helpers. Tests start the real parts they need and stop them."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "flux_edge" / "plugins" / "bundled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def port() -> int:
    return free_port()


def bundled_wasm(name: str) -> Path:
    """A plugin built by tools/setup.sh (plugins/build-all.sh). In CI setup always runs first, so
    a missing file is a failure, not a skip."""
    path = BUNDLED / f"{name}.wasm"
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing: plugins/build-all.sh did not build it")
        pytest.skip(f"{path} not built: run plugins/build-all.sh")
    return path


@pytest.fixture
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


PYTHON = sys.executable


@pytest.fixture(autouse=True)
def _no_leftover_log_handlers() -> Iterator[None]:
    """A test that runs flux_edge.logs.setup_logging in this process (a CLI entry point called
    in-process) leaves a StreamHandler on the root logger, writing to the stream pytest
    captured for that test and closes afterwards: every later log record then prints a
    "Logging error" traceback. The handlers a test adds that way, and the root level, are
    undone after it."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in before and type(h) is logging.StreamHandler:
            root.removeHandler(h)
    root.setLevel(level)


_NOTES = pytest.StashKey[list[str]]()


@pytest.fixture
def summary_note(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``summary_note(text)``: a line for the end of the run's output (where a passing test's
    own output is not shown), e.g. how long each phase of an image test took: CI's record of
    where its time goes."""
    notes = request.config.stash.setdefault(_NOTES, [])
    return lambda text: notes.append(f"{request.node.nodeid}: {text}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    notes = config.stash.get(_NOTES, [])
    if notes:
        terminalreporter.section("phase timings")
        for line in notes:
            terminalreporter.write_line(line)


_LAST = ("tests/system/test_ab_update.py", "tests/system/test_image_boot.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The image tests run last, the A/B update before the arm64 boot. The arm64 build, started
    in the background at collection (below), takes longer than every other test together: the
    A/B update's own amd64 build and bundles run beside its end, and the A/B test then waits for
    it (image_support.settle_background_builds) so that its QEMU boots, and the arm64 boot
    after them, have both cores to themselves."""
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return _LAST.index(path) + 1 if path in _LAST else 0

    items.sort(key=rank)  # stable: the order within each group is kept


def pytest_collection_finish(session: pytest.Session) -> None:
    """When the arm64 image test is selected, start its build now, in the background: under
    qemu-user it is the longest step of the suite and it runs on the second core while the
    tests before it run on the first (tests/system/image_support.py)."""
    if session.config.option.collectonly:
        return
    wanted = "test_image_boot.py::test_image_boots_to_ready_flux_edge[arm64]"
    if not any(item.nodeid.endswith(wanted) for item in session.items):
        return
    from tests.system import image_support

    if not image_support.missing("arm64"):
        image_support.start_build("arm64", background=True)

