"""The embedded broker's workarounds for amqtt 0.12.1 races (docs/amqtt-notes.md), each with
the interleaving that broke it made certain."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from homenet.broker.server import HomenetBroker
from homenet.brokers import Embedded
from homenet.mqtt import make_client

from .harness import wait_until

MINE, OTHER = "homenet/v1/device/dev-a/config", "homenet/v1/device/dev-b/config"


class Client:
    """A paho client that records what it receives and whether it was dropped."""

    def __init__(self, port: int, client_id: str, topic: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.dropped = threading.Event()
        self.subscribed = threading.Event()
        self.client = make_client(client_id, clean_session=False)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.received.append((msg.topic, bytes(msg.payload)))
        self.client.on_disconnect = lambda *_: self.dropped.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_subscribe_while_a_returning_session_gets_its_retained_messages_drops_nobody(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """amqtt sends a returning persistent session its retained messages in a loop over every
    subscription filter, awaiting inside it; another client's SUBSCRIBE handled meanwhile adds
    a filter. Found by bench/soak.py (a broker traceback and a dropped agent whenever devices
    logged in again with their new accounts while others subscribed)."""
    original = HomenetBroker._publish_retained_messages_for_subscription
    returning, inside = threading.Event(), threading.Event()
    seen: list[HomenetBroker] = []

    async def held_open(self: HomenetBroker, subscription: tuple[str, int], session: Any) -> None:
        seen.append(self)
        if returning.is_set() and session.client_id == "dev-a" and not inside.is_set():
            inside.set()  # dev-b subscribes now, while dev-a's loop is suspended here
            for _ in range(500):
                if OTHER in self._subscriptions:
                    break
                await asyncio.sleep(0.01)
        await original(self, subscription, session)

    monkeypatch.setattr(HomenetBroker, "_publish_retained_messages_for_subscription", held_open)
    broker = Embedded()
    broker.start()
    try:
        first = Client(broker.port, "dev-a", MINE)
        wait_until(first.subscribed.is_set, what="dev-a subscribed")
        first.client.publish(MINE, b"retained", qos=1, retain=True).wait_for_publish(5)
        first.close()
        # gone for the broker too, or the next CONNECT is a take-over (another amqtt race)
        wait_until(lambda: seen[0]._sessions["dev-a"][0].transitions.state == "disconnected",
                   what="the broker saw dev-a leave")

        returning.set()
        again = Client(broker.port, "dev-a", MINE)  # its session still holds MINE
        wait_until(inside.is_set, what="dev-a's retained messages on their way")
        other = Client(broker.port, "dev-b", OTHER)
        wait_until(other.subscribed.is_set, what="dev-b subscribed")
        wait_until(lambda: (MINE, b"retained") in again.received, what="dev-a got its retained message")
        assert not again.dropped.wait(1.0), "the broker dropped dev-a"
        other.client.publish(MINE, b"live", qos=1).wait_for_publish(5)
        wait_until(lambda: (MINE, b"live") in again.received, what="dev-a still served after that")
        again.close()
        other.close()
    finally:
        broker.stop()
