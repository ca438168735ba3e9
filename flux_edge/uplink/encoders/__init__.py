"""Uplink encoders, one registry kind: ``[uplink.encoder] type = "..."``.

Each encoder is one module of this package defining ``KIND`` (``base.EncoderKind``: its tag,
config struct, factory and checks), found by ``registry()``, so a new encoder is one module, its
tests and a section of docs/northbound.md. ``base.py`` is the interface the sender drives.
Imports nothing here: checking a config loads the kinds' structs, not the MQTT client.
"""
