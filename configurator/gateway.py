"""The gateway as the configurator drives it: the GatewayDriver interface and its memory driver.

Drivers apply the `gateway` items of a device's config (plus the DHCP reservation that backs
its planned address) and report per item. The memory driver keeps everything in dicts; the
configurator re-applies every stored config at start, so a fresh driver is always caught up.
"""

from __future__ import annotations

from typing import Protocol

from homenet.schemas.messages import (Config, GatewayState, IgmpItem, Ipv4Item, ItemResult, ItemStatus,
                                      PortMapping, PortMappingItem, QosItem, QosRule, Reservation,
                                      Target, item_key)

from .ipam import LanPlan


class GatewayDriver(Protocol):
    name: str

    def lan(self) -> LanPlan:
        """The LAN the gateway serves (subnet, gateway address, DHCP pool, DNS)."""

    def apply(self, config: Config) -> list[ItemResult]:
        """Make the gateway match the device's config; idempotent."""

    def remove(self, device_id: str) -> None:
        """Remove everything set for the device."""

    def state(self) -> GatewayState:
        """What this driver has set, for `gateway/state`."""


class MemoryGatewayDriver:
    """Records reservations, port mappings, QoS rules and IGMP state; for demos and tests."""

    name = "memory"

    def __init__(self, lan: LanPlan) -> None:
        self._lan = lan
        self._reservations: dict[str, Reservation] = {}
        self._mappings: dict[str, list[PortMapping]] = {}
        self._qos: dict[str, QosRule] = {}
        self._igmp: set[str] = set()

    def lan(self) -> LanPlan:
        return self._lan

    def apply(self, config: Config) -> list[ItemResult]:
        device = config.device_id
        ipv4 = next((i for i in config.items if isinstance(i, Ipv4Item)), None)
        if ipv4 is None:
            self.remove(device)
            return []
        self._reservations[device] = Reservation(device_id=device, mac=ipv4.mac, address=ipv4.address)
        results = [ItemResult(item="reservation", status=ItemStatus.APPLIED, detail=str(ipv4.address))]
        mine = [i for i in config.items if i.target == Target.GATEWAY]
        self._mappings[device] = [
            PortMapping(device_id=device, protocol=i.protocol, external_port=i.external_port,
                        internal_address=ipv4.address, internal_port=i.internal_port,
                        description=i.description)
            for i in mine if isinstance(i, PortMappingItem)]
        qos = next((i for i in mine if isinstance(i, QosItem)), None)
        if qos:
            self._qos[device] = QosRule(device_id=device, address=ipv4.address,
                                        qos_class=qos.qos_class, dscp=qos.dscp)
        else:
            self._qos.pop(device, None)
        igmp = next((i for i in mine if isinstance(i, IgmpItem)), None)
        if igmp and igmp.enabled:
            self._igmp.add(device)
        else:
            self._igmp.discard(device)
        results += [ItemResult(item=item_key(i), status=ItemStatus.APPLIED) for i in mine]
        return results

    def remove(self, device_id: str) -> None:
        self._reservations.pop(device_id, None)
        self._mappings.pop(device_id, None)
        self._qos.pop(device_id, None)
        self._igmp.discard(device_id)

    def state(self) -> GatewayState:
        return GatewayState(
            driver=self.name, lan=str(self._lan.subnet),
            reservations=sorted(self._reservations.values(), key=lambda r: r.address),
            port_mappings=sorted((m for ms in self._mappings.values() for m in ms),
                                 key=lambda m: (m.protocol, m.external_port)),
            qos=sorted(self._qos.values(), key=lambda q: q.address),
            igmp_proxy=bool(self._igmp), igmp_devices=sorted(self._igmp))
