"""The embedded broker keeps a QoS 1 message for a persistent session until the client
acknowledges it: past amqtt's old 5 s limit, and across a connection that ended first, the
message is sent again on the next connection with the same packet id and DUP set
(MQTT 3.1.1 [MQTT-4.4.0-1]). A device stalled with its `register.reply` on the way gets it."""

from __future__ import annotations

import socket
import struct
import subprocess
import time

from homenet.brokers import Embedded


def _packet(kind: int, body: bytes) -> bytes:
    length, encoded = len(body), b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            return bytes([kind]) + encoded + body


def _string(text: str) -> bytes:
    return struct.pack("!H", len(text)) + text.encode()


class RawClient:
    """An MQTT 3.1.1 client that sends only what the test says: no PUBACK unless asked."""

    def __init__(self, port: int, client_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        # CONNECT: protocol MQTT level 4, clean session 0, keepalive 60 s
        self.sock.sendall(_packet(0x10, _string("MQTT") + bytes([4, 0x00]) + struct.pack("!H", 60) + _string(client_id)))
        kind, body = self.read()
        assert kind == 0x20 and body[1] == 0, (kind, body)
        self.session_present = bool(body[0] & 1)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def read(self) -> tuple[int, bytes]:
        kind = self._exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exact(1)[0]
            length += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return kind, self._exact(length)

    def subscribe(self, topic: str) -> None:
        self.sock.sendall(_packet(0x82, struct.pack("!H", 1) + _string(topic) + bytes([1])))
        kind, _ = self.read()
        assert kind == 0x90

    def publish_received(self) -> tuple[bool, int, bytes]:
        """(DUP, packet id, payload) of the next PUBLISH."""
        while True:
            kind, body = self.read()
            if kind & 0xF0 == 0x30:
                (topic_len,) = struct.unpack("!H", body[:2])
                (packet_id,) = struct.unpack("!H", body[2 + topic_len:4 + topic_len])
                return bool(kind & 0x08), packet_id, body[4 + topic_len:]

    def puback(self, packet_id: int) -> None:
        self.sock.sendall(_packet(0x40, struct.pack("!H", packet_id)))

    def close(self) -> None:
        self.sock.close()


def test_an_unacknowledged_qos1_message_is_sent_again_on_the_next_connection(mosquitto_pub: str) -> None:
    broker = Embedded()
    broker.start()
    try:
        device = RawClient(broker.port, "stalled-1")
        device.subscribe("t/reply")
        subprocess.run([mosquitto_pub, "-p", str(broker.port), "-t", "t/reply", "-q", "1", "-m", "the reply"],
                       check=True, timeout=10)
        dup, packet_id, payload = device.publish_received()
        assert (dup, payload) == (False, b"the reply")
        time.sleep(6)  # stalled past amqtt's old 5 s PUBACK limit, then the link fails
        device.close()
        time.sleep(0.5)

        again = RawClient(broker.port, "stalled-1")
        assert again.session_present
        assert again.publish_received() == (True, packet_id, b"the reply")
        again.puback(packet_id)
        again.close()
        time.sleep(0.5)

        # acknowledged: not in flight any more, so the next connection gets nothing
        third = RawClient(broker.port, "stalled-1")
        third.sock.settimeout(1.5)
        try:
            kind, body = third.read()
            raise AssertionError(f"unexpected packet {kind:#x} {body!r}")
        except TimeoutError:
            pass
        third.close()
    finally:
        broker.stop()
