"""The gateway as the configurator drives it: the GatewayDriver interface and its memory driver.

Drivers apply the `gateway` items of a device's config (plus the DHCP reservation that backs
its planned address) and report per item. What a config asks of the gateway is made concrete
once (`wants_of`), for every driver. The memory driver keeps it in a dict; the real ones are in
`drivers/` (docs/gateway.md). The configurator re-applies every stored config at start, so a
fresh driver (or a rebooted gateway) is always caught up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Protocol

from homenet.schemas.messages import (Config, GatewayState, IgmpItem, Ipv4Item, ItemResult, ItemStatus,
                                      PortMapping, PortMappingItem, QosItem, QosRule, Reservation,
                                      Severity, Target, item_key)

from .ipam import LanPlan

log = logging.getLogger(__name__)


class GatewayDriver(Protocol):
    name: str

    def lan(self) -> LanPlan:
        """The LAN the gateway serves (subnet, gateway address, DHCP pool, DNS)."""

    def observe(self) -> list[IPv4Interface] | None:
        """The IPv4 addresses the gateway's LAN interface has now, primary first; None when
        the driver cannot see the LAN (a renumbering is then noticed by no one but the owner)."""

    def set_lan(self, lan: LanPlan) -> None:
        """Serve `lan` from now on (renumbering); the configurator then re-applies every device."""

    def apply(self, config: Config) -> list[ItemResult]:
        """Make the gateway match the device's config; idempotent."""

    def remove(self, device_id: str) -> None:
        """Remove everything set for the device."""

    def state(self) -> GatewayState:
        """What this driver has set, for `gateway/state`."""

    def actual(self) -> GatewayState | None:
        """What is really in place now, read back from the gateway (someone may have changed it
        behind the driver's back), for reconciliation; None when this driver cannot list it, or
        could not this time (then gateway drift is not checked)."""

    def close(self) -> None:
        """Stop what the driver runs (threads, child processes); what it set stays in place."""


@dataclass(frozen=True)
class DeviceWants:
    """What one device needs from the gateway: its config's `gateway` items, made concrete."""

    device_id: str
    reservation: Reservation | None = None
    port_mappings: tuple[PortMapping, ...] = ()
    qos: QosRule | None = None
    igmp: bool = False
    items: tuple[str, ...] = ()
    """Keys of the config items these come from (`reservation` first when there is one)."""


def wants_of(config: Config) -> DeviceWants:
    """The gateway's share of a config; nothing without an `ipv4` item (no address to act on)."""
    device = config.device_id
    ipv4 = next((i for i in config.items if isinstance(i, Ipv4Item)), None)
    if ipv4 is None:
        return DeviceWants(device)
    mine = [i for i in config.items if i.target == Target.GATEWAY]
    qos = next((i for i in mine if isinstance(i, QosItem)), None)
    igmp = next((i for i in mine if isinstance(i, IgmpItem)), None)
    return DeviceWants(
        device_id=device,
        reservation=Reservation(device_id=device, mac=ipv4.mac, address=ipv4.address),
        port_mappings=port_mappings(config, Target.GATEWAY),
        qos=QosRule(device_id=device, address=ipv4.address, qos_class=qos.qos_class,
                    dscp=qos.dscp) if qos else None,
        igmp=bool(igmp and igmp.enabled),
        items=("reservation", *(item_key(i) for i in mine)))


def port_mappings(config: Config, side: Target) -> tuple[PortMapping, ...]:
    """The config's port mappings carried out by `side`, towards the device's planned address."""
    ipv4 = next((i for i in config.items if isinstance(i, Ipv4Item)), None)
    if ipv4 is None:
        return ()
    return tuple(PortMapping(device_id=config.device_id, protocol=i.protocol, external_port=i.external_port,
                             internal_address=ipv4.address, internal_port=i.internal_port,
                             description=i.description)
                 for i in config.items if isinstance(i, PortMappingItem) and i.target == side)


def gateway_state(driver: str, lan: LanPlan, wants: Iterable[DeviceWants]) -> GatewayState:
    """The `gateway/state` body for what every device wants, in a stable order."""
    wants = list(wants)
    igmp = sorted(w.device_id for w in wants if w.igmp)
    return GatewayState(
        driver=driver, lan=str(lan.subnet),
        reservations=sorted((w.reservation for w in wants if w.reservation), key=lambda r: r.address),
        port_mappings=sorted((m for w in wants for m in w.port_mappings),
                             key=lambda m: (m.protocol, m.external_port)),
        qos=sorted((w.qos for w in wants if w.qos), key=lambda q: q.address),
        igmp_proxy=bool(igmp), igmp_devices=igmp)


class MemoryGatewayDriver:
    """Records reservations, port mappings, QoS rules and IGMP state; for demos and tests."""

    name = "memory"

    def __init__(self, lan: LanPlan) -> None:
        self._lan = lan
        self._wants: dict[str, DeviceWants] = {}

    def lan(self) -> LanPlan:
        return self._lan

    def observe(self) -> None:
        """A gateway only recorded has no interface to look at."""

    def set_lan(self, lan: LanPlan) -> None:
        self._lan = lan

    def apply(self, config: Config) -> list[ItemResult]:
        wants = wants_of(config)
        self._wants[config.device_id] = wants
        detail = {"reservation": str(wants.reservation.address)} if wants.reservation else {}
        return [ItemResult(item=key, status=ItemStatus.APPLIED, detail=detail.get(key, ""))
                for key in wants.items]

    def remove(self, device_id: str) -> None:
        self._wants.pop(device_id, None)

    def state(self) -> GatewayState:
        return gateway_state(self.name, self._lan, self._wants.values())

    def actual(self) -> GatewayState:
        """The record is all there is."""
        return self.state()

    def close(self) -> None:
        """Nothing runs."""


class GatewayReporter:
    """How a driver reports work it did in the background (retries) to the configurator.

    The driver exists before the configurator it serves, so the callbacks are connected later;
    until then reports are only logged.
    """

    def __init__(self) -> None:
        self._event: Callable[..., None] | None = None
        self._changed: Callable[[], None] | None = None
        self._items: Callable[[str, list[ItemResult]], None] | None = None

    def connect(self, event: Callable[..., None], changed: Callable[[], None],
                items: Callable[[str, list[ItemResult]], None]) -> None:
        """`event(name, severity, reason=...)` as Configurator.event; `changed()` republishes
        `gateway/state`; `items(device_id, results)` records what now holds of a device's items."""
        self._event, self._changed, self._items = event, changed, items

    def event(self, name: str, severity: Severity, reason: str) -> None:
        if self._event is None:
            log.log(logging.ERROR if severity == Severity.ERROR else logging.INFO, "%s: %s", name, reason)
        else:
            self._event(name, severity, reason=reason)

    def changed(self) -> None:
        if self._changed is not None:
            self._changed()

    def items(self, device_id: str, results: list[ItemResult]) -> None:
        """A retry changed what holds of the device's gateway items (failed, or in force again)."""
        if self._items is None:
            log.info("gateway items of %s: %s", device_id,
                     ", ".join(f"{r.item} {r.status.value}" for r in results))
        else:
            self._items(device_id, results)
