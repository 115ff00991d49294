"""The `linux` gateway driver: the configurator sets up the Linux gateway it runs on.

Theory of operation: the driver keeps what every device wants from the gateway and, on every
change, makes the gateway match all of it, part by part: homenet's nftables table (port
forwards, DSCP marks), the WAN's htb tree, dnsmasq's hosts file, the igmpproxy process. Each
part is idempotent and independent: one that fails is left as it was (nftables changes are a
single transaction) while the others go ahead, and it is retried. All work happens on one
thread, in order: `apply` and `remove` hand it their change and wait for the outcome; a failed
part is retried on that thread with backoff (1 s, doubling, up to `retry_max`), and what the
retries achieve is reported through the GatewayReporter. `state()` lists, per part, what was
last put in force, not what is merely wanted. `observe` reads the LAN interface's addresses,
so the configurator notices a renumbered LAN (docs/renumbering.md); `set_lan` restarts
igmpproxy, which takes the interfaces' addresses only when it starts; `actual()` reads back what is in force now
(homenet's nftables table, the htb classes, the hosts file of a running dnsmasq, igmpproxy's
process), whoever changed it since, for reconciliation.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from ipaddress import IPv4Interface

from homenet.netutil import ipv4_addresses
from homenet.schemas.messages import Config, GatewayState, ItemResult, ItemStatus, Reservation, Severity
from homenet.settings import GatewayDriverSettings

from ..gateway import DeviceWants, GatewayReporter, gateway_state, wants_of
from ..ipam import LanPlan
from . import GatewayError, dnsmasq, htb, igmpproxy, nftables

log = logging.getLogger(__name__)

PARTS_OF_ITEM: dict[str, tuple[str, ...]] = {
    "reservation": ("dnsmasq",), "port_mapping": ("nftables",), "qos": ("nftables", "htb"), "igmp": ("igmpproxy",)}
"""Which parts of the gateway carry each kind of item (an item key's text before `:`)."""
PARTS = ("nftables", "htb", "dnsmasq", "igmpproxy")
SUBMIT_TIMEOUT = 120.0
_RETRY = object()


@dataclass
class _Job:
    change: Callable[[], object]
    outcome: Future[dict[str, str]] = field(default_factory=Future)


class LinuxGatewayDriver:
    name = "linux"

    def __init__(self, lan: LanPlan, settings: GatewayDriverSettings, reporter: GatewayReporter | None = None) -> None:
        self._lan = lan
        self.settings = settings
        self.reporter = reporter or GatewayReporter()
        self._wants: dict[str, DeviceWants] = {}
        nothing = gateway_state(self.name, lan, ())
        self._in_force: dict[str, GatewayState] = dict.fromkeys(PARTS, nothing)
        self._failures: dict[str, str] = {}
        self._attempt = 0
        self._dnsmasq = dnsmasq.Dnsmasq(settings.dnsmasq_hosts, settings.dnsmasq_pidfile)
        self._proxy = igmpproxy.IgmpProxy(settings.igmpproxy, settings.igmpproxy_conf)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        """Changes to make; None stops the worker."""
        self._thread = threading.Thread(target=self._work, name="gateway-linux", daemon=True)
        self._thread.start()

    # --- GatewayDriver -------------------------------------------------------------------

    def lan(self) -> LanPlan:
        return self._lan

    def observe(self) -> list[IPv4Interface]:
        return ipv4_addresses(self.settings.lan_interface)

    def set_lan(self, lan: LanPlan) -> None:
        def renumbered() -> None:
            self._lan = lan
            self._proxy.stop()  # the next sync starts it again when a device needs it
        self._submit(renumbered)

    def apply(self, config: Config) -> list[ItemResult]:
        wants = wants_of(config)
        failures = self._submit(lambda: self._wants.__setitem__(config.device_id, wants))
        return [_result(key, wants, failures) for key in wants.items]

    def remove(self, device_id: str) -> None:
        failures = self._submit(lambda: self._wants.pop(device_id, None))
        for part, reason in failures.items():  # remove() has no results to carry them
            self.reporter.event("gateway.failed", Severity.ERROR, f"removing {device_id}: {part}: {reason}")

    def state(self) -> GatewayState:
        done = self._in_force
        return GatewayState(driver=self.name, lan=str(self._lan.subnet),
                            reservations=done["dnsmasq"].reservations,
                            port_mappings=done["nftables"].port_mappings, qos=done["nftables"].qos,
                            igmp_proxy=done["igmpproxy"].igmp_proxy, igmp_devices=done["igmpproxy"].igmp_devices)

    def actual(self) -> GatewayState | None:
        """Read back from the gateway; reservations are told apart by MAC (the hosts file names
        no device). None, with a log line, when something cannot be read."""
        wan = self.settings.wan_interface
        try:
            mappings, qos = nftables.listed(wan)
            if qos:  # a mark selects a class that must exist
                classes = htb.classes(wan)
                qos = [q for q in qos if htb.classid(q.qos_class) in classes]
            hosts = self._dnsmasq.in_force()
        except GatewayError as exc:
            log.warning("cannot read back what is in force on the gateway: %s", exc)
            return None
        owners = {w.reservation.mac: w.device_id for w in self._wants.values() if w.reservation and w.reservation.mac}
        igmp = self._proxy.running()
        return GatewayState(driver=self.name, lan=str(self._lan.subnet), port_mappings=mappings, qos=qos,
                            reservations=[Reservation(device_id=owners[mac], mac=mac, address=address)
                                          for mac, address in hosts if mac in owners],
                            igmp_proxy=igmp, igmp_devices=sorted(d for d, w in self._wants.items() if w.igmp and igmp))

    def close(self) -> None:
        """Stop the worker and igmpproxy; rules and reservations stay (the gateway keeps working)."""
        self._jobs.put(None)
        self._thread.join(10)

    # --- the worker ----------------------------------------------------------------------

    def _submit(self, change: Callable[[], object]) -> dict[str, str]:
        job = _Job(change)
        self._jobs.put(job)
        return job.outcome.result(SUBMIT_TIMEOUT)

    def _work(self) -> None:
        delay: float | None = None
        while True:
            try:
                job = self._jobs.get(timeout=delay)
            except queue.Empty:
                job = _RETRY
            if job is None:
                self._proxy.stop()
                return
            try:
                if job is _RETRY:
                    self._retry()
                else:
                    job.change()
                    job.outcome.set_result(self._sync())
            except Exception as exc:  # a bug must not stop the worker, nor leave a caller waiting
                log.exception("gateway driver: internal error")
                if job is not _RETRY:
                    job.outcome.set_exception(exc)
            delay = self._backoff()
            if self._proxy.starting():  # look again once igmpproxy has had time to fail
                delay = igmpproxy.STARTUP_GRACE if delay is None else min(delay, igmpproxy.STARTUP_GRACE)

    def _sync(self) -> dict[str, str]:
        """Make every part match what all devices want; the reasons of the parts that failed."""
        desired = gateway_state(self.name, self._lan, self._wants.values())
        s = self.settings
        steps: dict[str, Callable[[], None]] = {
            "nftables": lambda: nftables.apply(nftables.render(desired, s.wan_interface)),
            "htb": lambda: htb.ensure(s.wan_interface, s.wan_rate_kbit) if desired.qos else None,
            "dnsmasq": lambda: self._dnsmasq.load(dnsmasq.render_hosts(desired.reservations)),
            "igmpproxy": lambda: self._proxy.ensure(desired.igmp_proxy, igmpproxy.render_conf(
                s.wan_interface, s.lan_interface, (name for _, name in socket.if_nameindex()))),
        }
        failures: dict[str, str] = {}
        for part, step in steps.items():
            try:
                step()
                self._in_force[part] = desired
            except GatewayError as exc:
                failures[part] = str(exc)
                log.warning("gateway %s: %s", part, exc)
        self._failures = failures
        return failures

    def _backoff(self) -> float | None:
        """Seconds until the next retry; None when nothing failed."""
        if not self._failures:
            self._attempt = 0
            return None
        self._attempt += 1
        return min(2.0 ** (self._attempt - 1), self.settings.retry_max)

    def _retry(self) -> None:
        """Another try with the same wants (or a look at a starting igmpproxy); report recovery,
        a new reason, every device's items that it changes, and a changed state."""
        before, state = self._failures, self.state()
        failures = self._sync()
        if before and not failures:
            self.reporter.event("gateway.recovered", Severity.INFO,
                                f"in force again after {self._attempt} retries: {', '.join(sorted(before))}")
        elif failures and failures != before:
            self.reporter.event("gateway.failed", Severity.ERROR,
                                "; ".join(f"{part}: {reason}" for part, reason in sorted(failures.items())))
        if failures != before:
            for wants in self._wants.values():
                self.reporter.items(wants.device_id, [_result(key, wants, failures) for key in wants.items])
        if self.state() != state:
            self.reporter.changed()

def _result(key: str, wants: DeviceWants, failures: dict[str, str]) -> ItemResult:
    if key == "reservation" and wants.reservation and wants.reservation.mac is None:
        return ItemResult(item=key, status=ItemStatus.UNSUPPORTED, detail="no MAC address to reserve by")
    failed = [f"{part}: {failures[part]}" for part in PARTS_OF_ITEM[key.split(":")[0]] if part in failures]
    if failed:
        return ItemResult(item=key, status=ItemStatus.FAILED, detail="; ".join(failed)[:1024])
    detail = str(wants.reservation.address) if key == "reservation" and wants.reservation else ""
    return ItemResult(item=key, status=ItemStatus.APPLIED, detail=detail)
