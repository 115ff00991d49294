"""Reconciliation: what each device should have (the database) vs. what is reported in force.

Theory of operation. The desired state of a device is its current config. Three witnesses
report the actual state: the device's `info` (its addresses now), its `config.result` (item by
item: in force or not) and the gateway driver's own listing (`GatewayDriver.actual()`, read
back from the gateway, not what it was asked). `device_drift` and `gateway_drift` compare one
device's config with one side's witnesses and return typed findings. A witness is judged only
when it speaks for the current config: a result for an older version, or an `info` taken
before the device applied the current version, says nothing yet (a config just sent is not
drift), and a driver that cannot list (`None`) is not asked.

`DriftTracker` turns successive checks of one device and side into what to say and do; time
is passed in, so it stays pure. A finding is reported when it appears, and reported corrected
when a check that judges its witness no longer has it; a finding whose witness was not judged
this time is carried over as it was. With policy `correct`, a check with findings (other than
REPORTED_ONLY ones) makes a correction due; the next one is due only an `interval` later, the
delay doubling while corrections do not hold (up to MAX_BACKOFF intervals), and each retry
reports the findings again: a correction that keeps failing is reported once per attempt,
never in a loop. The service carries corrections out: gateway drift by applying the device's
config with the driver again, device drift by sending the config again as a new version (the
agent ignores versions it applied, and applies a new one with safe-apply).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Interface

from homenet.schemas.messages import (GatewayState, Ipv4Item, ItemStatus, PortMapping, QosRule, Reservation,
                                      Target, item_key)

from .gateway import wants_of
from .records import DeviceRecord

MAX_BACKOFF = 64
"""Longest wait between corrections that do not hold, in reconciliation intervals."""
SLACK = 0.1
"""Share of an interval a due correction may come early: the periodic check's timer jitters."""


class Witness(StrEnum):
    """Who reports the actual state."""

    INFO = "info"
    RESULT = "config.result"
    GATEWAY = "gateway"


class Side(StrEnum):
    """Where drift is corrected: each side has its own remedy and its own backoff."""

    DEVICE = "device"
    GATEWAY = "gateway"


DEVICE_WITNESSES = frozenset({Witness.INFO, Witness.RESULT})


class Drift(StrEnum):
    CONFIG_IGNORED = "config_ignored"
    """The device reports a version above the current config's applied, so it ignores the
    config (e.g. the database was restored from an older backup)."""
    ADDRESS_DIFFERS = "address_differs"
    """The device's interface has IPv4 addresses, but not the planned one (or another prefix)."""
    ADDRESS_MISSING = "address_missing"
    """The interface the config names has no IPv4 address, or is not reported at all."""
    ITEM_NOT_IN_FORCE = "item_not_in_force"
    """The last result says an agent item failed or was rolled back, or does not mention it."""
    GATEWAY_MISSING = "gateway_missing"
    """The gateway lacks a reservation, port mapping, QoS rule or IGMP proxy the device needs."""
    GATEWAY_DIFFERS = "gateway_differs"
    """The gateway has the item, with other values."""
    GATEWAY_UNEXPECTED = "gateway_unexpected"
    """The gateway has an item for the device that its config does not hold."""


WITNESS: dict[Drift, Witness] = {
    Drift.CONFIG_IGNORED: Witness.INFO, Drift.ADDRESS_DIFFERS: Witness.INFO, Drift.ADDRESS_MISSING: Witness.INFO,
    Drift.ITEM_NOT_IN_FORCE: Witness.RESULT, Drift.GATEWAY_MISSING: Witness.GATEWAY,
    Drift.GATEWAY_DIFFERS: Witness.GATEWAY, Drift.GATEWAY_UNEXPECTED: Witness.GATEWAY}
REPORTED_ONLY = frozenset({Drift.ITEM_NOT_IN_FORCE})
"""The agent's own verdict on the current version: sending the same config again would only
repeat it (a rolled-back apply would flap the device's network), so it is reported, whatever
the policy, and ends with a later version."""


@dataclass(frozen=True)
class Finding:
    drift: Drift
    item: str
    """The config item's key: `ipv4`, `reservation`, `port_mapping:tcp/443`, `qos`, `igmp`."""
    desired: str | None
    actual: str | None

    @property
    def correctable(self) -> bool:
        return self.drift not in REPORTED_ONLY

    @property
    def key(self) -> tuple[Drift, str]:
        """Identity over time: the same drift of the same item, whatever its values are now."""
        return self.drift, self.item


@dataclass(frozen=True)
class Check:
    side: Side
    judged: frozenset[Witness]
    findings: tuple[Finding, ...] = ()


_IN_FORCE = (ItemStatus.APPLIED, ItemStatus.UNCHANGED, ItemStatus.UNSUPPORTED)
"""Item statuses that are no drift: `unsupported` is what the device cannot do, not a change."""


def device_drift(record: DeviceRecord) -> Check:
    """The device's own reports (last result, last info) against its config."""
    config, result, info = record.config, record.result, record.info
    if config is None:
        return Check(Side.DEVICE, DEVICE_WITNESSES)
    if info.applied_version > config.version:
        return Check(Side.DEVICE, frozenset({Witness.INFO}), (Finding(
            Drift.CONFIG_IGNORED, "config", f"version {config.version}", f"version {info.applied_version} applied"),))
    if result is None or result.version != config.version:
        return Check(Side.DEVICE, frozenset())
    reported = {r.item: r for r in result.items}
    findings = []
    for item in (i for i in config.items if i.target == Target.AGENT):
        got = reported.get(item_key(item))
        if got is None or got.status not in _IN_FORCE:
            findings.append(Finding(Drift.ITEM_NOT_IN_FORCE, item_key(item), "applied",
                                    f"{got.status.value}: {got.detail}" if got else "not in the result"))
    ipv4 = next((i for i in config.items if isinstance(i, Ipv4Item) and i.target == Target.AGENT), None)
    if info.applied_version != config.version or any(f.item == "ipv4" for f in findings):
        return Check(Side.DEVICE, frozenset({Witness.RESULT}), tuple(findings))  # info older than the apply
    if ipv4 is not None:
        findings.extend(_address_drift(record, ipv4))
    return Check(Side.DEVICE, DEVICE_WITNESSES, tuple(findings))


def _address_drift(record: DeviceRecord, ipv4: Ipv4Item) -> list[Finding]:
    planned = IPv4Interface(f"{ipv4.address}/{ipv4.prefix_len}")
    iface = next((i for i in record.info.interfaces
                  if (i.mac == ipv4.mac if ipv4.mac else i.name == ipv4.interface)), None)
    if iface is None:
        return [Finding(Drift.ADDRESS_MISSING, "ipv4", str(planned), f"interface {ipv4.interface} not reported")]
    found = _ipv4_interfaces(iface.addresses)
    if planned in found:
        return []
    drift = Drift.ADDRESS_DIFFERS if found else Drift.ADDRESS_MISSING
    return [Finding(drift, "ipv4", str(planned), ", ".join(map(str, found)) or None)]


def _ipv4_interfaces(cidrs: Iterable[str]) -> list[IPv4Interface]:
    found = []
    for cidr in cidrs:
        try:
            found.append(IPv4Interface(cidr))
        except ValueError:  # IPv6 or junk
            continue
    return found


class GatewayListing:
    """The driver's listing grouped by device, once: checking every device against the whole
    listing would cost N² for N devices at each reconciliation."""

    def __init__(self, actual: GatewayState) -> None:
        self._reservations: defaultdict[str, list[Reservation]] = defaultdict(list)
        self._mappings: defaultdict[str, list[PortMapping]] = defaultdict(list)
        self._qos: defaultdict[str, list[QosRule]] = defaultdict(list)
        for r in actual.reservations:
            self._reservations[r.device_id].append(r)
        for m in actual.port_mappings:
            self._mappings[m.device_id].append(m)
        for q in actual.qos:
            self._qos[q.device_id].append(q)
        self._igmp = set(actual.igmp_devices) if actual.igmp_proxy else set()

    def facts(self, device_id: str) -> dict[str, str]:
        return _gateway_facts(device_id, self._reservations.get(device_id, ()), self._mappings.get(device_id, ()),
                              self._qos.get(device_id, ()), device_id in self._igmp)


def gateway_drift(record: DeviceRecord, actual: GatewayState | GatewayListing) -> Check:
    """What the gateway really has for the device against what its config asks of the gateway."""
    wants = wants_of(record.config) if record.config else None
    desired = _gateway_facts(record.device_id, [wants.reservation] if wants and wants.reservation else [],
                             wants.port_mappings if wants else (), [wants.qos] if wants and wants.qos else [],
                             bool(wants and wants.igmp))
    listing = actual if isinstance(actual, GatewayListing) else GatewayListing(actual)
    has = listing.facts(record.device_id)
    findings = []
    for item in sorted(desired.keys() | has.keys()):
        want, got = desired.get(item), has.get(item)
        if want != got:
            drift = (Drift.GATEWAY_MISSING if got is None else Drift.GATEWAY_UNEXPECTED if want is None
                     else Drift.GATEWAY_DIFFERS)
            findings.append(Finding(drift, item, want, got))
    return Check(Side.GATEWAY, frozenset({Witness.GATEWAY}), tuple(findings))


def _gateway_facts(device_id: str, reservations: Iterable[Reservation], mappings: Iterable[PortMapping],
                   qos: Iterable[QosRule], igmp: bool) -> dict[str, str]:
    """Item key -> what the gateway does for the device, in the terms the gateway acts on (a
    reservation without a MAC cannot be made; a port mapping's description is not enforced)."""
    facts = {"reservation": f"{r.mac} -> {r.address}" for r in reservations if r.device_id == device_id and r.mac}
    facts |= {f"port_mapping:{m.protocol}/{m.external_port}": f"{m.internal_address}:{m.internal_port}"
              for m in mappings if m.device_id == device_id}
    facts |= {"qos": f"{q.address} dscp {q.dscp}" for q in qos if q.device_id == device_id}
    if igmp:
        facts["igmp"] = "proxy on"
    return facts


@dataclass(frozen=True)
class Step:
    """What to do after one check."""

    detected: tuple[Finding, ...] = ()
    """To report: new findings, or all of them again when a correction is retried."""
    corrected: tuple[Finding, ...] = ()
    """To report: findings that a judged witness no longer shows."""
    correct: bool = False
    """Carry out a correction of this side now."""
    attempt: int = 0
    """Corrections of these findings so far, this one included."""


@dataclass
class _Tracked:
    findings: dict[tuple[Drift, str], Finding] = field(default_factory=dict)
    attempts: int = 0
    next_try: float = 0.0


class DriftTracker:
    """Remembers the findings of every device and side between checks (see the module doc)."""

    def __init__(self, correct: bool, interval: float) -> None:
        self.correct = correct
        self.interval = interval
        self._tracked: dict[tuple[str, Side], _Tracked] = {}

    def observe(self, device_id: str, check: Check, now: float) -> Step:
        key = (device_id, check.side)
        tracked = self._tracked.get(key, _Tracked())
        fresh = {f.key: f for f in check.findings}
        still = {k: f for k, f in tracked.findings.items() if WITNESS[f.drift] not in check.judged} | fresh
        corrected = tuple(f for k, f in tracked.findings.items() if k not in still)
        detected: Sequence[Finding] = [f for k, f in fresh.items() if k not in tracked.findings]
        due = self.correct and any(f.correctable for f in fresh.values()) and now >= tracked.next_try
        if due:
            tracked.attempts += 1
            backoff = min(2 ** (tracked.attempts - 1), MAX_BACKOFF)
            tracked.next_try = now + self.interval * (backoff - SLACK)
            if tracked.attempts > 1:  # the last correction did not hold: say so again
                detected = list(fresh.values())
        tracked.findings = still
        if still:
            self._tracked[key] = tracked
        else:
            self._tracked.pop(key, None)
        return Step(tuple(detected), corrected, due, tracked.attempts)

    def retain(self, device_ids: Iterable[str]) -> None:
        """Forget the devices not listed (e.g. forgotten ones)."""
        keep = set(device_ids)
        self._tracked = {k: t for k, t in self._tracked.items() if k[0] in keep}
