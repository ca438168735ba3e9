"""The kinds and domains this build knows, and the config entry points bound to them.

The composition root of the config loader: ``flux_edge.config`` is the mechanism (schema,
positions, the walk, the passes) and names no domain; each domain declares what it adds beside
its own code. This module finds them by a naming rule, so that a new kind is one module:

- a **kind module** is a module named ``kind`` or ``*_kind`` in ``flux_edge.sources`` or
  ``flux_edge.actions`` (or a package below them); it defines ``KIND`` or ``KINDS``
  (``flux_edge.config.kinds.Kind``);
- a **domain module** is a module named ``checks`` in those packages or in ``flux_edge.plugins``,
  ``flux_edge.rules``, ``flux_edge.uplink`` or ``flux_edge.console`` that defines ``DOMAIN``
  (``flux_edge.config.kinds.Domain``).

Kind modules import nothing heavy: their factories import the protocol code (pymodbus, pyserial,
paho) when a config uses it.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import flux_edge.actions
import flux_edge.console
import flux_edge.plugins
import flux_edge.rules
import flux_edge.sources
import flux_edge.uplink
from flux_edge.config import Config
from flux_edge.config.kinds import Domain, Kind, Kinds, Registry
from flux_edge.config.load import check_config as _check_config
from flux_edge.config.load import check_config_text as _check_config_text
from flux_edge.config.load import load_config as _load_config
from flux_edge.config.load import load_config_text as _load_config_text
from flux_edge.errors import Problem

_KIND_PACKAGES: tuple[ModuleType, ...] = (flux_edge.sources, flux_edge.actions)
_DOMAIN_PACKAGES: tuple[ModuleType, ...] = (
    *_KIND_PACKAGES, flux_edge.plugins, flux_edge.rules, flux_edge.uplink, flux_edge.console
)


def _modules(packages: tuple[ModuleType, ...], wanted: str) -> list[ModuleType]:
    found = []
    for package in packages:
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            last = info.name.rsplit(".", 1)[-1]
            is_kind = last == "kind" or last.endswith("_kind")
            if (wanted == "kind" and is_kind) or (wanted == "checks" and last == "checks"):
                found.append(importlib.import_module(info.name))
    return sorted(found, key=lambda m: m.__name__)


def discover() -> Kinds:
    """Every kind and domain of this build, found by the naming rule (module docstring)."""
    kinds: list[Kind] = []
    for module in _modules(_KIND_PACKAGES, "kind"):
        declared = getattr(module, "KINDS", None) or (getattr(module, "KIND", None),)
        for kind in declared:
            if not isinstance(kind, Kind):
                raise TypeError(f"{module.__name__}: KIND/KINDS must hold config.kinds.Kind")
            kinds.append(kind)
    domains = [
        m.DOMAIN for m in _modules(_DOMAIN_PACKAGES, "checks") if isinstance(
            getattr(m, "DOMAIN", None), Domain
        )
    ]
    return Kinds(
        sources=Registry("sources", [k for k in kinds if k.section == "sources"]),
        actions=Registry("actions", [k for k in kinds if k.section == "actions"]),
        domains=tuple(domains),
    )


KINDS = discover()


def check_config(path: str | Path) -> tuple[Config | None, list[Problem]]:
    """Load and check a configuration file; never raises for a bad file.

    Returns ``(config, problems)``: every problem found, errors and warnings (``Problem.severity``),
    sorted by position. ``config`` is ``None`` when there is any error. ``flux-edge check-config``
    prints the problems and exits 0 without errors, 78 with.
    """
    return _check_config(path, KINDS)


def check_config_text(text: str, path: str = "<string>") -> tuple[Config | None, list[Problem]]:
    """Like ``check_config`` for text in memory. ``path`` names it in problems; unless it is
    ``"<...>"`` it also sets ``Config.path`` (so relative plugin paths resolve next to it)."""
    return _check_config_text(text, KINDS, path)


def load_config(path: str | Path) -> Config:
    """Load a configuration file. Raises ``ConfigError`` holding every error; warnings are logged
    (use ``check_config`` to get them)."""
    return _load_config(path, KINDS)


def load_config_text(text: str, path: str = "<string>") -> Config:
    """Load configuration text (``path`` as in ``check_config_text``). Raises ``ConfigError``."""
    return _load_config_text(text, KINDS, path)
