"""What the device is and has, read from the running system.

psutil is imported on first use: an agent with the simulated collector never loads it.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Protocol

from homenet.schemas.messages import Interface


class Collector(Protocol):
    def hostname(self) -> str: ...
    def interfaces(self) -> list[Interface]: ...


def _cidr(address: str, netmask: str | None) -> str | None:
    """`192.168.1.5` + `255.255.255.0` -> `192.168.1.5/24`; psutil's `%iface` scope dropped."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        prefix = bin(int(ipaddress.ip_address(netmask))).count("1") if netmask else ip.max_prefixlen
    except ValueError:
        return None
    return f"{ip}/{prefix}"


class LinuxCollector:
    """Interfaces, MACs and addresses from the kernel (through psutil's netlink/ioctl calls)."""

    def hostname(self) -> str:
        return socket.gethostname()

    def interfaces(self) -> list[Interface]:
        import psutil

        stats = psutil.net_if_stats()
        found = []
        for name, addrs in sorted(psutil.net_if_addrs().items()):
            mac = next((a.address.lower() for a in addrs if a.family == psutil.AF_LINK), None)
            cidrs = [c for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)
                     if (c := _cidr(a.address, a.netmask))]
            found.append(Interface(name=name[:32], mac=mac if mac and len(mac) == 17 else None,
                                   up=bool(stats.get(name) and stats[name].isup), addresses=cidrs))
        return found
