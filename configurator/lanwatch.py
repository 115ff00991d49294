"""Following the gateway's LAN: the adapter that notices a renumbering (docs/renumbering.md).

A thread looks at the gateway's LAN interface through the driver (`observe`) when it starts,
every `interval` seconds, and at once when poked (a device reported that it left the LAN).
When the plan in force no longer fits what it sees, it hands the plan carried over to the new
subnet (`renumber.follow`) to the configurator. A driver that cannot see its LAN (memory,
upnp) ends the thread at the first look.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .gateway import GatewayDriver
from .ipam import LanPlan
from .renumber import follow

log = logging.getLogger(__name__)


class LanWatch:
    def __init__(self, driver: GatewayDriver, renumber: Callable[[LanPlan], None], interval: float) -> None:
        """`renumber(lan)` is called on the watch's thread with the plan for the new subnet."""
        self._driver = driver
        self._renumber = renumber
        self._interval = interval
        self._poked = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lan-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """Look now rather than at the next period."""
        self._poked.set()

    def stop(self) -> None:
        self._stop.set()
        self._poked.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                observed = self._driver.observe()
                if observed is None:
                    log.debug("gateway driver %s cannot see its LAN: not watching it", self._driver.name)
                    return
                if (lan := follow(self._driver.lan(), observed)) is not None:
                    self._renumber(lan)
            except Exception:  # a bug must not end the watch
                log.exception("following the gateway's LAN failed")
            self._poked.wait(self._interval)
            self._poked.clear()
