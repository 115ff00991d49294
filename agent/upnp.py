"""The `upnp` executor: the device maps its own ports on a third-party router (UPnP IGD).

A router in secure mode (miniupnpd's default) maps a port only to the address that asks for
it, so when the gateway is not the configurator's own, the policy hands a device's port
mappings to its agent (IEC 62608 foresees the delegation). This executor wraps the device's IP
executor: `port_mapping` items go to the Internet Gateway Device found by SSDP, all others to
the wrapped executor. It speaks UPnP through async-upnp-client (Home Assistant's maintained
library), installed with `homenet-iec62608[upnp]`; without it port mappings are `unsupported`.

Mappings are leased (`lease` seconds), never permanent, so the router drops the ones of a
device that is gone; a thread renews the current ones at half their lease. The current ones
are those applied since the last config began (`checkpoint`), or those of the config before
when a new one is rolled back; any other (a newer config no longer holds it, or it belongs to a
config rolled back) is not renewed and expires. They are kept in the state directory, so an agent
that restarts (and rightly does not re-apply a config it applied) still renews them.

Every agent with the `linux` collector wraps its executor in this one, and most never see a
port mapping: asyncio (about 3 MB of resident memory) and async-upnp-client are imported when
a mapping is made or renewed, not with this module (docs/performance.md, Footprint).
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
import time
from datetime import timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from homenet.durable import read_json, write_json_atomic
from homenet.schemas.messages import ConfigItem, ItemResult, ItemStatus, PortMappingItem, item_key

from .executor import Executor

log = logging.getLogger(__name__)

LEASE = 3600
SEARCH_TIMEOUT = 3
IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
"""Searched as version 1: IGD:2 devices answer it too."""
ANY_HOST = IPv4Address("0.0.0.0")
CONFLICT = 718  # ConflictInMappingEntry
RETRY_RENEWAL = 30.0


class UpnpRefused(Exception):
    """The router cannot give the mapping: no IGD answered, or the port is someone else's."""


def own_address(host: str, port: int) -> IPv4Address:
    """The device's address on the route to the router: the only one secure mode accepts."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return IPv4Address(probe.getsockname()[0])


async def _discover() -> str:
    from async_upnp_client.search import async_search

    found: list[str] = []

    async def on_response(headers: Any) -> None:
        found.append(headers["location"])

    await async_search(on_response, timeout=SEARCH_TIMEOUT, search_target=IGD)
    if not found:
        raise UpnpRefused(f"no UPnP Internet Gateway Device answered within {SEARCH_TIMEOUT} s")
    return found[0]


async def _add(item: PortMappingItem, lease: int, location: str | None) -> dict[str, Any]:
    """Map the item on the IGD (found again when `location` is None or stale); the lease record."""
    from async_upnp_client.aiohttp import AiohttpRequester
    from async_upnp_client.client_factory import UpnpFactory
    from async_upnp_client.exceptions import UpnpActionResponseError
    from async_upnp_client.profiles.igd import IgdDevice

    location = location or await _discover()
    url = urlparse(location)
    internal = own_address(url.hostname or "", url.port or 80)
    igd = IgdDevice(await UpnpFactory(AiohttpRequester(timeout=5)).async_create_device(location), None)
    protocol = item.protocol.upper()

    async def add() -> None:
        await igd.async_add_port_mapping(ANY_HOST, item.external_port, protocol, item.internal_port, internal,
                                         True, item.description or "homenet", timedelta(seconds=lease))
    try:
        await add()
    except UpnpActionResponseError as exc:
        # 718: the port is mapped already. miniupnpd says so even for the same client's own
        # mapping, so a renewal of ours is delete-and-add; anyone else's mapping is left alone.
        if exc.error_code != CONFLICT:
            raise
        held = await igd.async_get_specific_port_mapping_entry(ANY_HOST, item.external_port, protocol)
        if held is None or (held.internal_client, held.internal_port) != (internal, item.internal_port):
            holder = f"{held.internal_client}:{held.internal_port}" if held else "another client"
            raise UpnpRefused(f"{item.protocol}/{item.external_port} is mapped to {holder} on the router") from None
        await igd.async_delete_port_mapping(ANY_HOST, item.external_port, protocol)
        await add()
    return {"item": item.model_dump(mode="json"), "internal_client": str(internal), "location": location}


class UpnpExecutor:
    """Port mappings on the router's IGD; everything else goes to the wrapped executor."""

    def __init__(self, inner: Executor, data_dir: Path, lease: int = LEASE) -> None:
        self.inner = inner
        self.name = inner.name  # it names how the device's own settings are made; UPnP is beside them
        self.lease = lease
        self.path = Path(data_dir) / "upnp.json"
        self._lock = threading.Lock()
        self._leases: dict[str, dict[str, Any]] = read_json(self.path, {})
        self._current: set[str] = set(self._leases)
        self._renewer: threading.Thread | None = None
        if self._leases:  # kept from before a restart: renew them at once
            self._start_renewing(first=0.0)

    def apply(self, item: ConfigItem) -> ItemResult:
        if not isinstance(item, PortMappingItem):
            return self.inner.apply(item)
        key = item_key(item)
        if importlib.util.find_spec("async_upnp_client") is None:
            return ItemResult(item=key, status=ItemStatus.UNSUPPORTED,
                              detail="UPnP needs async-upnp-client: pip install 'homenet-iec62608[upnp]'")
        import asyncio

        try:
            lease = asyncio.run(_add(item, self.lease, None))
        except Exception as exc:  # noqa: BLE001 - SSDP, HTTP, SOAP faults: all reported, none fatal
            return ItemResult(item=key, status=ItemStatus.FAILED, detail=f"UPnP: {_why(exc)}"[:1024])
        with self._lock:
            self._leases[key] = lease
            self._current.add(key)
            self._save()
        self._start_renewing(first=self.lease / 2)
        return ItemResult(item=key, status=ItemStatus.APPLIED,
                          detail=f"{item.protocol}/{item.external_port} -> {lease['internal_client']}:"
                                 f"{item.internal_port} on {urlparse(lease['location']).hostname}, "
                                 f"lease {self.lease} s")

    def in_force(self) -> dict[str, Any]:
        with self._lock:
            mappings = [{**lease["item"], "internal_client": lease["internal_client"]}
                        for key, lease in sorted(self._leases.items()) if key in self._current]
        return {**self.inner.in_force(), **({"upnp_port_mappings": mappings} if mappings else {})}

    def checkpoint(self) -> object:
        """A new config begins: only the mappings it applies are renewed from now on."""
        inner = self.inner.checkpoint()  # first: if it fails, nothing is applied and nothing changes here
        with self._lock:
            before = (self._current, dict(self._leases))
            self._current = set()
        return before, inner

    def rollback(self, checkpoint: Any) -> None:
        """Back to the config before: its mappings are renewed again; those of the rolled-back one expire."""
        (current, leases), inner = checkpoint
        self.inner.rollback(inner)
        with self._lock:
            self._current = current
            self._leases.update((key, lease) for key, lease in leases.items() if key in current)
            self._save()

    # --- leases --------------------------------------------------------------------------

    def _save(self) -> None:
        try:
            write_json_atomic(self.path, self._leases)
        except OSError as exc:
            log.warning("cannot save UPnP leases to %s: %s", self.path, exc)

    def _start_renewing(self, first: float) -> None:
        with self._lock:
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_loop, args=(first,), name="upnp-renew",
                                                 daemon=True)
                self._renewer.start()

    def _renew_loop(self, wait: float) -> None:
        while True:
            time.sleep(wait)
            wait = self.lease / 2 if self.renew() else min(RETRY_RENEWAL, self.lease / 4)

    def renew(self) -> bool:
        """Re-add every current mapping (a new lease); drop the others. False when one failed."""
        with self._lock:
            self._leases = {k: v for k, v in self._leases.items() if k in self._current}
            leases = dict(self._leases)
            self._save()
        import asyncio

        ok = True
        for key, lease in leases.items():
            item = PortMappingItem.model_validate(lease["item"])
            try:
                try:
                    asyncio.run(_add(item, self.lease, lease["location"]))
                except Exception:  # noqa: BLE001 - the router may have moved: search again
                    asyncio.run(_add(item, self.lease, None))
            except Exception as exc:  # noqa: BLE001
                log.warning("renewing UPnP mapping %s failed: %s", key, _why(exc))
                ok = False
        return ok


def _why(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
