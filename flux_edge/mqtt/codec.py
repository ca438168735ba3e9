"""The inbound fast path's decoders (PUBLISH, and the PUBACK of a message we published): bytes in,
one packet out. Pure: no paho, no I/O.

paho decodes every incoming packet itself, MQTT 5 ``Properties`` objects included, at ~100 us
of CPU per message; :func:`decode_publish` takes a QoS 0/1 PUBLISH apart in ~5 us. The client
adapter (:mod:`flux_edge.mqtt.client`) calls it on the bytes it has buffered from the socket
while paho is between packets, and leaves everything else to paho: QoS 2 (paho keeps its
PUBREC/PUBREL state), every other packet type, a packet not yet complete, and a malformed one
(paho reports it).

:func:`decode_puback` takes only a PUBACK that reports success: 2 bytes (the packet identifier),
or in MQTT 5 a reason code below 0x80 with no properties. A PUBACK that carries a failure
reason or properties (a Reason String) is left to paho, which hands both to on_publish.

Topic aliases (MQTT 5) are not resolved: the client announces no Topic Alias Maximum, so the
broker sends none. The MQTT 5 properties of a PUBLISH are skipped, not read.
"""

from __future__ import annotations

PublishPacket = tuple[str, bytes, int, bool, int, int]
"""``(topic, payload, qos, retain, mid, end)``: ``end`` is the offset just past the packet;
``mid`` is 0 for QoS 0; ``topic`` is "" when it is not valid UTF-8."""


def decode_publish(buf: bytes, pos: int, v5: bool) -> PublishPacket | None:
    """The QoS 0/1 PUBLISH packet that starts at ``buf[pos]`` (``pos < len(buf)``), or None when
    the bytes there are anything else: another packet type, QoS 2, an incomplete packet (more
    bytes are needed) or a malformed one. ``v5``: MQTT 5 framing (a properties block follows
    the packet identifier)."""
    end = len(buf)
    b0 = buf[pos]
    if b0 & 0xF0 != 0x30 or (b0 >> 1) & 3 == 2 or (b0 >> 1) & 3 == 3:
        return None
    # remaining length: 1-4 bytes, 7 bits each
    length, shift, i = 0, 0, pos + 1
    while True:
        if i >= end or i - pos > 4:
            length = -1
            break
        byte = buf[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            break
        shift += 7
    if length < 0 or i + length > end:
        return None  # incomplete: paho (or the next read) completes it
    stop = i + length
    qos = (b0 >> 1) & 3
    tlen = (buf[i] << 8) | buf[i + 1]
    t0 = i + 2
    body = t0 + tlen
    mid = 0
    if qos:
        mid = (buf[body] << 8) | buf[body + 1]
        body += 2
    if v5:  # skip the properties
        plen, shift = 0, 0
        while True:
            byte = buf[body]
            body += 1
            plen |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        body += plen
    if body > stop:
        return None  # malformed: let paho report it
    try:
        topic = buf[t0:t0 + tlen].decode("utf-8")
    except UnicodeDecodeError:
        topic = ""
    return topic, buf[body:stop], qos, bool(b0 & 1), mid, stop


def decode_puback(buf: bytes, pos: int, v5: bool) -> tuple[int, int, int] | None:
    """The PUBACK that starts at ``buf[pos]``, if it reports success: ``(mid, reason, end)``,
    ``reason`` 0 or (MQTT 5) another code below 0x80 such as 0x10 "no matching subscribers",
    ``end`` just past the packet. None for anything else: another packet, an incomplete one,
    a failure reason (0x80 and up), properties, a length MQTT 3.1.1 does not allow. ``v5``:
    MQTT 5 framing."""
    if buf[pos] != 0x40:
        return None
    i = pos + 2
    if i > len(buf):
        return None
    n = buf[pos + 1]
    stop = i + n
    if stop > len(buf):
        return None
    reason = 0
    if n != 2:  # MQTT 5 only: a reason code (3 bytes), and a properties length (4)
        if not v5 or n > 4 or n < 2 or (n == 4 and buf[i + 3] != 0):
            return None
        reason = buf[i + 2]
        if reason >= 0x80:
            return None
    return (buf[i] << 8) | buf[i + 1], reason, stop
