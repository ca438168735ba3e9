"""The start-up check of the paho internals the MQTT fast path relies on
(flux_edge.mqtt.paho_internals): it passes on the installed paho, names the version and what
changed when an internal is gone or behaves otherwise, and the client then falls back to paho's
own reading after one warning."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest

from flux_edge.errors import FluxError
from flux_edge.mqtt.client import MqttClient
from flux_edge.mqtt.paho_internals import (
    TESTED_PAHO,
    PahoCompatError,
    check_paho_internals,
    fast_path_usable,
    paho_version,
)


@pytest.fixture(autouse=True)
def fresh_check() -> Iterator[None]:
    """Each test sees the check run anew, and leaves no cached result behind."""
    fast_path_usable.cache_clear()
    yield
    fast_path_usable.cache_clear()


def test_the_installed_paho_passes() -> None:
    assert paho_version().startswith(TESTED_PAHO + ".")  # pyproject.toml pins this minor
    check_paho_internals()
    c = MqttClient("probe-ok", "127.0.0.1", 1)
    assert c.fast_path
    assert c._paho._sock_recv == c._buffered_recv


def drop_after_init(name: str) -> Callable[[pytest.MonkeyPatch], None]:
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        init = paho.Client.__init__

        def without(self: paho.Client, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            delattr(self, name)

        monkeypatch.setattr(paho.Client, "__init__", without)

    return patch


def no_sock_recv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(paho.Client, "_sock_recv")


def ack_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paho.Client, "ack", lambda self, mid, qos: 0)


def publish_not_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """paho's PUBACK step calls on_publish but keeps the message (a changed _do_on_publish)."""

    def keeps(self: paho.Client, mid: int, reason_code: Any, properties: Any) -> int:
        self.on_publish(self, None, mid, reason_code, properties)  # type: ignore[misc]
        return 0

    monkeypatch.setattr(paho.Client, "_do_on_publish", keeps)


def do_on_publish_renamed_args(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paho.Client, "_do_on_publish", lambda self, mid, rc, props: 0)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (publish_not_released, "Client._do_on_publish"),
        (do_on_publish_renamed_args, "Client._do_on_publish"),
        (drop_after_init("_out_messages"), "Client._out_messages"),
        (no_sock_recv, "Client._sock_recv"),
        (drop_after_init("_in_packet"), "Client._in_packet"),
        (drop_after_init("_last_bytes_received"), "Client._last_bytes_received"),
        (ack_sends_nothing, "Client.ack"),
    ],
)
def test_a_changed_internal_fails_with_the_version_and_what_changed(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[pytest.MonkeyPatch], None], named: str
) -> None:
    change(monkeypatch)
    with pytest.raises(PahoCompatError) as info:
        check_paho_internals()
    err = info.value
    assert isinstance(err, FluxError)
    assert err.version == paho_version()
    assert f"paho-mqtt {paho_version()} is installed" in str(err)
    assert any(named in p for p in err.problems), err.problems
    assert named in str(err)


def test_the_client_falls_back_to_paho_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(paho.Client, "_sock_recv")
    with caplog.at_level(logging.WARNING, logger="flux_edge.mqtt"):
        clients = [MqttClient(f"fallback-{i}", "127.0.0.1", 1) for i in range(3)]
    assert [c.fast_path for c in clients] == [False] * 3
    for c in clients:
        assert "_sock_recv" not in vars(c._paho)  # no hook installed: paho reads alone
        assert not c._buffered
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per process, not per client
    text = warnings[0].getMessage()
    assert f"paho-mqtt {paho_version()}" in text
    assert "Client._sock_recv" in text
    assert "Falling back to paho's own packet reading" in text
