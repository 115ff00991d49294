"""MQTT 3.1.1 packets built by hand, for attacks paho and mosquitto_pub will not send (a
connection held open and dead, a 10 kB client id, many CONNECT variants at once)."""

from __future__ import annotations

import socket
import struct


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _length(len(body)) + body


def connect(client_id: str, *, clean: bool = True, keepalive: int = 60, will: tuple[str, bytes, bool] | None = None,
            login: tuple[str, str] | None = None) -> bytes:
    """A CONNECT; `will` is (topic, payload, retain)."""
    flags = (0x02 if clean else 0) | (0x04 | (0x20 if will[2] else 0) | 0x08 if will else 0)
    if login:
        flags |= 0xC0
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _string(client_id)
    if will:
        body += _string(will[0]) + _string(will[1])
    if login:
        body += _string(login[0]) + _string(login[1])
    return packet(0x10, body)


def subscribe(topic: str, packet_id: int = 1, qos: int = 1) -> bytes:
    return packet(0x82, struct.pack("!H", packet_id) + _string(topic) + bytes([qos]))


def publish_header(topic: str, payload_length: int) -> bytes:
    """The start of a QoS 0 PUBLISH announcing `payload_length` bytes of payload."""
    variable = _string(topic)
    return bytes([0x30]) + _length(len(variable) + payload_length) + variable


def open_connection(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connack(sock: socket.socket) -> int | None:
    """The CONNACK return code (0 accepted, 5 not authorised ...), None if the broker closed."""
    data = b""
    try:
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                return None
            data += chunk
    except (ConnectionResetError, socket.timeout):
        return None
    return data[3] if data[0] == 0x20 else None


def try_connect(port: int, connect_packet: bytes) -> int | None:
    """CONNECT, read the CONNACK, close."""
    with open_connection(port) as sock:
        sock.sendall(connect_packet)
        return connack(sock)
