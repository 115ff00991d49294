"""The embedded broker's events on the `events` topic, at most one per cause every few seconds.

A refusal an attacker can repeat (a bad login, a publish outside the ACL, a connection over a
cap) must reach the owner, yet not become a flood of its own. The first of a kind from one
source is published at once; the ones after it within `gap` seconds are counted and published
together when the gap ends, so none goes unreported (before, those after the last window were
lost: 181 of 200 brute-force refusals were reported).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from homenet.schemas import encode
from homenet.schemas.messages import Event, Severity

log = logging.getLogger(__name__)

GAP = 5.0
MAX_SOURCES = 10_000


@dataclass
class _Pending:
    event: str
    sender: str | None
    topic: str | None
    reason: str
    source: str
    count: int = 0
    total: int = 0
    last: float = 0.0
    flush: asyncio.TimerHandle | None = None


class BrokerReports:
    """`note` is synchronous (it never suspends its caller) and schedules the publishing."""

    def __init__(self, publish: Callable[[bytes], Awaitable[Any]], gap: float = GAP) -> None:
        self._publish = publish
        self._gap = gap
        self._pending: dict[tuple[str, str], _Pending] = {}

    def note(self, event: str, source: str, reason: str, *, sender: str | None = None,
             topic: str | None = None) -> None:
        """One refusal named `event` (`auth.failed`, `auth.denied`, `broker.limit`, ...) from
        `source` (an address or a client id)."""
        key = (event, source)
        if key not in self._pending and len(self._pending) >= MAX_SOURCES:
            self._forget_quiet()
        entry = self._pending.setdefault(key, _Pending(event, sender, topic, reason, source))
        entry.count += 1
        entry.total += 1
        entry.sender, entry.topic, entry.reason = sender, topic, reason
        now = time.monotonic()
        if now - entry.last >= self._gap and entry.flush is None:
            self._send(key)
        elif entry.flush is None:
            entry.flush = asyncio.get_running_loop().call_later(self._gap - (now - entry.last), self._send, key)

    def total(self, event: str, source: str) -> int:
        entry = self._pending.get((event, source))
        return entry.total if entry else 0

    def _forget_quiet(self) -> None:
        """Drop the sources with nothing pending (memory an attacker controls stays bounded)."""
        for key in [k for k, e in self._pending.items() if e.flush is None]:
            del self._pending[key]

    def _send(self, key: tuple[str, str]) -> None:
        entry = self._pending[key]
        entry.flush = None
        if entry.count == 0:
            return
        count, entry.count, entry.last = entry.count, 0, time.monotonic()
        reason = entry.reason if count == 1 else f"{count} times (last: {entry.reason})"
        body = Event(event=entry.event, severity=Severity.WARNING, sender=entry.sender, topic=entry.topic,
                     reason=f"{entry.source}: {reason}", detail={"source": entry.source, "count": count,
                                                                 "total": entry.total})
        # Broker events are informational and unsigned; a millisecond clock keeps seq rising.
        _, payload = encode("event", body, sender="broker", seq=time.time_ns() // 1_000_000)
        task = asyncio.ensure_future(self._publish(payload))
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("broker event not published: %s", task.exception())
