"""systemd's service notification protocol (sd_notify(3)): readiness, status and watchdog.

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (`@name` is in the abstract namespace). These few lines replace a library:
the `sdnotify` package on the index is unmaintained since 2017 and swallows every error,
and `systemd-python` needs libsystemd's headers to build. Outside systemd ($NOTIFY_SOCKET
unset) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=serving") as one datagram; False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), address)
        except OSError as exc:  # systemd gone or the socket not ours: nothing to tell
            log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], exc)
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings when the unit has `WatchdogSec=` (half its timeout,
    as sd_watchdog_enabled(3) advises), else None."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


class Watchdog:
    """Pings systemd's watchdog while `healthy()` says the service really works; once it does
    not, the pings stop (with one error line saying why), and systemd restarts the service
    when `WatchdogSec=` runs out. A hung process stops pinging by itself."""

    def __init__(self, healthy: Callable[[], str | None]) -> None:
        """`healthy` returns None when all is well, else what is wrong."""
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        self._thread = threading.Thread(target=self._run, args=(interval,), name="watchdog", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            problem = self._healthy()
            if problem is not None:
                log.error("not alive: %s; no more watchdog pings, systemd will restart the service", problem)
                return
            notify("WATCHDOG=1")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
