"""The naive baseline of bench/mqtt_pipeline.py: the same job as the daemon in one paho callback.

    .venv/bin/python bench/naive_mqtt.py --in-port P --up-port P2 [--qos 0|1]

Subscribes to site/+/telemetry on the devices' broker; for each message: json.loads, and if
temp > 80 publish {"device": ..., "temp": ...} on site/<device>/cmd; then publish the message as
it came on up/naive/<device> to the upstream broker. The subscription, the command and the
upstream publish all use --qos. No plugins, no rules engine, no outbox: what a quick script
would do. Two paho clients with paho's defaults (MQTT 3.1.1, in-flight window 20): the
devices' broker served by loop_forever() in the main thread (the callback runs there), the
upstream broker by paho's own network thread (loop_start). Prints "ready" once subscribed and
connected upstream; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--in-port", type=int, required=True)
    p.add_argument("--up-port", type=int, required=True)
    p.add_argument("--qos", type=int, choices=(0, 1), default=0)
    args = p.parse_args()
    qos = args.qos
    up_ready = threading.Event()

    up = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="naive-up")
    up.on_connect = lambda c, u, f, rc, props: up_ready.set()
    up.connect(args.host, args.up_port)
    up.loop_start()
    up_ready.wait(10)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[1]
        data = json.loads(msg.payload)
        if data["temp"] > 80:
            cmd = json.dumps({"device": device, "temp": data["temp"]})
            client.publish(f"site/{device}/cmd", cmd, qos)
        up.publish(f"up/naive/{device}", msg.payload, qos)

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe("site/+/telemetry", qos)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        print("ready", flush=True)

    inbound = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="naive-in")
    inbound.on_connect = on_connect
    inbound.on_subscribe = on_subscribe
    inbound.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *a: inbound.disconnect())
    inbound.connect(args.host, args.in_port)
    inbound.loop_forever()
    up.disconnect()
    up.loop_stop()


if __name__ == "__main__":
    main()
