"""How the embedded broker admits a connection: authenticate first, then touch the session.

Theory of operation. amqtt 0.12.1 (`Broker._client_connected`) reads CONNECT, then wipes the
stored session of a clean-session client or copies the newcomer's will and credentials into
the stored one, registers the newcomer's handler in `_sessions`, and only then asks the auth
plugins. So a refused client had already deafened the device whose id it named, or replaced
its will (published later, on any topic); and a take-over let the old connection's end fire
its will and mark the shared session disconnected, leaving the new connection deaf
(docs/amqtt-notes.md). `AuthFirstConnect` replaces that path, in this order:

1. admit the TCP connection under the caps (broker/limits.py), or close it at once;
2. read CONNECT within `connect_timeout` through a reader that refuses any packet larger
   than `max_packet` before reading it; a silent or half-open connection is closed;
3. authenticate and authorize on the fresh session CONNECT made: refused, the client gets
   its CONNACK and the connection is closed; nothing stored was read or changed;
4. for one client id at a time: an earlier connection still open is ended without its will
   and awaited (its message loop finished, its session disconnected);
5. then amqtt's session step (clean: a new session; persistent: the stored one, with the
   newcomer's will) and the rest as amqtt does it.

A will fires only when the plugin allows it at that moment. An unknown device's session goes
when its connection does: it keeps nothing worth memory an attacker controls.
Written against amqtt 0.12.1 (pinned; tests/test_trust_boundary.py checks the version).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from homenet.acl import Role

from .limits import ConnectionLimits
from .reports import BrokerReports
from .routing import IndexedRouting

log = logging.getLogger(__name__)

TAKEOVER_WAIT = 5.0
"""Longest wait for an earlier connection of the same client id to end."""


class PacketTooLarge(Exception):
    """A packet over the broker's limit: the connection is closed before it is read."""


class BoundedReader(ReaderAdapter):
    """amqtt reads a packet's body in one `read(n)` once the fixed header gave its length:
    refusing a large `n` keeps the bytes unread (a 32 MiB PUBLISH cost 45-82 MiB before)."""

    def __init__(self, inner: ReaderAdapter, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.refused: int | None = None

    async def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.limit:
            self.refused = n
            raise PacketTooLarge(f"a packet of over {max(n, self.limit)} bytes")
        return await self.inner.read(n)

    def feed_eof(self) -> None:
        self.inner.feed_eof()


class KeepaliveHandler(BrokerProtocolHandler):
    """amqtt's broker handler ignores a read timeout, so a client that went silent without
    closing (power cut, a LAN renumbered) stayed connected until TCP gave up, hours later;
    here it is disconnected once its keepalive and a half have passed, and its will fires."""

    def handle_read_timeout(self) -> None:
        asyncio.ensure_future(self.handle_connection_closed())


class AuthFirstConnect(IndexedRouting):
    def __init__(self, config: dict[str, Any], *, limits: ConnectionLimits, connect_timeout: float,
                 max_packet: int) -> None:
        super().__init__(config)
        self.limits = limits
        self.connect_timeout = connect_timeout
        self.max_packet = max_packet
        self.reports = BrokerReports(self._publish_event)
        self._ended: dict[str, asyncio.Event] = {}
        """Per client id: set when its current connection has ended."""
        self._superseded: weakref.WeakSet[BrokerProtocolHandler] = weakref.WeakSet()
        self._admitting: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def _publish_event(self, payload: bytes) -> None:
        await self.internal_message_broadcast(self.topics.events, payload, qos=1)  # type: ignore[attr-defined]

    @property
    def auth(self) -> Any:
        return self.plugins_manager.get_plugin("HomenetAuthPlugin")

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        await self._client_connected(listener_name, StreamReaderAdapter(reader), StreamWriterAdapter(writer))

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        peer = writer.get_peer_info()
        source = peer[0] if peer else "?"
        refusal = self.limits.admit(source)
        if refusal is not None:
            self.reports.note("broker.limit", source, f"connection refused: {refusal}")
            await _close(writer, abort=True)
            return
        bounded = BoundedReader(reader, self.max_packet)
        client_id = None
        try:
            try:
                handler, session = await asyncio.wait_for(
                    KeepaliveHandler.init_from_connect(bounded, writer, self.plugins_manager),
                    self.connect_timeout)
            except asyncio.TimeoutError:
                log.debug("%s sent no CONNECT within %g s: closed", source, self.connect_timeout)
                return
            except (AMQTTError, MQTTError, NoDataError, PacketTooLarge, ConnectionError, UnicodeDecodeError) as exc:
                log.debug("%s: no valid CONNECT (%s): closed", source, exc)
                return
            client_id = session.client_id
            await self._serve(listener_name, bounded, writer, handler, session)
        finally:
            if bounded.refused is not None:
                self.reports.note("broker.too_large", source,
                                  f"connection closed: a packet of {bounded.refused} bytes is over the "
                                  f"{self.max_packet}-byte limit (not read)", sender=client_id)
            await _close(writer)
            self.limits.release(source)

    async def _serve(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter,
                     handler: BrokerProtocolHandler, incoming: Session) -> None:
        if not incoming.client_id:  # empty id, clean session (amqtt refused a persistent one)
            incoming.client_id = gen_client_id()
        if not await self._authenticate(incoming, self.listeners_config[listener_name]):
            incoming.parent = 0
            handler.attach(incoming, reader, writer)  # a handler of the refused session alone
            await handler.mqtt_connack_authorize(False)
            return
        client_id = incoming.client_id
        ended = asyncio.Event()
        lock = self._admitting.setdefault(client_id, asyncio.Lock())
        async with lock:
            await self._end_previous(client_id)
            session = await self._stored_or_new(incoming)
            session.transitions.connect()
            handler.attach(session, reader, writer)
            self._sessions[client_id] = (session, handler)
            self._ended[client_id] = ended
            try:
                await handler.mqtt_connack_authorize(True)
                await self.plugins_manager.fire_event(BrokerEvents.CLIENT_CONNECTED, client_id=client_id,
                                                      client_session=session)
                await handler.start()
            except BaseException:
                await self._end(session, handler, ended)
                raise
        try:
            await self._publish_session_retained_messages(session)
            for topic in self._subscriptions:  # a returning session's own filters only (server.py)
                await self._publish_retained_messages_for_subscription((topic, QOS_0), session)
            await self._client_message_loop(session, handler)
        finally:
            await self._end(session, handler, ended)

    async def _end(self, session: Session, handler: BrokerProtocolHandler, ended: asyncio.Event) -> None:
        """The connection is over: its session is disconnected (an unknown device's dropped),
        unless another connection holds the session by now."""
        client_id = session.client_id or ""
        if not self._holds(client_id, handler):
            await self._stop_handler(handler)
        elif session.transitions.is_connected():
            await self._stop_handler(handler)
            session.transitions.disconnect()
        if self._ended.get(client_id) is ended:
            del self._ended[client_id]
            if self.auth is not None and self.auth.role_of(client_id) == Role.UNKNOWN:
                await self._cleanup_session(client_id)
                self.auth.forget(client_id)
        ended.set()

    def _holds(self, client_id: str, handler: BrokerProtocolHandler) -> bool:
        """Whether `handler`'s connection is the one its session is attached to."""
        return self._sessions.get(client_id, (None, None))[1] is handler

    async def _end_previous(self, client_id: str) -> None:
        """Take-over: end the earlier connection of this client id, without its will, and wait
        until it has (else its end would disconnect the session the newcomer is given)."""
        ended = self._ended.get(client_id)
        previous = self._sessions.get(client_id)
        if ended is None or previous is None:
            return
        session, handler = previous
        log.info("client %s connected again: its earlier connection is closed without its will", client_id)
        self._superseded.add(handler)
        if isinstance(handler.writer, StreamWriterAdapter):
            handler.writer._writer.transport.abort()
        await handler.handle_connection_closed()
        try:
            await asyncio.wait_for(ended.wait(), TAKEOVER_WAIT)
        except asyncio.TimeoutError:
            log.warning("the earlier connection of %s did not end within %g s; its session is "
                        "handed over regardless", client_id, TAKEOVER_WAIT)
            if session.transitions.is_connected():
                session.transitions.disconnect()

    async def _stored_or_new(self, incoming: Session) -> Session:
        """amqtt's session step, now that the client is who it says it is. The keepalive gets
        the half again that MQTT allows before a silent client counts as gone [MQTT-3.1.2-24]."""
        client_id = incoming.client_id
        incoming.keep_alive += incoming.keep_alive // 2
        stored = self._sessions.get(client_id)
        if incoming.clean_session or stored is None:
            if stored is not None:
                await self._delete_session(client_id)
            incoming.parent = 0
            return incoming
        session = stored[0]
        for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                     "username", "password", "remote_address", "remote_port", "ssl_object"):
            setattr(session, attr, getattr(incoming, attr))
        session.parent = 1
        return session

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        """amqtt's, with the will left out when the connection was taken over, or when the
        client may not publish it now; a connection whose session another holds by now (a
        take-over that did not wait it out) leaves that session alone."""
        if not self._holds(client_session.client_id or "", handler):
            await self._stop_handler(handler)
            return
        if client_session.will_flag:
            superseded = handler in self._superseded
            if superseded or (self.auth is not None and not self.auth.will_allowed(client_session)):
                if not superseded:
                    self.reports.note("auth.denied", client_session.client_id or "?",
                                      f"will on {client_session.will_topic} not published: not allowed",
                                      sender=client_session.client_id, topic=client_session.will_topic)
                client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)


async def _close(writer: WriterAdapter, abort: bool = False) -> None:
    """Close the connection whatever state it is in (a peer gone before CONNECT left its socket
    in CLOSE_WAIT for ever: amqtt never closed it)."""
    if isinstance(writer, StreamWriterAdapter):
        if abort or writer._writer.transport.is_closing():
            writer.is_closed = True
            writer._writer.transport.abort()
            return
    try:
        await asyncio.wait_for(writer.close(), 1.0)
    except (OSError, asyncio.TimeoutError, RuntimeError):
        if isinstance(writer, StreamWriterAdapter):
            writer._writer.transport.abort()
