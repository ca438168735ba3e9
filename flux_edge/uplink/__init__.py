"""The durable MQTT uplink: measurements to an upstream broker through a SQLite outbox.

``Uplink`` (sender.py) is what the pipeline and the daemon use; ``Outbox`` (outbox.py) is the
file underneath; ``topics.py`` the topic templates (pure: config checks them with it). See each
module's docstring for the guarantees. This file imports nothing, so that checking a topic does
not load the MQTT client.
"""
