"""Day-0 discovery: find the broker from the gateway's Layer-2 beacon, before IPv4 exists.

Theory of operation: one AF_PACKET socket per usable interface (up, not loopback, with a MAC).
A solicit goes out on each at start and every `resolicit` seconds until a beacon is accepted.
A beacon is accepted when its signature verifies with the key it carries, that key is the
pinned one (a provisioned key file, or else the key of the first valid beacon, pinned on first
use), and its (epoch, counter) is above the newest accepted so far (persisted: a replayed
beacon is ignored). The endpoint: the beacon's IPv4 when this device has an address in that
subnet, else the gateway's link-local IPv6 scoped to the interface the beacon came in on, once
the local fe80 address has left its tentative (DAD) state. After discovery the listener keeps
watching: a rogue or malformed frame is reported in the log as it happens, and every later
beacon is handed to the agent, which follows the gateway when its addresses change
(docs/renumbering.md).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from homenet.keys import fingerprint, verify
from homenet.l2 import check_raw_socket, link_local, mac_of, open_socket, receive
from homenet.mqtt import BrokerUrl
from homenet.netutil import ipv4_addresses
from homenet.schemas.beacon import (TYPE_SOLICIT, Beacon, BeaconError, decode_beacon, encode_solicit,
                                    ethernet_frame, frame_type, parse_ethernet)

from .state import StateFile
from .trust import PinnedKey
from .waiting import Waiting

log = logging.getLogger(__name__)


class DiscoveryTimeout(TimeoutError):
    """No acceptable beacon arrived in time."""


@dataclass(frozen=True)
class Discovery:
    broker: BrokerUrl
    verify: list[tuple[str, int]]
    """IPv4 endpoints of the broker, to check reachability after an address change."""
    iface: str
    beacon: Beacon

    @property
    def fingerprint(self) -> str | None:
        """SHA-256 (hex) of the broker certificate, when the gateway offers TLS."""
        return self.beacon.tls[1].hex() if self.beacon.tls else None

    def names(self, host: str) -> bool:
        """Whether the beacon still names `host` (a broker URL's host) as one of the gateway's addresses."""
        ipv4, ipv6_ll = self.beacon.ipv4, self.beacon.ipv6_ll
        return ((ipv4 is not None and host == str(ipv4[0].ip))
                or (ipv6_ll is not None and host == f"{ipv6_ll[0]}%{self.iface}"))


def candidate_interfaces() -> list[str]:
    stats = psutil.net_if_stats()
    return sorted(name for name, st in stats.items()
                  if st.isup and name != "lo" and Path(f"/sys/class/net/{name}/address").exists()
                  and Path(f"/sys/class/net/{name}/address").read_text().strip() not in ("", "00:00:00:00:00:00"))


class BeaconListener:
    def __init__(self, state: StateFile, pinned: PinnedKey, ethertype: int,
                 interfaces: list[str] | None = None, resolicit: float = 2.0,
                 dad_wait: float = 10.0) -> None:
        self.state = state
        self.pinned = pinned
        self.ethertype = ethertype
        self.resolicit = resolicit
        self.dad_wait = dad_wait
        check_raw_socket(ethertype)  # say so at once, even before any interface is up
        self._fixed = interfaces
        self._socks: dict[str, socket.socket] = {}
        self._stop = threading.Event()
        self._rescan()

    def _rescan(self) -> None:
        """Listen on interfaces that came up since (a device may boot before its cable is in)."""
        for iface in self._fixed or candidate_interfaces():
            if iface not in self._socks:
                try:
                    self._socks[iface] = open_socket(iface, self.ethertype)
                except OSError as exc:  # gone again already
                    log.debug("cannot listen on %s: %s", iface, exc)
                    continue
                log.info("listening for the gateway's beacon on %s", iface)

    def solicit(self) -> None:
        for iface, sock in self._socks.items():
            try:
                sock.send(ethernet_frame(mac_of(iface), encode_solicit(), self.ethertype))
            except OSError as exc:
                log.debug("solicit on %s not sent: %s", iface, exc)

    def discover(self, timeout: float | None = None, stop: threading.Event | None = None) -> Discovery | None:
        """The first acceptable beacon; None when `stop` was set first (checked twice a second)."""
        if not self._socks:
            log.warning("no network interface is up yet (up, not loopback, with a MAC); waiting")
        waiting = Waiting(log)
        deadline = None if timeout is None else time.monotonic() + timeout
        next_solicit = 0.0
        try:
            while deadline is None or time.monotonic() < deadline:
                if stop is not None and stop.is_set():
                    return None
                if time.monotonic() >= next_solicit:
                    self._rescan()
                    self.solicit()
                    next_solicit = time.monotonic() + self.resolicit
                    waiting.on(f"the gateway's beacon on {', '.join(self._socks) or 'an interface that comes up'} "
                               f"(EtherType 0x{self.ethertype:04x}, soliciting every {self.resolicit:g} s)")
                for iface, beacon in self._poll(0.5):
                    return Discovery(self._endpoint(iface, beacon), self._verify(beacon), iface, beacon)
        finally:
            waiting.close()
        raise DiscoveryTimeout(f"no beacon from a trusted configurator within {timeout} s")

    def watch(self, follow: Callable[[Discovery], None]) -> None:
        """Keep reading frames in the background until close(): what is ignored is logged, and
        `follow` gets what every accepted beacon leads to."""
        def run() -> None:
            while not self._stop.is_set():
                for iface, beacon in self._poll(0.5):
                    try:
                        found = Discovery(self._endpoint(iface, beacon), self._verify(beacon), iface, beacon)
                    except (BeaconError, DiscoveryTimeout) as exc:
                        log.warning("beacon on %s not followed: %s", iface, exc)
                        continue
                    follow(found)
        threading.Thread(target=run, name="beacon-watch", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        for sock in self._socks.values():
            sock.close()

    def _poll(self, wait: float) -> list[tuple[str, Beacon]]:
        try:
            ready, _, _ = select.select(list(self._socks.values()), [], [], wait)
        except (OSError, ValueError):  # closed under us
            return []
        accepted = []
        for iface, sock in self._socks.items():
            if sock in ready:
                while (frame := receive(sock)) is not None:
                    if (beacon := self._accept(iface, frame)) is not None:
                        accepted.append((iface, beacon))
        return accepted

    def _accept(self, iface: str, frame: bytes) -> Beacon | None:
        src = frame[6:12].hex(":")
        try:
            _, _, _, payload = parse_ethernet(frame)
            if frame_type(payload) == TYPE_SOLICIT:
                return None  # another agent looking, like us
            beacon = decode_beacon(payload, verify)
        except BeaconError as exc:
            log.warning("ignored frame from %s on %s: %s", src, iface, exc)
            return None
        if self.pinned.key is not None and beacon.key != self.pinned.key:
            log.warning("ignored beacon from %s on %s: signed by key %s, but configurator key %s is pinned",
                        src, iface, fingerprint(beacon.key), fingerprint(self.pinned.key))
            return None
        last = (self.state.state.beacon_epoch, self.state.state.beacon_counter)
        if (beacon.epoch, beacon.counter) <= last:
            log.warning("ignored beacon from %s on %s: (epoch %d, counter %d) is not newer than %s",
                        src, iface, beacon.epoch, beacon.counter, last)
            return None
        if self.pinned.key is None:
            self.pinned.pin(beacon.key)
            log.info("pinned configurator key %s (first use) from %s on %s", fingerprint(beacon.key), src, iface)
        self.state.update(beacon_epoch=beacon.epoch, beacon_counter=beacon.counter)
        return beacon

    @staticmethod
    def _verify(beacon: Beacon) -> list[tuple[str, int]]:
        return [(str(beacon.ipv4[0].ip), beacon.ipv4[1])] if beacon.ipv4 else []

    def _endpoint(self, iface: str, beacon: Beacon) -> BrokerUrl:
        """Where to connect; over TLS (the port the beacon names for it) when offered."""
        url = self._address(iface, beacon)
        return BrokerUrl(url.host, beacon.tls[0], tls=True) if beacon.tls else url

    def _address(self, iface: str, beacon: Beacon) -> BrokerUrl:
        if beacon.ipv4:
            gateway, port = beacon.ipv4
            if any(mine.ip in gateway.network for mine in ipv4_addresses(iface)):
                return BrokerUrl(str(gateway.ip), port)
        if beacon.ipv6_ll:
            address, port = beacon.ipv6_ll
            deadline = time.monotonic() + self.dad_wait
            while (mine := link_local(iface)) is None or not mine[1]:
                if time.monotonic() > deadline:
                    raise DiscoveryTimeout(f"{iface} has no usable link-local address after {self.dad_wait} s")
                time.sleep(0.02)  # tentative during DAD, one to two seconds after link-up
            return BrokerUrl(f"{address}%{iface}", port)
        if beacon.ipv4:
            return BrokerUrl(str(beacon.ipv4[0].ip), beacon.ipv4[1])
        raise BeaconError("beacon names no broker endpoint")
