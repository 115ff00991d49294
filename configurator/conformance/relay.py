"""A TCP relay between the agent under test and the broker: it reads each connection's MQTT
CONNECT (client id, username, clean session, will), notices a clean DISCONNECT, and can cut
every connection at once without a DISCONNECT, as a lost Wi-Fi link would (the broker then
publishes the agent's will).

It looks at the first packet of each connection and at the type of the last one the client
sent; everything else passes untouched.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

CONNECT, DISCONNECT = 0x10, 0xE0


@dataclass
class Connect:
    """What a client said in its CONNECT."""

    client_id: str
    username: str | None
    clean_session: bool
    will_topic: str | None
    will_payload: bytes | None
    will_retain: bool
    will_qos: int


@dataclass
class Session:
    connect: Connect | None = None
    disconnected_cleanly: bool = False
    closed: threading.Event = field(default_factory=threading.Event)


def _string(data: bytes, at: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from("!H", data, at)
    return data[at + 2: at + 2 + length], at + 2 + length


def _packet(data: bytes) -> tuple[int, bytes] | None:
    """(first byte, body) of the first whole MQTT packet in `data`, None while incomplete."""
    if len(data) < 2:
        return None
    length, shift, at = 0, 0, 1
    while True:
        if at >= len(data):
            return None
        byte = data[at]
        length |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            break
        shift += 7
    return (data[0], data[at: at + length]) if len(data) >= at + length else None


def parse_connect(body: bytes) -> Connect:
    """The fields of an MQTT 3.1.1 CONNECT body (variable header and payload)."""
    _name, at = _string(body, 0)
    flags = body[at + 1]
    at += 4  # level, flags, keep alive
    client_id, at = _string(body, at)
    will_topic = will_payload = None
    if flags & 0x04:
        topic, at = _string(body, at)
        will_payload, at = _string(body, at)
        will_topic = topic.decode("utf-8", "replace")
    username = None
    if flags & 0x80:
        name, at = _string(body, at)
        username = name.decode("utf-8", "replace")
    return Connect(client_id.decode("utf-8", "replace"), username, bool(flags & 0x02), will_topic, will_payload,
                   bool(flags & 0x20), (flags >> 3) & 0x03)


class Relay:
    """Listens on a free loopback port and forwards every connection to `upstream`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sessions: list[Session] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            session = Session()
            with self._lock:
                self.sessions.append(session)
                self._sockets += [client, broker]
            threading.Thread(target=self._pump, args=(client, broker, session, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, session, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, session: Session, from_client: bool) -> None:
        head = b""
        try:
            while data := source.recv(65536):
                if from_client:
                    if session.connect is None and len(head) < 65536:
                        head += data
                        packet = _packet(head)
                        if packet and packet[0] & 0xF0 == CONNECT:
                            session.connect = parse_connect(packet[1])
                    session.disconnected_cleanly = data[-2:] == bytes([DISCONNECT, 0])
                sink.sendall(data)
        except (OSError, struct.error, IndexError):
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            session.closed.set()

    def cut(self) -> int:
        """Close every connection now, with no DISCONNECT sent on the client's behalf; how many."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(sockets) // 2

    def mqtt_sessions(self) -> list[Session]:
        """Connections that sent a CONNECT (not the agent's bare TCP reachability checks)."""
        with self._lock:
            return [s for s in self.sessions if s.connect is not None]

    def close(self) -> None:
        self.server.close()
        self.cut()
