"""Routing in amqtt 0.12.1 without its scans of every subscription.

amqtt matches each published message against every topic filter of every client, looks
through every retained message for each new subscription, walks all filters to drop one
session's, and formats debug lines (the whole subscription table after each SUBSCRIBE) even
with debug logging off. With a few subscriptions per device, a storm of N devices cost N²;
profiles in docs/performance.md. `IndexedRouting` keeps amqtt's behaviour with indexes:

- exact filters are found by the topic itself; only wildcard filters are matched one by one;
- a new subscription without wildcards finds its retained message by topic;
- each client's filters are indexed, so dropping a session touches only its own.

It is written against amqtt 0.12.1 (pinned in pyproject.toml): the overridden methods are
private, and a new amqtt needs these re-checked.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any

from amqtt.broker import Action, Broker
from amqtt.mqtt.constants import QOS_1, QOS_2

log = logging.getLogger(__name__)


def has_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class Subscriptions(dict[str, list[tuple[Any, int]]]):
    """amqtt's filter → [(session, qos)] table, knowing its wildcard filters; its repr is short
    because amqtt logs `repr(table)` after every SUBSCRIBE whatever the log level."""

    def __init__(self) -> None:
        super().__init__()
        self.wildcards: set[str] = set()

    def __setitem__(self, topic_filter: str, holders: list[tuple[Any, int]]) -> None:
        super().__setitem__(topic_filter, holders)
        if has_wildcard(topic_filter):
            self.wildcards.add(topic_filter)

    def __delitem__(self, topic_filter: str) -> None:
        super().__delitem__(topic_filter)
        self.wildcards.discard(topic_filter)

    def clear(self) -> None:
        super().clear()
        self.wildcards.clear()

    def __repr__(self) -> str:
        return f"<{len(self)} topic filters, {len(self.wildcards)} with wildcards>"

    def __iter__(self) -> Iterator[str]:
        """Over a copy of the filters: at every CONNECT of a session that holds subscriptions
        amqtt runs `for topic in self._subscriptions: await ...`; another client's SUBSCRIBE
        during that await would end the loop with "dictionary changed size during iteration"
        and drop the returning client (found by bench/soak.py)."""
        return iter(list(super().__iter__()))


class IndexedRouting(Broker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = Subscriptions()
        self._filters_of: defaultdict[str, set[str]] = defaultdict(set)

    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        granted = await super().add_subscription(subscription, session)
        if granted != 0x80:
            self._filters_of[session.client_id].add(subscription[0])
        return granted

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        deleted = super()._del_subscription(a_filter, session)
        if deleted:
            self._filters_of.get(session.client_id, set()).discard(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Any) -> None:
        for topic_filter in self._filters_of.pop(session.client_id, set()):
            holders = self._subscriptions.get(topic_filter)
            if holders is None:
                continue
            holders[:] = [(s, q) for s, q in holders if s.client_id != session.client_id]
            if not holders:
                del self._subscriptions[topic_filter]

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Any) -> None:
        topic_filter, qos = subscription
        if has_wildcard(topic_filter):
            await super()._publish_retained_messages_for_subscription(subscription, session)
            return
        retained = self._retained_messages.get(topic_filter)
        handler = self._get_handler(session) if retained is not None else None
        if handler:
            await asyncio.wait([asyncio.ensure_future(
                handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True))])

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """amqtt's `_run_broadcast`, with the matching filters looked up instead of scanned."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        filters = [topic] if topic in self._subscriptions else []
        filters += [f for f in self._subscriptions.wildcards if self._matches(topic, f)]
        for topic_filter in filters:
            for target, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                    # debug: a reader on `#` is denied every register/reply by design, not news
                    log.debug("%s not allowed to receive messages from TOPIC %s.", target.client_id, topic)
                    continue
                connected = target.transitions.state == "connected"
                # kept for a persistent session that is away [MQTT-3.1.2.4], as amqtt does
                if not connected and not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                    await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target) if connected else None
                if handler:
                    running_tasks.append(asyncio.ensure_future(
                        handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)))
