"""Renumbering (pure: no I/O): when the gateway's LAN moves to another subnet, the plan follows.

Theory of operation: the gateway's LAN interface says which subnet the LAN is; a firmware
upgrade may have moved it (192.168.50.1/24 -> 192.168.60.1/24). `follow` compares the
addresses the interface has with the plan in force: while the plan's gateway address (with
its prefix) is among them nothing changes, so a transition that adds the new address before
removing the old one does not flap. Once it is gone, the plan is carried over to the
interface's primary address (`carry_over`): the DHCP pool and the DNS servers inside the LAN
keep their place in the subnet. The configurator then re-plans every device, and an address
from the old subnet keeps its host part in the new one when it is free (`ipam.plan_address`).

A device that reports it left the LAN (`left_the_lan`: it had an address in it and now has
IPv4 addresses elsewhere only) is the other signal: the configurator checks the gateway's LAN
at once, and says so on `events`.

The plan in force is saved in the configurator's metadata (`saved`), with the `[lan]` settings
it was derived from, so a restart keeps it (`saved_plan`) unless the owner changed the
settings since: then the settings win.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from homenet.schemas.messages import DeviceInfo
from homenet.settings import LanSettings

from .ipam import LanPlan


def follow(plan: LanPlan, observed: Sequence[IPv4Interface]) -> LanPlan | None:
    """The plan for the LAN the gateway's interface has now (`observed`, primary first); None
    while the plan still holds or the interface has no IPv4 address at all."""
    if not observed or IPv4Interface(f"{plan.gateway}/{plan.subnet.prefixlen}") in observed:
        return None
    return carry_over(plan, observed[0])


def carry_over(plan: LanPlan, gateway: IPv4Interface) -> LanPlan:
    """`plan` moved to the subnet of `gateway`. The pool stays where it is if it still lies in
    the new subnet; else it keeps its offsets from the network address when they fit, or its
    share of the subnet when the new one is too small. DNS: the old gateway becomes the new
    one, other servers of the old subnet move like the pool, servers outside stay."""
    old, new = plan.subnet, gateway.network

    def moved(address: IPv4Address, scale: bool) -> IPv4Address:
        offset = int(address) - int(old.network_address)
        if scale:
            offset = offset * new.num_addresses // old.num_addresses
        return new.network_address + min(max(offset, 1), max(new.num_addresses - 2, 0))

    if plan.pool_start in new and plan.pool_end in new:
        pool = (plan.pool_start, plan.pool_end)
    else:
        scale = int(plan.pool_end) - int(old.network_address) >= new.num_addresses - 1
        pool = (moved(plan.pool_start, scale), moved(plan.pool_end, scale))

    def dns(server: IPv4Address) -> IPv4Address:
        if server == plan.gateway:
            return gateway.ip
        if server in new or server not in old:
            return server
        offset = int(server) - int(old.network_address)
        return new.network_address + offset if offset < new.num_addresses - 1 else gateway.ip

    return LanPlan(new, gateway.ip, *pool, tuple(dns(d) for d in plan.dns))


def left_the_lan(plan: LanPlan, before: DeviceInfo, after: DeviceInfo) -> list[str]:
    """The IPv4 addresses (CIDR) a device reports now, when it had one in the LAN before and
    has none there now; empty otherwise (a device that has no IPv4 yet has not left)."""
    def ipv4(info: DeviceInfo) -> list[IPv4Interface]:
        found = []
        for cidr in (a for i in info.interfaces for a in i.addresses):
            try:
                address = IPv4Interface(cidr)
            except ValueError:
                continue
            if not (address.is_loopback or address.is_link_local):
                found.append(address)
        return found

    now = ipv4(after)
    if any(a.ip in plan.subnet for a in now) or not any(a.ip in plan.subnet for a in ipv4(before)):
        return []
    return [str(a) for a in now]


def _doc(plan: LanPlan) -> dict[str, Any]:
    return {"subnet": str(plan.subnet), "gateway": str(plan.gateway), "pool_start": str(plan.pool_start),
            "pool_end": str(plan.pool_end), "dns": [str(d) for d in plan.dns]}


def lan_plan(lan: LanSettings) -> LanPlan:
    """The plan the `[lan]` settings describe."""
    return LanPlan.build(lan.subnet, lan.gateway, lan.pool_start, lan.pool_end, lan.dns)


def saved(plan: LanPlan, settings: LanSettings) -> dict[str, Any]:
    """What the metadata keeps: the plan in force and the settings it was derived from."""
    return {"plan": _doc(plan), "settings": settings.model_dump(mode="json")}


def saved_plan(settings: LanSettings, meta: Mapping[str, Any]) -> LanPlan | None:
    """The plan saved at the last renumbering (`meta["lan"]`), unless the settings changed since."""
    lan = meta.get("lan")
    if not lan or lan.get("settings") != settings.model_dump(mode="json"):
        return None
    doc = lan["plan"]
    return LanPlan(IPv4Network(doc["subnet"]), IPv4Address(doc["gateway"]), IPv4Address(doc["pool_start"]),
                   IPv4Address(doc["pool_end"]), tuple(IPv4Address(d) for d in doc["dns"]))
