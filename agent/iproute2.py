"""The `iproute2` executor: applies an `ipv4` item to the running system over netlink.

It does what `ip addr` / `ip route` would, through pyroute2 rather than by running `ip`: no
binary to depend on, and failures arrive as errno values rather than text to parse. It is for
devices whose addresses nothing else manages; under NetworkManager or systemd-networkd the
manager would fight it.

Only IPv4 is touched: the IPv6 link-local address the MQTT session may be running over (the
broker found through the Layer-2 beacon) must survive any IPv4 change. An item is all or
nothing as to the address and default route: when a step fails, the settings seen before the
item are put back. DNS servers are then set the host's way (agent/dns.py: systemd-resolved,
resolvconf or a file); DNS that cannot be set costs neither the address nor the route, the
item's detail says why. `checkpoint` and `rollback` cover everything `apply` changes: the IPv4
addresses of every interface, the main table's IPv4 default routes and the DNS servers.

pyroute2 is imported by the methods that talk netlink, not with this module: it costs about
14 MB of resident memory, and every agent with executor `auto` asks `usable()` (which reads
/proc) without necessarily applying anything; an agent restarted with its config applied
never loads it (docs/performance.md, Footprint).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from homenet.schemas.messages import ConfigItem, Ipv4Item, ItemResult, ItemStatus, item_key

from .dns import Dns, DnsError, detect
from .executor import ExecutorError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

MAIN_TABLE = 254
RTN_UNICAST = 1
IFF_UP = 0x1
CAP_NET_ADMIN = 12


def usable() -> bool:
    """Whether this process can change network settings: Linux, CAP_NET_ADMIN in effect.

    Root normally has it; so does a service given `AmbientCapabilities=CAP_NET_ADMIN`. Root in
    a container without the capability does not, and correctly gets `False`.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    effective = next((line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0")
    return bool(int(effective, 16) >> CAP_NET_ADMIN & 1)


# --- the state this executor reads and restores ---------------------------------------------

@dataclass(frozen=True)
class Address:
    address: str
    prefix_len: int
    broadcast: str | None = None

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix_len}"

    def netlink(self) -> dict[str, Any]:
        return dict(address=self.address, prefixlen=self.prefix_len,
                    **({"broadcast": self.broadcast} if self.broadcast else {}))


@dataclass(frozen=True)
class DefaultRoute:
    gateway: str | None
    oif: int | None
    metric: int
    proto: int

    def netlink(self) -> dict[str, Any]:
        return dict(dst="0.0.0.0/0", gateway=self.gateway, oif=self.oif, priority=self.metric,
                    proto=self.proto, table=MAIN_TABLE)


@dataclass(frozen=True)
class Iproute2Checkpoint:
    addresses: dict[int, tuple[Address, ...]]
    """IPv4 addresses per interface index, in the kernel's order (primary first); every
    interface present, so one that had none gets its new addresses removed again."""
    default_routes: frozenset[DefaultRoute]
    dns: object
    """The DNS way's own snapshot (agent/dns.py)."""


def _addresses(ipr: IPRoute, index: int | None = None) -> dict[int, tuple[Address, ...]]:
    found: dict[int, list[Address]] = {}
    for msg in ipr.get_addr(family=socket.AF_INET, **({} if index is None else {"index": index})):
        found.setdefault(msg["index"], []).append(
            Address(msg.get("local") or msg.get("address"), msg["prefixlen"], msg.get("broadcast")))
    return {i: tuple(a) for i, a in found.items()}


def _default_routes(ipr: IPRoute) -> frozenset[DefaultRoute]:
    return frozenset(DefaultRoute(r.get("gateway"), r.get("oif"), r.get("priority") or 0, r["proto"])
                     for r in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
                     if r["dst_len"] == 0 and r["type"] == RTN_UNICAST)


def _why(exc: Exception) -> str:
    from pyroute2 import NetlinkError

    if isinstance(exc, NetlinkError):
        text = exc.args[1] if len(exc.args) > 1 else os.strerror(exc.code)
        return f"{text} (netlink errno {exc.code})"
    return str(exc)


class _ItemFailed(Exception):
    """An item that cannot be applied as asked, before anything was changed."""


# --- the executor ----------------------------------------------------------------------------

class Iproute2Executor:
    """Sets an interface's IPv4 address, the default route and the DNS servers over netlink."""

    name = "iproute2"

    def __init__(self, dns: Dns | None = None) -> None:
        self.dns = dns if dns is not None else detect()
        self._configured: dict[str, tuple[int, str]] = {}
        """Item key -> (interface index, name) it was applied to: what `in_force` reports."""

    def apply(self, item: ConfigItem) -> ItemResult:
        key = item_key(item)
        if not isinstance(item, Ipv4Item):
            return ItemResult(item=key, status=ItemStatus.UNSUPPORTED,
                              detail=f"the iproute2 executor does not apply {item.kind}")
        from pyroute2 import IPRoute, NetlinkError

        try:
            with IPRoute() as ipr:
                status, detail = self._apply_ipv4(ipr, item)
        except _ItemFailed as exc:
            status, detail = ItemStatus.FAILED, str(exc)
        except (NetlinkError, OSError, DnsError) as exc:  # netlink itself unusable, or DNS unreadable
            status, detail = ItemStatus.FAILED, f"reading the network settings: {_why(exc)}"
        return ItemResult(item=key, status=status, detail=detail)

    def _apply_ipv4(self, ipr: IPRoute, item: Ipv4Item) -> tuple[ItemStatus, str]:
        """Address and default route all or nothing; then DNS, whose failure costs neither:
        the device is reachable without it, and the detail says what is missing."""
        from pyroute2 import NetlinkError

        index, name = self._find_interface(ipr, item)
        cidr, gateway = f"{item.address}/{item.prefix_len}", str(item.gateway)
        dns = [str(server) for server in item.dns]
        changed = self._ipv4_state(ipr, index) != ({cidr}, {(gateway, 0)})
        if changed:
            before = self._checkpoint(ipr)
            doing = ""
            try:
                for address in reversed(_addresses(ipr, index).get(index, ())):  # secondaries first:
                    if str(address) != cidr:  # removing a primary would take its secondaries along
                        doing = f"removing {address} from {name}"
                        ipr.addr("del", index=index, **address.netlink())
                # re-read: the item's address may have been a secondary of a primary removed above
                if cidr not in {str(a) for a in _addresses(ipr, index).get(index, ())}:
                    doing = f"adding {cidr} to {name}"
                    broadcast = ipaddress.IPv4Network(cidr, strict=False).broadcast_address
                    new = Address(str(item.address), item.prefix_len, str(broadcast) if item.prefix_len < 31 else None)
                    ipr.addr("add", index=index, **new.netlink())
                doing = f"setting the default route via {gateway} on {name}"
                ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=index, table=MAIN_TABLE)
                for route in _default_routes(ipr):
                    if route.oif == index and (route.gateway, route.metric) != (gateway, 0):
                        doing = f"removing the default route via {route.gateway} (metric {route.metric}) from {name}"
                        ipr.route("del", **route.netlink())
            except (NetlinkError, OSError) as exc:
                detail = f"{doing}: {_why(exc)}"
                try:
                    self._restore(ipr, before)
                except ExecutorError as undo:
                    return ItemStatus.FAILED, f"{detail}; restoring the previous settings failed: {undo}"
                return ItemStatus.FAILED, f"{detail}; previous settings restored"
        self._configured[item_key(item)] = (index, name)
        problem = ""
        if dns:  # no servers in the item: those in force are left alone
            try:
                if self.dns.servers(name) != dns:
                    self.dns.set(name, dns)
                    changed = True
            except DnsError as exc:
                problem = f"address and route set; DNS not set ({self.dns.name}): {exc}"
        return (ItemStatus.APPLIED if changed else ItemStatus.UNCHANGED), problem

    @staticmethod
    def _find_interface(ipr: IPRoute, item: Ipv4Item) -> tuple[int, str]:
        """By name; else by the item's MAC (the name may differ on the device, e.g. after a rename)."""
        indexes = ipr.link_lookup(ifname=item.interface)
        if not indexes and item.mac:
            indexes = ipr.link_lookup(address=item.mac)
            if not indexes:
                raise _ItemFailed(f"interface {item.interface} not found, nor one with MAC {item.mac}")
            if len(indexes) > 1:
                raise _ItemFailed(f"interface {item.interface} not found, and MAC {item.mac} is on "
                                  f"{len(indexes)} interfaces (a bridge and its port?)")
        if not indexes:
            raise _ItemFailed(f"interface {item.interface} not found")
        link = ipr.get_links(indexes[0])[0]
        name = link.get("ifname")
        if not link["flags"] & IFF_UP:
            raise _ItemFailed(f"interface {name} is down")
        return indexes[0], name

    @staticmethod
    def _ipv4_state(ipr: IPRoute, index: int) -> tuple[set[str], set[tuple[str | None, int]]]:
        """(addresses, default routes as (gateway, metric)) of one interface."""
        return ({str(a) for a in _addresses(ipr, index).get(index, ())},
                {(r.gateway, r.metric) for r in _default_routes(ipr) if r.oif == index})

    # --- checkpoint and rollback -------------------------------------------------------------

    def checkpoint(self) -> Iproute2Checkpoint:
        from pyroute2 import IPRoute, NetlinkError

        try:
            with IPRoute() as ipr:
                return self._checkpoint(ipr)
        except (NetlinkError, OSError) as exc:
            raise ExecutorError(f"cannot read the network settings: {_why(exc)}") from exc

    def _checkpoint(self, ipr: IPRoute) -> Iproute2Checkpoint:
        addresses = {link["index"]: () for link in ipr.get_links()} | _addresses(ipr)
        try:
            dns = self.dns.snapshot()
        except DnsError as exc:
            raise ExecutorError(f"cannot read the DNS settings: {exc}") from exc
        return Iproute2Checkpoint(addresses, _default_routes(ipr), dns)

    def rollback(self, checkpoint: Iproute2Checkpoint) -> None:
        from pyroute2 import IPRoute, NetlinkError

        try:
            with IPRoute() as ipr:
                self._restore(ipr, checkpoint)
        except (NetlinkError, OSError) as exc:
            raise ExecutorError(f"cannot reach netlink: {_why(exc)}") from exc

    def _restore(self, ipr: IPRoute, checkpoint: Iproute2Checkpoint) -> None:
        """Every step is tried, so one failure does not leave the rest unrestored."""
        from pyroute2 import NetlinkError

        problems: list[str] = []

        def attempt(what: str, action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
            try:
                action(*args, **kwargs)
            except (NetlinkError, OSError, DnsError) as exc:
                problems.append(f"{what}: {_why(exc)}")

        present = {link["index"] for link in ipr.get_links()}  # an interface gone has nothing to restore
        now = _addresses(ipr)
        for index, wanted in checkpoint.addresses.items():
            if index not in present:
                continue
            for a in reversed(now.get(index, ())):  # secondaries first, as in apply
                if a not in wanted:
                    attempt(f"removing {a}", ipr.addr, "del", index=index, **a.netlink())
            for a in wanted:  # in order, and re-read: the primary comes back first
                if a not in _addresses(ipr, index).get(index, ()):
                    attempt(f"restoring {a}", ipr.addr, "add", index=index, **a.netlink())
        for route in _default_routes(ipr) - checkpoint.default_routes:
            attempt(f"removing the default route via {route.gateway}", ipr.route, "del", **route.netlink())
        for route in checkpoint.default_routes - _default_routes(ipr):
            attempt(f"restoring the default route via {route.gateway}", ipr.route, "replace", **route.netlink())
        attempt("restoring DNS", self.dns.restore, checkpoint.dns)
        if problems:
            raise ExecutorError("; ".join(problems))

    # --- reporting ---------------------------------------------------------------------------

    def in_force(self) -> dict[str, Any]:
        """The real state of the interfaces this executor configured (this run of the agent)."""
        if not self._configured:
            return {}
        from pyroute2 import IPRoute, NetlinkError

        try:
            with IPRoute() as ipr:
                links = {link["index"]: link for link in ipr.get_links()}
                addresses, routes = _addresses(ipr), _default_routes(ipr)
        except (NetlinkError, OSError) as exc:
            return {"error": f"cannot read the network settings: {_why(exc)}"}
        report: dict[str, Any] = {}
        for key, (index, name) in self._configured.items():
            if index not in links:
                report[key] = {"interface": name, "present": False}
                continue
            gateways = sorted((r.metric, r.gateway) for r in routes if r.oif == index and r.gateway)
            report[key] = {"interface": links[index].get("ifname"), "mac": links[index].get("address"),
                           "addresses": [str(a) for a in addresses.get(index, ())],
                           "gateway": gateways[0][1] if gateways else None, "dns": self._dns_of(name)}
        return report

    def _dns_of(self, ifname: str) -> list[str] | str:
        try:
            return self.dns.servers(ifname)
        except DnsError as exc:
            return f"unknown: {exc}"
