"""One exception tree: every public exception class in flux_edge/ derives from FluxError.

Private control-flow exceptions (a leading underscore, raised and caught inside one module) are
left out; anything a caller may see has to be catchable as ``FluxError``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import flux_edge
from flux_edge.actions.templates import TemplateError
from flux_edge.errors import FluxError
from flux_edge.plugins.abi import BatchEncodeError


def _modules() -> list[ModuleType]:
    found = [flux_edge]
    for info in pkgutil.walk_packages(flux_edge.__path__, "flux_edge."):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI when imported
            continue
        found.append(importlib.import_module(info.name))
    return found


def test_every_public_exception_is_a_flux_error() -> None:
    outside: list[str] = []
    seen = 0
    for mod in _modules():
        for name, obj in vars(mod).items():
            if not (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            if obj.__module__ != mod.__name__ or name.startswith("_"):
                continue  # imported from elsewhere, or private to its module
            seen += 1
            if not issubclass(obj, FluxError):
                outside.append(f"{mod.__name__}.{name}")
    assert seen >= 10  # the walk found the tree (errors.py alone has more)
    assert outside == [], f"exceptions outside the FluxError tree: {outside}"


def test_former_value_errors_still_are_value_errors() -> None:
    # callers caught these as ValueError before they joined the tree
    assert issubclass(TemplateError, ValueError) and issubclass(BatchEncodeError, ValueError)
