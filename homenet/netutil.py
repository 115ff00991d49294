"""Small network helpers shared by the gateway, the agent, the demo, the benchmark and the tests."""

from __future__ import annotations

import socket
from ipaddress import IPv4Interface

import psutil


def free_port() -> int:
    """A TCP port free on loopback right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ipv4_addresses(iface: str) -> list[IPv4Interface]:
    """The interface's IPv4 addresses with their prefix, primary first; none for an absent interface."""
    return [IPv4Interface(f"{a.address}/{a.netmask}") for a in psutil.net_if_addrs().get(iface, [])
            if a.family == socket.AF_INET and a.netmask]
