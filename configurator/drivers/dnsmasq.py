"""DHCP reservations through dnsmasq: a hosts file homenet owns, re-read on SIGHUP.

dnsmasq is told about the file once, in its own configuration (`dhcp-hostsfile=PATH`); homenet
rewrites the whole file atomically and signals the pid in dnsmasq's pidfile. A reserved address
lies outside the DHCP pool but inside the subnet of a `dhcp-range`, which dnsmasq requires.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path

from homenet.durable import write_atomic
from homenet.schemas.messages import Reservation

from . import GatewayError

HEADER = "# written by homenet (configurator gateway driver `linux`); do not edit\n"


def render_hosts(reservations: Iterable[Reservation]) -> str:
    """`MAC,ADDRESS` per reserved device, ordered by address; devices without a MAC cannot be reserved."""
    lines = [f"{r.mac},{r.address}\n" for r in sorted(reservations, key=lambda r: r.address) if r.mac]
    return HEADER + "".join(lines)


def parse_hosts(text: str) -> list[tuple[str, IPv4Address]]:
    """(MAC, address) of every `MAC,ADDRESS` line, as `render_hosts` writes them; others skipped."""
    found = []
    for line in text.splitlines():
        mac, _, address = line.strip().partition(",")
        try:
            found.append((mac, IPv4Address(address)))
        except ValueError:  # the header, a comment, a line of another shape
            continue
    return found


def running_pid(pidfile: Path) -> int:
    """dnsmasq's pid, checked against /proc so a stale pidfile never gets another process signalled."""
    try:
        pid = int(Path(pidfile).read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        raise GatewayError(f"dnsmasq is not running (no live pid in {pidfile})") from None
    if comm != "dnsmasq":
        raise GatewayError(f"dnsmasq is not running (pid {pid} in {pidfile} is {comm})")
    return pid


class Dnsmasq:
    """The hosts file and the dnsmasq process that reads it."""

    def __init__(self, hostsfile: Path, pidfile: Path) -> None:
        self.hostsfile = Path(hostsfile)
        self.pidfile = Path(pidfile)
        self._loaded: tuple[int, str] | None = None
        """(pid, content) dnsmasq was last made to read."""

    def load(self, content: str) -> None:
        """Write the file when it differs, then make sure the running dnsmasq has read it.

        The file is written even when dnsmasq is down, so a dnsmasq started later reads it; the
        reservation is reported failed until a running dnsmasq has it.
        """
        try:
            rewritten = not self.hostsfile.exists() or self.hostsfile.read_text() != content
            if rewritten:  # a new reservation, or the file was changed behind homenet's back
                write_atomic(self.hostsfile, content.encode(), 0o644)
        except OSError as exc:
            raise GatewayError(f"cannot write {self.hostsfile}: {exc.strerror}") from None
        pid = running_pid(self.pidfile)
        if self._loaded == (pid, content) and not rewritten:
            return
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            raise GatewayError(f"cannot signal dnsmasq (pid {pid}): {exc.strerror}") from None
        self._loaded = (pid, content)

    def in_force(self) -> list[tuple[str, IPv4Address]]:
        """(MAC, address) of the reservations in the file a running dnsmasq reads; none while it is down."""
        try:
            running_pid(self.pidfile)
            return parse_hosts(self.hostsfile.read_text())
        except (GatewayError, FileNotFoundError):
            return []
        except OSError as exc:
            raise GatewayError(f"cannot read {self.hostsfile}: {exc.strerror}") from None
