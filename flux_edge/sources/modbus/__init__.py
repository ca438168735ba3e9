"""Modbus sources: TCP endpoints and RTU buses.

- ``poller``: ``ModbusBusPoller``, one per source (a TCP endpoint or an RTU bus) with all its
  devices: schedules, retries, backoff, fault isolation. It talks to links only (``link``).
- ``link``: the seam: ``ModbusLink`` (read, write a coil or a register, close), its error
  contract (``SourceError``, ``ModbusExceptionResponse``) and ``LinkFactory``.
- ``client``: the links over pymodbus, ``ModbusTcpClient`` and ``ModbusRtuClient``: the ONLY
  module of flux-edge that imports pymodbus.
- ``timing``: RTU timing: character times, the inter-frame gap, the precise timer.
- ``plan``: read planning: coalesced requests, per-point poll groups, RTU frame sizes.

Simulated devices (a pymodbus TCP server, an in-process link) are in ``flux_edge.sim``, never
imported by production code. Importing this package imports nothing: pymodbus is loaded only
when a poller builds its first real link.
"""
