"""The one exception tree of flux-edge.

Every error carries context: where it happened (config key path, plugin name, source name, ...)
and, where we can tell, what the user should do about it. Third-party exceptions are caught in
the adapter modules and re-raised as one of these, chained with ``from``.
"""

from __future__ import annotations

from dataclasses import dataclass


class FluxError(Exception):
    """Base of every error flux-edge raises on purpose."""


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found in a configuration file.

    ``path`` is the key path (``sources.boiler.registers[2].type``); ``line``/``column`` are
    1-based positions in ``file`` when they can be determined, else 0.
    """

    file: str
    path: str
    message: str
    line: int = 0
    column: int = 0
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.severity}: {self.message}"


class ConfigError(FluxError):
    """The configuration is invalid. Holds every problem found, not only the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems) or "invalid configuration")


# --- stage 1: sources ---------------------------------------------------------------------------


class SourceError(FluxError):
    """A device could not be read or written (connection, timeout, exception response)."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        super().__init__(f"source {source!r}: {message}")


# --- stage 2: plugins ---------------------------------------------------------------------------


class PluginError(FluxError):
    """A Wasm plugin failed. Subclasses say how."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class PluginLoadError(PluginError):
    """The module could not be compiled, is missing an export, imports something not granted, or
    its init function refused the config."""


class PluginTrap(PluginError):
    """The guest trapped (unreachable, out-of-bounds access, stack overflow, ...)."""


class PluginTimeout(PluginError):
    """The call ran past its wall-time limit and was interrupted."""


class PluginABIError(PluginError):
    """The guest broke the ABI contract (bad pointer/length, malformed output, ...)."""


class PluginQuarantined(PluginError):
    """The plugin failed repeatedly and is not being called until its quarantine ends."""


# --- stage 3: rules -----------------------------------------------------------------------------


class RuleError(FluxError):
    """A rule condition failed to compile or evaluate.

    ``column`` is 1-based within the condition expression, 0 when unknown.
    """

    def __init__(self, rule: str, message: str, column: int = 0) -> None:
        self.rule = rule
        self.column = column
        super().__init__(f"rule {rule!r}: {message}")


# --- stage 4: actions ---------------------------------------------------------------------------


class ActionError(FluxError):
    """An action could not be carried out."""

    def __init__(self, action: str, message: str) -> None:
        self.action = action
        super().__init__(f"action {action!r}: {message}")


class ActionVerifyError(ActionError):
    """The device accepted a write but reads back a different value (``read``)."""

    read: bool | int | None = None


# --- uplink -------------------------------------------------------------------------------------


class UplinkError(FluxError):
    """The upstream broker could not be reached or refused us."""


# --- durable state ------------------------------------------------------------------------------


class StateError(FluxError):
    """A state file cannot be used as it is: written by a newer flux-edge, or it cannot be
    migrated or backed up. The message names the file, both versions and what to do."""
