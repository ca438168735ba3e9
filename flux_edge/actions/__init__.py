"""Stage 4: ``Command`` -> side effect on a device -> ``Outcome``.

An executor never raises for a failed action: the failure is the ``Outcome`` (``ok=False`` with
the reason in ``error``), so the audit trail sees every attempt.

Each action kind is declared in one module (``modbus_write_kind.py``, ``serial_write_kind.py``,
``mqtt_publish_kind.py``, ``wasm_kind.py``): its config struct, its checks and its factory, an
``ActionFactory`` that the pipeline calls with the entry's name, its struct and an
``ActionEnv``. Checks that span actions (actuators) are in ``checks.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from flux_edge.model import Command, Outcome


class Executor(Protocol):
    async def execute(self, cmd: Command) -> Outcome: ...


class ActionEnv(Protocol):
    """What the pipeline offers an action kind's factory."""

    clock: Callable[[], float]  # wall clock for outcomes and audit records

    def source(self, name: str) -> Any:
        """The running source object of source ``name`` (the kind checked its type)."""

    def executor(self, name: str) -> Executor | None:
        """The executor of action ``name``, if built already (``builds_late`` kinds come last)."""

    def load_plugin(self, action: str, cfg: Any) -> Any:
        """Load and initialise the plugin instance action ``action`` needs (a ``Plugin``)."""

    def offload(self, call: Callable[[], Any]) -> Awaitable[Any]:
        """Run ``call`` (a plugin call: user code) where it cannot block the event loop."""


class ActionFactory(Protocol):
    """An action kind's factory: ``(name, cfg, env) -> Executor``; raises ``ActionError``."""

    def __call__(self, name: str, cfg: Any, env: ActionEnv) -> Executor: ...
