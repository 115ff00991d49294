"""The gateway's beacon sender: leads agents to the broker before they have IPv4.

Theory of operation: one AF_PACKET socket per LAN interface. A beacon goes out on every
interface at start, then every `fast_period` seconds `fast_count` times (frames on Wi-Fi get
lost), then every `slow_period` seconds; a solicit from an agent is answered at once on the
interface it came in on (at most one answer per interface per `answer_gap` seconds, so a
flood of solicits cannot make us flood the LAN). Each beacon is built at send time from the
interface's current addresses, numbered (epoch, counter) and signed with the configurator key.
When an interface's IPv4 address changes (the LAN was renumbered), `renumbered` is called
first (the broker drops the connections to the old address) and then a beacon goes out at once
and the fast phase starts again: agents reconnect and verify their new settings against the
address it names.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from homenet.keys import KeyPair
from homenet.l2 import link_local, mac_of, open_socket, receive
from homenet.netutil import ipv4_addresses
from homenet.schemas.beacon import (ETHERTYPE, TYPE_SOLICIT, Beacon, BeaconError, encode_beacon,
                                    ethernet_frame, frame_type, parse_ethernet)

log = logging.getLogger(__name__)


def _ipv4_of(iface: str) -> ipaddress.IPv4Interface | None:
    """The address a beacon names: the interface's primary IPv4 address."""
    return next(iter(ipv4_addresses(iface)), None)


class BeaconSender:
    def __init__(self, interfaces: list[str], key: KeyPair, epoch: int, port: int, root: str,
                 ethertype: int = ETHERTYPE, fast_period: float = 1.0, fast_count: int = 10,
                 slow_period: float = 10.0, answer_gap: float = 0.2,
                 tls: tuple[int, bytes] | None = None, renumbered: Callable[[], None] | None = None) -> None:
        """`tls`: the TLS port and the SHA-256 of the broker's certificate, when TLS is on;
        `renumbered()`: what must happen before agents hear of an interface's new IPv4 address."""
        self.key, self.epoch, self.port, self.root, self.tls = key, epoch, port, root, tls
        self.renumbered = renumbered
        self.ethertype = ethertype
        self.fast_period, self.fast_count, self.slow_period = fast_period, fast_count, slow_period
        self.answer_gap = answer_gap
        self.counter = 0
        self._socks = {iface: open_socket(iface, ethertype) for iface in interfaces}
        self._last_answer: dict[str, float] = {}
        self._announced: dict[str, ipaddress.IPv4Interface | None] = {}
        """The IPv4 address each interface's last beacon named."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beacon", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("beacon on %s (EtherType 0x%04x, epoch %d)", ", ".join(self._socks), self.ethertype, self.epoch)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self._socks.values():
            sock.close()

    def beacon(self, iface: str) -> bytes:
        self.counter += 1
        ip = self._announced[iface] = _ipv4_of(iface)  # first: a send that fails still counts as told
        ll = link_local(iface)
        beacon = Beacon(epoch=self.epoch, counter=self.counter, key=self.key.public, root=self.root, tls=self.tls,
                        ipv4=(ip, self.port) if ip else None,
                        ipv6_ll=(ipaddress.IPv6Address(ll[0]), self.port) if ll else None)
        return ethernet_frame(mac_of(iface), encode_beacon(beacon, self.key.sign), self.ethertype)

    def _send(self, iface: str) -> None:
        try:
            self._socks[iface].send(self.beacon(iface))
        except OSError as exc:  # interface down or gone: keep serving the others
            log.warning("beacon on %s not sent: %s", iface, exc)

    def _run(self) -> None:
        sent = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if any(_ipv4_of(iface) != self._announced.get(iface) for iface in self._socks):
                sent, next_at = 0, now  # renumbered: tell the agents now, and again soon
                if self.renumbered is not None and self._announced:
                    try:
                        self.renumbered()
                    except Exception:  # the beacon must go out all the same
                        log.exception("before announcing a new address")
            if now >= next_at:
                for iface in self._socks:
                    self._send(iface)
                sent += 1
                next_at = now + (self.fast_period if sent < self.fast_count else self.slow_period)
            ready, _, _ = select.select(list(self._socks.values()), [], [], min(0.5, max(0.0, next_at - now)))
            for iface, sock in self._socks.items():
                if sock in ready:
                    self._answer(iface, sock)

    def _answer(self, iface: str, sock: socket.socket) -> None:
        while (frame := receive(sock)) is not None:
            try:
                _, src, _, payload = parse_ethernet(frame)
                if frame_type(payload) != TYPE_SOLICIT:
                    continue
            except BeaconError as exc:
                log.debug("ignored frame on %s: %s", iface, exc)
                continue
            now = time.monotonic()
            if now - self._last_answer.get(iface, 0.0) >= self.answer_gap:
                self._last_answer[iface] = now
                log.debug("solicit from %s on %s: answering", src.hex(":"), iface)
                self._send(iface)
