"""AF_PACKET sockets for the beacon: one per interface, bound to the beacon EtherType."""

from __future__ import annotations

import socket
from pathlib import Path

PACKET_OUTGOING = 4  # linux/if_packet.h: a frame we sent ourselves, looped back to us

CAP_NET_RAW_HELP = (
    "listening for the gateway's Layer-2 beacon needs CAP_NET_RAW: run as root, or under "
    "systemd with AmbientCapabilities=CAP_NET_RAW (packaging/homenet-agent.service), "
    "or skip discovery with --broker URL")


class NoRawSocket(PermissionError):
    """The process lacks CAP_NET_RAW; the text says how to grant it."""


def _raw(ethertype: int) -> socket.socket:
    try:
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    except PermissionError:
        raise NoRawSocket(CAP_NET_RAW_HELP) from None


def check_raw_socket(ethertype: int) -> None:
    """Raise NoRawSocket now if this process may not open raw sockets."""
    _raw(ethertype).close()


def open_socket(iface: str, ethertype: int) -> socket.socket:
    sock = _raw(ethertype)
    try:
        sock.bind((iface, ethertype))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def mac_of(iface: str) -> bytes:
    return bytes.fromhex(Path(f"/sys/class/net/{iface}/address").read_text().strip().replace(":", ""))


def receive(sock: socket.socket) -> bytes | None:
    """One frame that someone else sent, or None (our own looped-back frame, nothing pending)."""
    try:
        data, address = sock.recvfrom(65535)
    except (BlockingIOError, InterruptedError):
        return None
    return None if address[2] == PACKET_OUTGOING else data


def link_local(iface: str) -> tuple[str, bool] | None:
    """The interface's fe80 address and whether it is usable (not tentative, DAD not failed)."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hexaddr, _index, _plen, scope, flags, name = line.split()
        if name == iface and scope == "20":  # link scope
            address = ":".join(hexaddr[i:i + 4] for i in range(0, 32, 4))
            usable = not int(flags, 16) & (0x40 | 0x08)  # IFA_F_TENTATIVE | IFA_F_DADFAILED
            return address, usable
    return None
