"""Stage 1: devices -> ``Reading``.

Each protocol lives in its own module, the only one importing its library (``modbus.py`` is the
only pymodbus import). Nothing is imported here, so a config that uses no Modbus source never
pays for importing pymodbus.
"""
