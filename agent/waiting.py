"""What the agent is waiting for, said when the wait begins and again while it lasts.

A device that sits silently in discovery or in a reconnect loop looks dead to whoever reads
its journal; each wait is named once when it begins and again every `every` seconds, with how
long it has lasted, until the agent moves on (`done`) or waits for something else.
"""

from __future__ import annotations

import logging
import threading
import time

REPEAT = 30.0
"""Seconds between two lines about the same wait."""


class Waiting:
    def __init__(self, log: logging.Logger, every: float = REPEAT) -> None:
        self.log = log
        self.every = every
        self._lock = threading.Lock()
        self._what: str | None = None
        self._since = self._said = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on(self, what: str) -> None:
        """Waiting for `what` from now on (said at once unless it is the wait already going on)."""
        with self._lock:
            if what == self._what:
                return
            self._what, self._since = what, time.monotonic()
            self._said = self._since
            if self._thread is None:  # again after a close: the agent may be started again
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._repeat, args=(self._stop,), name="waiting", daemon=True)
                self._thread.start()
        self.log.info("waiting for %s", what)

    def done(self) -> None:
        """Not waiting any more."""
        with self._lock:
            self._what = None

    def close(self) -> None:
        with self._lock:
            self._what, self._thread = None, None
            self._stop.set()

    def _repeat(self, stop: threading.Event) -> None:
        while not stop.wait(min(1.0, self.every / 4)):
            with self._lock:
                now = time.monotonic()
                if self._what is None or now - self._said < self.every:
                    continue
                self._said, what, lasted = now, self._what, now - self._since
            self.log.warning("still waiting for %s (%.0f s)", what, lasted)
