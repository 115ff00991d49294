"""What `homenet gateway run` checks before it creates anything: the gateway extra is
installed, every listener can be bound, the beacon's interfaces exist and raw sockets may be
opened, the data directory can be written.

Each problem is one line naming the listener or path and what would help; found before the
data directory, its key and its secrets are made, so a mistake leaves nothing behind.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import pwd
import socket
from pathlib import Path

from homenet import DISTRIBUTION


class PreflightError(Exception):
    """Something the gateway needs and does not have; the text says what and how to fix it."""


def need_gateway_extra(command: str) -> None:
    """The broker and the TLS certificate come from the `gateway` extra, absent from the
    plain (agent) install."""
    missing = [m for m in ("amqtt", "cryptography") if importlib.util.find_spec(m) is None]
    if missing:
        raise PreflightError(f"`{command}` needs the gateway extra ({', '.join(missing)} not installed): "
                             f"pip install '{DISTRIBUTION}[gateway]' (in a checkout: '.[gateway]')")


def check_binds(binds: list[str]) -> None:
    """Bind each `HOST:PORT` for a moment, as amqtt will (SO_REUSEADDR, IPV6_V6ONLY)."""
    for bind in binds:
        host, _, port = bind.rpartition(":")
        try:
            infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise PreflightError(f"listener {bind}: host {host!r} not found ({exc.strerror})") from None
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise PreflightError(f"listener {bind}: {_bind_problem(exc, int(port))}") from None


def _bind_problem(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use (another broker? see `ss -ltnp 'sport = :{port}'`)"
    if exc.errno == errno.EACCES:
        return f"port {port} is below 1024: it needs root or CAP_NET_BIND_SERVICE"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "that address is not on this host"
    return exc.strerror or str(exc)


def check_beacon(interfaces: list[str], ethertype: int) -> None:
    """Each beacon interface exists, and this process may open raw sockets to send on it."""
    from homenet.l2 import NoRawSocket, check_raw_socket

    for name in interfaces:
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise PreflightError(f"beacon interface {name} not found (the LAN bridge, e.g. br0: see `ip link`; "
                                 "--beacon-interface or beacon.interfaces)") from None
    if interfaces:
        try:
            check_raw_socket(ethertype)
        except NoRawSocket:
            raise PreflightError(f"the beacon on {', '.join(interfaces)} needs CAP_NET_RAW: run as root, or under "
                                 "systemd with AmbientCapabilities=CAP_NET_RAW (packaging/homenet-gateway.service), "
                                 "or send none (beacon.interfaces = [])") from None


def check_writable(data_dir: Path) -> None:
    """The data directory, or the nearest existing parent it would be made in, is writable."""
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"data directory {data_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == data_dir else f" cannot be made: {existing}"
        raise PreflightError(f"data directory {data_dir}{where} is not writable by user {_user()} "
                             "(give --data-dir, or configurator.data_dir in the settings file)")


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
