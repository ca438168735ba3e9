"""Stage 2: Reading -> Measurements through sandboxed WebAssembly plugins.

- ``abi.py``: the ABI v1 wire format (docs/plugin-abi.md), pure Python.
- ``host.py``: the only wasmtime import: engine, module cache, limits, recycling, quarantine.
- ``run.py``: ``flux-edge plugin run``: JSON Lines through one plugin, for plugin authors.

Import the submodules directly; this package imports nothing so that ``abi`` stays cheap.
"""
