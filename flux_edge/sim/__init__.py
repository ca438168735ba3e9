"""Simulated devices for tests, benchmarks and the demo: never imported by production modules.

- ``modbus_server``: ``SimulatedModbusServer``, a real Modbus TCP server (pymodbus) whose tables
  Python reads and writes directly;
- ``modbus_link``: ``SimulatedModbusLink``, in-process Modbus devices behind the poller's link
  seam (no sockets, no pymodbus), on the poller's clock.
"""
