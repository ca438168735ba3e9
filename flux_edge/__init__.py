"""flux-edge: an edge appliance for Raspberry Pi IoT gateways."""

__version__ = "0.1.0"
