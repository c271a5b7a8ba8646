"""Oversized MQTT PUBLISH packets taken out of the stream before they are buffered.

paho reads a whole packet into memory before any callback sees it, so a 150 MB
publish costs 150 MB of RSS (and on a 512 MB Pi, the OOM killer) before
`mqtt.max_payload` can refuse it. This cutter sits between the socket and paho, sans-IO:
bytes from the broker in, the bytes paho should see out, plus a `Cut` for every
PUBLISH whose remaining length exceeds the limit. Such a packet's bytes are dropped
as they arrive (memory stays O(limit) whatever the size); what is kept of it is only
what identifies it: the QoS, the packet id (to acknowledge it, so the broker does not
redeliver it forever) and the start of its topic (for the log).

MQTT 3.1.1 §2.2 (and MQTT 5 §2.1): a fixed header is one type byte, then the remaining
length as 1 to 4 bytes of 7-bit groups, least significant first. A PUBLISH's variable
header starts with the topic (a 2-byte length, then the bytes), then the packet id
when QoS > 0. MQTT 5 brokers are also told our Maximum Packet Size, and should never
send such a packet; 3.1.1 has no way to say it, so this is the guard for both.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLISH = 3
TOPIC_KEPT = 256  # bytes of the topic kept for the log line


@dataclass(frozen=True, slots=True)
class Cut:
    qos: int
    mid: int | None  # None for QoS 0 (nothing to acknowledge)
    topic: bytes  # at most TOPIC_KEPT bytes of it
    size: int  # the packet's remaining length
    payload: int  # the payload's length, as far as MQTT 3.1.1's layout tells


class ProtocolError(ValueError):
    """The broker's stream is not MQTT framing (a 5th remaining-length byte)."""


class Cutter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._header = bytearray()  # a fixed header not yet complete
        self._pass = 0  # bytes of the current packet still to pass on
        self._skip = 0  # bytes of the current (cut) packet still to drop
        self._cut_type = 0  # the cut packet's first byte
        self._cut_size = 0
        self._var = bytearray()  # the cut packet's variable header, as far as needed

    def feed(self, data: bytes) -> tuple[bytes, list[Cut]]:
        """Bytes from the broker → (bytes for paho, the packets cut out of them)."""
        if not self._skip and not self._header and self._pass >= len(data):
            self._pass -= len(data)  # the common case: inside a packet paho gets whole
            return data, []
        out = bytearray()
        cuts: list[Cut] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._pass:
                n = min(self._pass, len(view) - pos)
                out += view[pos : pos + n]
                self._pass -= n
                pos += n
            elif self._skip:
                n = min(self._skip, len(view) - pos)
                self._keep_var(view[pos : pos + n])
                self._skip -= n
                pos += n
                if not self._skip:
                    cuts.append(self._finish_cut())
            else:
                self._header.append(view[pos])
                pos += 1
                length = self._length()
                if length is None:
                    continue
                header, self._header = bytes(self._header), bytearray()
                if header[0] >> 4 == PUBLISH and length > self.limit:
                    self._skip, self._cut_type, self._cut_size = length, header[0], length
                    self._var = bytearray()
                else:
                    out += header
                    self._pass = length
        return bytes(out), cuts

    def _length(self) -> int | None:
        """The remaining length once the fixed header is complete, else None."""
        digits = self._header[1:]
        if not digits or digits[-1] & 0x80:
            if len(digits) >= 4:
                raise ProtocolError("an MQTT remaining length of more than 4 bytes")
            return None
        return sum((b & 0x7F) << (7 * i) for i, b in enumerate(digits))

    def _keep_var(self, chunk: memoryview) -> None:
        # Topic length (2) + topic (up to 65,535) + packet id (2): at most 65,539 bytes.
        while chunk:
            need = 4 if len(self._var) < 2 else 4 + int.from_bytes(self._var[:2], "big")
            if len(self._var) >= need:
                return
            take = chunk[: need - len(self._var)]
            self._var += take
            chunk = chunk[len(take) :]

    def _finish_cut(self) -> Cut:
        qos = (self._cut_type >> 1) & 0x03
        var = bytes(self._var)
        self._var = bytearray()
        topic_len = int.from_bytes(var[:2], "big") if len(var) >= 2 else 0
        topic = var[2 : 2 + min(topic_len, TOPIC_KEPT)]
        mid = None
        if qos and len(var) >= 2 + topic_len + 2:
            mid = int.from_bytes(var[2 + topic_len : 4 + topic_len], "big")
        payload = self._cut_size - 2 - topic_len - (2 if qos else 0)
        return Cut(qos, mid, topic, self._cut_size, payload)
