"""Test doubles of real parts that pymodbus and the OS do not provide ready-made (a baud-accurate
RS-485 line on ptys, Modbus RTU slaves). Used by tests/integration and bench/."""
