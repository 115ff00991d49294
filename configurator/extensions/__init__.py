"""Features beside the core, one module each: Home Assistant discovery, the web page, metrics.

The Zigbee2MQTT model (`lib/extension/extension.ts`): an extension's constructor only stores
its collaborators; `start` subscribes to what the configurator commits (configurator/bus.py)
and `stop` removes what `start` added. Everything an extension may do goes through `Host`,
one narrow interface: the committed devices, the health of the configurator, its command
channel (the same one `homenet devices approve` uses), operator logins, the gateway's HTTP
server. Switching one off is `enabled = false` in its settings section; removing one is
deleting its module and its line in `EXTENSIONS`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from homenet.acl import Role
from homenet.schemas.messages import Command, CommandReply, Event
from homenet.settings import GatewaySettings

from ..bus import Bus, DeviceChanged, Notice
from ..records import DeviceRecord

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from ..service import Configurator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Health:
    """Serving means primary (not stood down for a newer configurator) and connected."""

    configurator_id: str
    epoch: int
    primary: bool
    connected: bool

    @property
    def serving(self) -> bool:
        return self.primary and self.connected


class Host:
    """What extensions see of the configurator, and nothing more."""

    def __init__(self, configurator: Configurator, settings: GatewaySettings) -> None:
        self.settings = settings
        self.bus: Bus = configurator.bus
        self._configurator = configurator
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceRecord] = {}
        self.routes: list[BaseRoute] = []
        """HTTP routes the extensions add in `start`; served by the gateway's HTTP server."""

    # --- the committed devices ---------------------------------------------------------

    def open(self) -> None:
        """Before the configurator starts: every record on disk is committed, and from now on
        the bus tells every change."""
        self._devices = {r.device_id: r for r in self._configurator.store.all()}
        self.bus.subscribe(self._track)

    def close(self) -> None:
        self.bus.unsubscribe(self._track)

    def _track(self, notice: Notice) -> None:
        with self._lock:
            if isinstance(notice, DeviceChanged):
                self._devices[notice.record.device_id] = notice.record
            elif isinstance(notice, Event) and notice.event == "device.forgotten" and notice.device_id:
                self._devices.pop(notice.device_id, None)

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            return sorted(self._devices.values(), key=lambda r: r.device_id)

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            return self._devices.get(device_id)

    # --- the configurator ----------------------------------------------------------------

    def health(self) -> Health:
        c = self._configurator
        return Health(c.sender, c.epoch, not c.fenced.is_set(), c.connected.is_set())

    @property
    def driver(self) -> str:
        return self._configurator.driver.name

    def command(self, command: Command, login: tuple[str, str] | None) -> CommandReply:
        """Through the configurator's command channel, as `homenet devices ...` does, logged in
        as `login` (the broker's ACL decides what that account may do). Blocks: call it from a
        thread of the extension's own."""
        from ..operator import operator_key, send_command

        conf = self.settings.configurator
        return send_command(conf.broker, command, conf.root, login, cafile=conf.broker_cafile,
                            key=operator_key(conf.data_dir))

    def operator(self, name: str, password: str) -> Role | None:
        """The role of an operator account (operator or reader) whose password this is, else None."""
        accounts = self._configurator.accounts
        account = accounts.authenticate(name, password) if accounts is not None else None
        return account.role if account and account.role in (Role.OPERATOR, Role.READER) else None

    @property
    def has_accounts(self) -> bool:
        return self._configurator.accounts is not None

    def login(self, account: str) -> tuple[str, str] | None:
        """A service account's login from the data directory: `configurator` (for an extension's
        own broker connection) or `admin` (the gateway's local operator); None without accounts."""
        from ..app import ADMIN, ADMIN_SECRET

        secret = {"configurator": "configurator.secret", ADMIN: ADMIN_SECRET}[account]
        path = Path(self.settings.configurator.data_dir) / secret
        return (account, path.read_text().strip()) if self.has_accounts and path.exists() else None


class Extension:
    """Base of every extension: the constructor stores the host, nothing else happens in it."""

    name = ""

    def __init__(self, host: Host) -> None:
        self.host = host

    def start(self) -> None:
        """Subscribe to the bus, add routes, connect: everything `stop` undoes."""

    def stop(self) -> None:
        """Undo `start`."""


def enabled(settings: GatewaySettings) -> list[type[Extension]]:
    """The extensions switched on, in start order (each module loads only when enabled)."""
    chosen: list[type[Extension]] = []
    if settings.homeassistant.enabled:
        from .homeassistant import HomeAssistant
        chosen.append(HomeAssistant)
    if settings.metrics.enabled:
        from .metrics import Metrics
        chosen.append(Metrics)
    if settings.web.enabled:
        from .web import Web
        chosen.append(Web)
    return chosen


class Extensions:
    """The enabled extensions around one configurator, and the HTTP server when one needs it."""

    def __init__(self, configurator: Configurator, settings: GatewaySettings) -> None:
        self.host = Host(configurator, settings)
        self.extensions = [cls(self.host) for cls in enabled(settings)]
        self.started: list[Extension] = []
        self.server: Any = None

    def start(self) -> None:
        """Call before the configurator starts, so nothing it commits is missed."""
        self.host.open()
        for extension in self.extensions:
            extension.start()
            self.started.append(extension)
            log.info("extension %s started", extension.name)
        if self.host.routes:
            from .http import HttpServer

            self.server = HttpServer(self.host.settings.http, self.host.settings.configurator.gateway.lan_interface,
                                     self.host.routes)
            self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        for extension in reversed(self.started):
            extension.stop()
        self.started = []
        self.host.close()
