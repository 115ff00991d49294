"""What the configurator has committed, told to whoever listens: the extensions' one event bus.

The configurator emits on its worker thread, after the batch that made the change has
committed (so a listener never sees what a failed commit took back), in commit order. A
listener must be quick and must not block (hand work to a thread or a loop of its own); an
exception in one is logged and does not reach the configurator or the other listeners.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from homenet.schemas.messages import Event

from .records import DeviceRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceChanged:
    """A device record as committed (registered, held, planned, result, online/offline ...)."""

    record: DeviceRecord


@dataclass(frozen=True)
class Committed:
    """One group commit: how long the store's transaction took and how many messages it held."""

    seconds: float
    messages: int


Notice = DeviceChanged | Committed | Event
"""`Event` is an `events` entry as published (e.g. `device.forgotten`, `message.rejected`)."""
Listener = Callable[[Notice], None]


class Bus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners = [*self._listeners, listener]

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners = [x for x in self._listeners if x is not listener]

    def emit(self, notice: Notice) -> None:
        for listener in self._listeners:  # a copy: (un)subscribing meanwhile is safe
            try:
                listener(notice)
            except Exception:
                log.exception("extension listener %r failed on %s", listener, type(notice).__name__)
