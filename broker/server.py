"""The embedded amqtt broker, started and stopped from code.

amqtt has no payload size limit of its own: `HomenetBroker` drops an oversized PUBLISH before it
is routed or retained, and says so on the `events` topic so a user watching with mosquitto_sub
sees why a message vanished (a packet larger than the limit and a topic's worth is not even
read: broker/connect.py). It also fixes amqtt's leak of retained messages across clients, and
two races on amqtt's table of subscriptions (docs/amqtt-notes.md). How a connection is
admitted (authenticated before any session is touched, under caps) is broker/connect.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import psutil

from homenet.acl import Role
from homenet.schemas import Topics, encode
from homenet.schemas.messages import Event, Severity
from homenet.settings import BrokerSettings

from . import delivery
from .connect import AuthFirstConnect
from .limits import ConnectionLimits, fd_budget

log = logging.getLogger(__name__)


def broker_config(settings: BrokerSettings, topics: Topics) -> dict[str, Any]:
    """amqtt configuration: our listeners and our auth plugin, none of amqtt's defaults."""
    binds = [(bind, False) for bind in settings.listeners] + [(bind, True) for bind in settings.tls_listeners]
    if not binds:
        raise ValueError("the broker needs at least one listener (plain or TLS)")
    if settings.tls_listeners and not (settings.certfile and settings.keyfile):
        raise ValueError("TLS listeners need a certfile and a keyfile")
    listeners: dict[str, Any] = {}
    for n, (bind, tls) in enumerate(binds):
        listener: dict[str, Any] = {"type": "tcp", "bind": bind, "max_connections": 0}
        if tls:
            listener.update(ssl=True, certfile=str(settings.certfile), keyfile=str(settings.keyfile))
        listeners["default" if n == 0 else f"listener-{n}"] = listener
    return {
        "listeners": listeners,
        "timeout_disconnect_delay": 0,
        "plugins": {"homenet.broker.auth.HomenetAuthPlugin": {
            "accounts_file": str(settings.accounts_file) if settings.accounts_file else None,
            "root": topics.root, "discovery": topics.discovery}},
    }


LOOPBACK = frozenset({"127.0.0.1", "::1"})
UNKNOWN_RETAIN_MAX = 512
"""Largest retained message an unknown device may leave (its status is about 20 bytes)."""
TOPIC_HEADROOM = 64 * 1024 + 4
"""A PUBLISH may carry a topic of up to 64 KiB besides its payload."""


delivery.install()


def limits_for(settings: BrokerSettings) -> ConnectionLimits:
    budget = fd_budget()
    total = min(settings.max_connections, budget) if settings.max_connections else budget
    return ConnectionLimits(per_source=settings.max_connections_per_source, total=total, exempt=LOOPBACK)


class HomenetBroker(AuthFirstConnect):
    def __init__(self, settings: BrokerSettings, topics: Topics) -> None:
        super().__init__(broker_config(settings, topics), limits=limits_for(settings),
                         connect_timeout=settings.connect_timeout,
                         max_packet=settings.max_payload + TOPIC_HEADROOM)
        self.max_payload = settings.max_payload
        self.topics = topics
        self._writers: set[asyncio.StreamWriter] = set()

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        self._writers.add(writer)  # so that a stuck shutdown can still drop every client
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            self._writers.discard(writer)

    def abort_connections(self) -> None:
        """Close the listeners and reset every client connection at once."""
        for server in self._servers.values():
            server.instance.close()
        for writer in list(self._writers):
            writer.transport.abort()

    async def drop_orphans(self, timeout: float = 2.0) -> None:
        """Reset every client connection made to an IPv4 address this host no longer has (the
        LAN was renumbered), and wait until amqtt has ended their sessions (their wills sent).

        Such a connection is dead: nothing the device sends reaches it. Left open until its
        keepalive runs out, it makes the device's reconnect a session take-over, after which
        amqtt 0.12.1 delivers nothing to the new connection (docs/amqtt-notes.md).
        """
        local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
        orphans = [w for w in self._writers
                   if len(name := w.transport.get_extra_info("sockname") or ()) == 2 and name[0] not in local]
        for writer in orphans:
            log.info("connection from %s to %s, an address this host no longer has: closed",
                     writer.transport.get_extra_info("peername"), writer.transport.get_extra_info("sockname"))
            writer.transport.abort()
        deadline = time.monotonic() + timeout
        while any(w in self._writers for w in orphans) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _handle_message_delivery(self, client_session: Any, handler: Any, wait_deliver: Any) -> bool:
        message = wait_deliver.result()
        if message is not None and message.data is not None and len(message.data) > self.max_payload:
            reason = (f"payload of {len(message.data)} bytes on {message.topic} is over the broker's "
                      f"{self.max_payload}-byte limit; dropped")
            log.warning("client %s: %s", client_session.client_id, reason)
            await self._event(client_session.client_id, message.topic, reason)
            return True
        return await super()._handle_message_delivery(client_session, handler, wait_deliver)

    async def retain_message(self, source_session: Any, topic_name: str, data: Any, qos: int | None = None) -> None:
        """An unknown device may retain only small messages (its status): 200 retained 250 KiB
        messages of strangers were held until the broker restarted."""
        auth = self.auth
        if (source_session is not None and data and len(data) > UNKNOWN_RETAIN_MAX and auth is not None
                and auth.role_of(source_session.client_id) == Role.UNKNOWN):
            self.reports.note("auth.denied", source_session.client_id,
                              f"retained message of {len(data)} bytes on {topic_name} not kept: an unknown "
                              f"device may retain at most {UNKNOWN_RETAIN_MAX} bytes",
                              sender=source_session.client_id, topic=topic_name)
            return
        await super().retain_message(source_session, topic_name, data, qos)

    async def _topic_filtering(self, session: Any, topic: str, action: Any) -> bool:
        """Ask our ACL directly, without yielding to the event loop.

        amqtt 0.12.1 awaits the topic plugins (through tasks) inside `_run_broadcast` while it
        iterates `self._subscriptions`; a SUBSCRIBE handled during that await changes the dict
        and the broadcast dies with "dictionary changed size during iteration" (the message
        is lost). A check that never suspends cannot interleave.
        """
        plugin = self.auth
        return plugin is None or plugin.allowed(session, topic, action)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Any) -> None:
        """Send retained messages only for filters this session holds.

        amqtt 0.12.1 calls this at every CONNECT for *every* filter any client subscribed to,
        so a connecting client received retained messages of other devices' topics (their
        configs included). Measured here; see docs/amqtt-notes.md.
        """
        if subscription[0] in self._filters_of.get(session.client_id, ()):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _event(self, client_id: str, topic: str, reason: str) -> None:
        body = Event(event="message.rejected", severity=Severity.WARNING, topic=topic,
                     sender=client_id, reason=reason)
        # Broker events are informational and unsigned; a millisecond clock keeps seq rising.
        _, payload = encode("event", body, sender="broker", seq=time.time_ns() // 1_000_000)
        await self.internal_message_broadcast(self.topics.events, payload, qos=1)


class EmbeddedBroker:
    """Start/stop handle for the broker inside an asyncio loop."""

    def __init__(self, settings: BrokerSettings, topics: Topics) -> None:
        self.settings = settings
        self.topics = topics
        self._broker: HomenetBroker | None = None

    async def start(self) -> None:
        self._broker = HomenetBroker(self.settings, self.topics)  # amqtt needs the running loop
        await self._broker.start()
        log.info("broker listening on %s", ", ".join(self.settings.listeners))

    async def drop_orphans(self) -> None:
        """See HomenetBroker.drop_orphans."""
        if self._broker is not None:
            await self._broker.drop_orphans()

    async def kick(self, client_id: str) -> bool:
        """Close `client_id`'s connection now, as amqtt closes one taken over (its will is
        sent): its account was revoked, and the next login fails. False: not connected."""
        session, handler = self._broker._sessions.get(client_id, (None, None)) if self._broker else (None, None)
        if session is None or handler is None or not session.transitions.is_connected():
            return False
        log.info("closing the connection of %s: its account was revoked", client_id)
        await handler.handle_connection_closed()
        await handler.stop()
        return True

    async def stop(self, timeout: float = 3.0) -> None:
        """amqtt's shutdown has been seen to never return (after "PUBACK for unknown pending
        message"): after `timeout` every connection is dropped, so clients see the broker go
        (and reconnect to the next one) and a stop or restart is never stuck."""
        if self._broker is not None:
            try:
                await asyncio.wait_for(self._broker.shutdown(), timeout)
            except asyncio.TimeoutError:
                log.warning("broker shutdown did not finish in %g s; dropping every connection", timeout)
                self._broker.abort_connections()


async def serve_forever(settings: BrokerSettings, topics: Topics, stop: asyncio.Event) -> None:
    broker = EmbeddedBroker(settings, topics)
    await broker.start()
    try:
        await stop.wait()
    finally:
        await broker.stop()


class BrokerThread:
    """The embedded broker on its own event loop thread, for callers that are not asyncio."""

    def __init__(self, settings: BrokerSettings, topics: Topics) -> None:
        self._settings = settings
        self._topics = topics
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._broker: EmbeddedBroker | None = None

    def start(self) -> None:
        self._thread.start()
        self._broker = EmbeddedBroker(self._settings, self._topics)
        asyncio.run_coroutine_threadsafe(self._broker.start(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
