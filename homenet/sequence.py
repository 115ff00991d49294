"""A per-sender message counter that never goes back, even across crashes.

Writing the counter on every message would cost a disk sync per publish. Instead a block of
numbers is reserved on disk ahead of use: after a crash the counter resumes above the reserved
ceiling, so a gap can appear but a number is never reused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class SequenceCounter:
    def __init__(self, reserved: int, persist: Callable[[int], object], block: int = 1000) -> None:
        """`reserved` is the ceiling last persisted; `persist(ceiling)` must be durable."""
        self._lock = threading.Lock()
        self._block = block
        self._persist = persist
        self._next = reserved + 1
        self._ceiling = reserved

    def _reserve(self) -> None:
        if self._next > self._ceiling:
            ceiling = self._next + self._block - 1
            self._persist(ceiling)  # durable first: if it fails, no number above the old one
            self._ceiling = ceiling

    def reserve(self) -> None:
        """Reserve the next block now if none is left (e.g. before connecting), so the first
        message after the CONNACK does not wait for a disk sync."""
        with self._lock:
            self._reserve()

    def next(self) -> int:
        with self._lock:
            self._reserve()
            value = self._next
            self._next += 1
            return value
