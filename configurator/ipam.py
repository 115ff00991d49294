"""IPv4 address planning for the LAN (pure: no I/O).

A device gets a stable address outside the DHCP pool that nobody else holds. Preference order:
the address it was planned before (stability across re-plans), else that address's host part
in the LAN's subnet (a renumbered LAN: .50.20 becomes .60.20), then an address it already uses
(least disruption), then the lowest free one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network


class AddressExhausted(Exception):
    """No static address is free: reported as an error event, never a duplicate address."""


@dataclass(frozen=True)
class LanPlan:
    """The gateway's LAN as the planner sees it."""

    subnet: IPv4Network
    gateway: IPv4Address
    pool_start: IPv4Address
    pool_end: IPv4Address
    dns: tuple[IPv4Address, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("gateway", "pool_start", "pool_end"):
            if getattr(self, name) not in self.subnet:
                raise ValueError(f"lan {name} {getattr(self, name)} is outside {self.subnet}")
        if self.pool_start > self.pool_end:
            raise ValueError(f"DHCP pool {self.pool_start}-{self.pool_end} is empty")

    @classmethod
    def build(cls, subnet: str, gateway: str, pool_start: str, pool_end: str,
              dns: Iterable[str] = ()) -> "LanPlan":
        return cls(IPv4Network(subnet), IPv4Address(gateway), IPv4Address(pool_start),
                   IPv4Address(pool_end), tuple(IPv4Address(d) for d in dns) or (IPv4Address(gateway),))

    def in_pool(self, address: IPv4Address) -> bool:
        return self.pool_start <= address <= self.pool_end

    def is_static(self, address: IPv4Address) -> bool:
        """True for a usable host address that DHCP will never hand out."""
        return (address in self.subnet and address not in (self.subnet.network_address,
                self.subnet.broadcast_address, self.gateway) and not self.in_pool(address))

    def static_addresses(self, start: IPv4Address | None = None) -> Iterator[IPv4Address]:
        """In ascending order, from `start` if given (counted, not scanned: a /16 is large)."""
        first = int(self.subnet.network_address) + 1
        last = int(self.subnet.broadcast_address) - 1
        begin = max(first, int(start)) if start is not None else first
        return (a for a in map(IPv4Address, range(begin, last + 1)) if self.is_static(a))

    def static_capacity(self) -> int:
        return sum(1 for _ in self.static_addresses())


def addresses_of(cidrs: Iterable[str]) -> list[IPv4Address]:
    """The IPv4 addresses in a list of CIDR strings (IPv6 and junk skipped)."""
    found = []
    for cidr in cidrs:
        try:
            found.append(IPv4Interface(cidr).ip)
        except ValueError:
            continue
    return found


def plan_address(lan: LanPlan, device_id: str, *, previous: IPv4Address | None,
                 reported: Iterable[IPv4Address], in_use: Mapping[IPv4Address, str],
                 search_from: IPv4Address | None = None) -> IPv4Address:
    """Choose the device's address; `in_use` maps addresses held by anyone to the holder.
    `search_from`: every static address below it is known to be held, so a new device's
    search starts there instead of walking past all the others."""

    def free(address: IPv4Address) -> bool:
        return lan.is_static(address) and in_use.get(address, device_id) == device_id

    moved = None if previous is None else lan.subnet.network_address + (int(previous) & int(lan.subnet.hostmask))
    for candidate in [previous, moved, *reported]:
        if candidate is not None and free(candidate):
            return candidate
    for candidate in lan.static_addresses(search_from if search_from and search_from in lan.subnet else None):
        if free(candidate):
            return candidate
    raise AddressExhausted(
        f"no free static address in {lan.subnet}: all {lan.static_capacity()} addresses outside "
        f"the DHCP pool {lan.pool_start}-{lan.pool_end} are in use")


def quarantine(meta: Mapping[str, object], device_id: str, addresses: Iterable[IPv4Address],
               until: float) -> dict[str, dict[str, object]]:
    """The `quarantine` meta value with `device_id`'s addresses held until `until` (a Unix time):
    a forgotten device may still be using them."""
    entries = dict(meta.get("quarantine") or {})  # type: ignore[call-overload]
    entries[device_id] = {"addresses": sorted(map(str, addresses)), "until": until}
    return entries


def quarantined(meta: Mapping[str, object], now: float) -> dict[str, list[IPv4Address]]:
    """Forgotten devices whose addresses are still in quarantine at `now`, with those addresses."""
    entries: dict[str, dict] = meta.get("quarantine") or {}  # type: ignore[assignment]
    return {device_id: [IPv4Address(a) for a in entry["addresses"]]
            for device_id, entry in entries.items() if entry["until"] > now}
