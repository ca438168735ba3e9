"""The durable MQTT uplink: measurements to an upstream broker through a SQLite outbox.

``Uplink`` (sender.py) is what the pipeline and the daemon use; ``Outbox`` (outbox.py) is the
file underneath. See both modules' docstrings for the guarantees.
"""

from flux_edge.uplink.outbox import ROW_OVERHEAD, Outbox, UplinkStats
from flux_edge.uplink.sender import Uplink

__all__ = ["ROW_OVERHEAD", "Outbox", "Uplink", "UplinkStats"]
