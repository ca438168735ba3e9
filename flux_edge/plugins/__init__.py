"""Stage 2: Reading -> Measurements through sandboxed WebAssembly plugins.

- ``abi.py``: the ABI v1 wire format (docs/plugin-abi.md), pure Python.
- ``host.py``: ``PluginHost`` and ``Plugin``, the facade of the rest:
  ``ffi.py`` (the only wasmtime import: engine, modules, the low-level call path, guest memory),
  ``cache.py`` (compiled modules), ``logsink.py`` (the ``flux.log_*`` imports), ``instance.py``
  (one instance: limits, deadlines, calls, recycling), ``quarantine.py`` (failure counting).
- ``run.py``: ``flux-edge plugin run``: JSON Lines through one plugin, for plugin authors.

Import the submodules directly; this package imports nothing so that ``abi`` stays cheap.
"""
