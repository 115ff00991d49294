"""The paho-mqtt adapter shared by agent and configurator: MQTT 3.1.1, TCP_NODELAY, backoff.

paho never sets TCP_NODELAY; without it a QoS 1 round trip took 44-88 ms instead of under
1 ms here (Nagle plus delayed ACK), so it is set on every connect.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho

log = logging.getLogger(__name__)

RECONNECT_MAX_DELAY = 30
"""Seconds between reconnect attempts at most (the backoff starts at 1 s and doubles)."""


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> "BrokerUrl":
        """Accept mqtt://host[:port], mqtts://host[:port], [v6addr]:port or host:port."""
        typed = url
        if "://" not in url:
            if "/" in url:  # e.g. `mqtt//host` or `mqtt:/host`: a scheme mistyped, not a host name
                raise ValueError(f"broker URL {typed!r} is not mqtt://HOST[:PORT] (is a ':' or '/' missing "
                                 "after the scheme?)")
            url = "mqtt://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"broker URL {typed!r}: nothing may follow HOST[:PORT]")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {url!r} has a bad port") from None
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def set_nodelay(client: paho.Client) -> None:
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # a unix socket or an already closed one
            log.debug("TCP_NODELAY not set: %s", exc)


def make_client(client_id: str, *, clean_session: bool = False,
                username: str | None = None, password: str | None = None,
                will: tuple[str, bytes] | None = None, cafile: Path | None = None,
                manual_ack: bool = False) -> paho.Client:
    """A paho client for MQTT 3.1.1 with reconnect backoff and a retained will, not yet connected.

    With `manual_ack` a received QoS 1 message is acknowledged only by `client.ack()`: the
    configurator does it after the message's effects are committed, so a crash before the
    commit makes the broker deliver it again.

    With `cafile` it speaks TLS and trusts only that certificate (the gateway's own, pinned by
    fingerprint); host names are not checked, since a home broker is reached by IP address.
    """
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv311, clean_session=clean_session, manual_ack=manual_ack)
    client.reconnect_delay_set(min_delay=1, max_delay=RECONNECT_MAX_DELAY)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    if cafile is not None:
        client.tls_set(ca_certs=str(cafile), cert_reqs=ssl.CERT_REQUIRED)
        client.tls_insecure_set(True)
    if username:
        client.username_pw_set(username, password)
    if will:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.on_connect_fail = lambda c, _u: _connect_failed(c, client_id, cafile is not None)
    return client


def _connect_failed(client: paho.Client, client_id: str, tls: bool) -> None:
    """One line naming the broker and the cause; paho calls this inside its `except OSError`,
    so the exception being handled is the cause (it passes no argument for it)."""
    cause = sys.exc_info()[1]
    url = BrokerUrl(client.host, client.port, tls)
    log.warning("%s cannot reach the broker at %s: %s; retrying with backoff", client_id, url,
                getattr(cause, "strerror", None) or cause or "connection failed")


@contextmanager
def session(client: paho.Client, broker: BrokerUrl) -> Iterator[paho.Client]:
    """A short-lived client connected (its loop running) for the `with` block: a command, a watch.
    An unreachable broker is a ConnectionError naming it."""
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise ConnectionError(f"cannot reach the broker at {broker}: {exc}") from None
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()
