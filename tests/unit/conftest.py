"""Fixtures shared by the unit tests of the plugin host (test_host.py, test_host_act.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flux_edge.plugins.host import PluginHost
from tests.support import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def host(clock: FakeClock) -> Iterator[PluginHost]:
    with PluginHost(None, clock=clock) as h:
        yield h
