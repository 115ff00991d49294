"""Who holds which LAN address and external port, kept up to date record by record.

Planning one device needs to know what every other device holds. Gathering that from all
records on every plan made a storm of N new devices cost N² (and a re-plan of all devices at
start-up too); this index changes only by the devices that changed. Pure: no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Iterator, Mapping
from ipaddress import IPv4Address
from typing import Generic, TypeVar

from homenet.schemas.messages import Ipv4Item, PortMappingItem

from .ipam import LanPlan, addresses_of
from .policy import NetworkView
from .ports import PortKey
from .records import DeviceRecord

K = TypeVar("K", bound=Hashable)


def held_by(record: DeviceRecord) -> tuple[set[IPv4Address], set[PortKey]]:
    """The addresses a device uses or was planned, and the external ports mapped to it."""
    addresses = {a for iface in record.info.interfaces for a in addresses_of(iface.addresses)}
    ports: set[PortKey] = set()
    for item in record.config.items if record.config else ():
        if isinstance(item, Ipv4Item):
            addresses.add(item.address)
        elif isinstance(item, PortMappingItem):
            ports.add((item.protocol, item.external_port))
    return addresses, ports


class HeldByOthers(Mapping[K, str], Generic[K]):
    """`holders` seen from one device: a key it holds alone counts as free for it."""

    def __init__(self, holders: Mapping[K, set[str]], me: str) -> None:
        self._holders = holders
        self._me = me

    def __getitem__(self, key: K) -> str:
        others = [h for h in self._holders.get(key, ()) if h != self._me]
        if not others:
            raise KeyError(key)
        return min(others)

    def __iter__(self) -> Iterator[K]:
        return (k for k, holders in self._holders.items() if holders - {self._me})

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Holdings:
    def __init__(self, records: list[DeviceRecord] = ()) -> None:
        self._addresses: defaultdict[IPv4Address, set[str]] = defaultdict(set)
        self._ports: defaultdict[PortKey, set[str]] = defaultdict(set)
        self._held: dict[str, tuple[set[IPv4Address], set[PortKey]]] = {}
        self._floor: IPv4Address | None = None
        self._lan: LanPlan | None = None
        """The LAN the floor was last found in."""
        for record in records:
            self.update(record)

    def update(self, record: DeviceRecord) -> None:
        self._change(record.device_id, *held_by(record))

    def remove(self, device_id: str) -> None:
        self._change(device_id, set(), set())

    def hold(self, device_id: str, addresses: Iterable[IPv4Address]) -> None:
        """`device_id` holds only `addresses` now (a forgotten device's, in quarantine)."""
        self._change(device_id, set(addresses), set())

    def _change(self, device_id: str, addresses: set[IPv4Address], ports: set[PortKey]) -> None:
        """Only what the device gave up or took changes: most updates (status, results) touch nothing."""
        old_addresses, old_ports = self._held.pop(device_id, (set(), set()))
        for address in old_addresses - addresses:
            _discard(self._addresses, address, device_id)
            if self._floor is not None and address < self._floor and (self._lan is None or address in self._lan.subnet):
                self._floor = address  # freed below the floor: the search must start lower
        for port in old_ports - ports:
            _discard(self._ports, port, device_id)
        for address in addresses - old_addresses:
            self._addresses[address].add(device_id)
        for port in ports - old_ports:
            self._ports[port].add(device_id)
        if addresses or ports:
            self._held[device_id] = (addresses, ports)

    def view(self, lan: LanPlan, device_id: str, gateway: str) -> NetworkView:
        """The home as `device_id`'s planner must see it."""
        return NetworkView(lan, HeldByOthers(self._addresses, device_id), HeldByOthers(self._ports, device_id),
                           gateway=gateway, free_from=self._lowest_unheld(lan))

    def _lowest_unheld(self, lan: LanPlan) -> IPv4Address | None:
        """Moves up as addresses are taken and down as they are freed: O(1) per new device."""
        self._lan = lan
        start = self._floor if self._floor is not None and self._floor in lan.subnet else None
        self._floor = next((a for a in lan.static_addresses(start) if a not in self._addresses), None)
        return self._floor


def _discard(holders: defaultdict[K, set[str]], key: K, device_id: str) -> None:
    held = holders.get(key)
    if held is not None:
        held.discard(device_id)
        if not held:
            del holders[key]
