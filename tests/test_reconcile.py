"""Reconciliation (configurator/reconcile.py): desired state (the config) vs. what the device's
`info`, its `config.result` and the gateway driver's own listing say is in force; and what to
report and correct over time."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from homenet.configurator.gateway import MemoryGatewayDriver
from homenet.configurator.ipam import LanPlan
from homenet.configurator.reconcile import (MAX_BACKOFF, Check, Drift, DriftTracker, Finding, Side, Witness,
                                            device_drift, gateway_drift)
from homenet.configurator.records import DeviceRecord
from homenet.schemas.messages import (Config, ConfigResult, DeviceInfo, IgmpItem, Interface, Ipv4Item, ItemResult,
                                      ItemStatus, PortMapping, PortMappingItem, QosClass, QosItem, QosRule,
                                      Reservation, ResultStatus)

LAN = LanPlan.build("192.168.1.0/24", "192.168.1.1", "192.168.1.100", "192.168.1.199")
MAC = "02:00:00:00:00:01"
PLANNED = "192.168.1.20"


def config(version: int = 1, mac: str | None = MAC, igmp: bool = False) -> Config:
    """A NAS: its address (the agent's item), bulk QoS and tcp/8443 -> 443 (the gateway's)."""
    items = [Ipv4Item(interface="eth0", mac=mac, address=IPv4Address(PLANNED), prefix_len=24,
                      gateway=IPv4Address("192.168.1.1")),
             QosItem(qos_class=QosClass.BULK, dscp=8),
             PortMappingItem(protocol="tcp", external_port=8443, internal_port=443, description="NAS remote access")]
    if igmp:
        items.append(IgmpItem(enabled=True))
    return Config(device_id="nas-1", version=version, profile="nas", items=items)


def device(version: int = 1, *, applied: int | None = None, result_version: int | None = None,
           addresses: tuple[str, ...] = (f"{PLANNED}/24",), ipv4: ItemStatus | None = ItemStatus.APPLIED,
           interface: str = "eth0", mac: str | None = MAC) -> DeviceRecord:
    """The record after the agent applied `version` (unless told otherwise) and reported `addresses`."""
    applied = version if applied is None else applied
    result_version = version if result_version is None else result_version
    items = [ItemResult(item="ipv4", status=ipv4)] if ipv4 else []
    info = DeviceInfo(device_id="nas-1", device_type="nas", applied_version=applied,
                      interfaces=[Interface(name=interface, mac=mac, addresses=list(addresses))])
    result = ConfigResult(re="c", version=result_version, status=ResultStatus.OK, items=items)
    return DeviceRecord(device_id="nas-1", info=info, config=config(version), result=result)


def drifts(check: Check) -> list[tuple[Drift, str, str | None, str | None]]:
    return [(f.drift, f.item, f.desired, f.actual) for f in check.findings]


# --- the device's side: info and config.result ----------------------------------------------

def test_a_device_that_has_its_planned_address_has_no_drift() -> None:
    check = device_drift(device())
    assert check.side == Side.DEVICE and check.judged == {Witness.INFO, Witness.RESULT}
    assert check.findings == ()


def test_other_addresses_beside_the_planned_one_are_no_drift() -> None:
    assert device_drift(device(addresses=("192.168.1.150/24", f"{PLANNED}/24", "fe80::1/64"))).findings == ()


def test_an_address_changed_by_hand_differs_from_the_planned_one() -> None:
    check = device_drift(device(addresses=("192.168.1.77/24", "fe80::1/64")))
    assert drifts(check) == [(Drift.ADDRESS_DIFFERS, "ipv4", "192.168.1.20/24", "192.168.1.77/24")]


def test_the_planned_address_with_another_prefix_differs() -> None:
    check = device_drift(device(addresses=(f"{PLANNED}/16",)))
    assert drifts(check) == [(Drift.ADDRESS_DIFFERS, "ipv4", "192.168.1.20/24", "192.168.1.20/16")]


def test_an_interface_without_ipv4_misses_the_planned_address() -> None:
    check = device_drift(device(addresses=("fe80::1/64",)))
    assert drifts(check) == [(Drift.ADDRESS_MISSING, "ipv4", "192.168.1.20/24", None)]


def test_the_interface_is_found_by_its_mac_whatever_its_name_now() -> None:
    assert device_drift(device(interface="enp1s0")).findings == ()
    gone = device_drift(device(mac="02:00:00:00:00:99"))
    assert drifts(gone) == [(Drift.ADDRESS_MISSING, "ipv4", "192.168.1.20/24", "interface eth0 not reported")]


def test_a_config_just_sent_is_no_drift_until_the_device_answers_for_it() -> None:
    """Version 2 was sent; the device still reports version 1 and its old address: nothing is judged."""
    check = device_drift(device(version=2, applied=1, result_version=1, addresses=("192.168.1.150/24",)))
    assert check.judged == frozenset() and check.findings == ()


def test_an_info_from_before_the_apply_is_not_judged() -> None:
    """The result arrives first; the info that shows the applied address comes after it."""
    check = device_drift(device(version=2, applied=1, addresses=("192.168.1.150/24",)))
    assert check.judged == {Witness.RESULT} and check.findings == ()


@pytest.mark.parametrize("status", [ItemStatus.FAILED, ItemStatus.ROLLED_BACK])
def test_an_item_the_result_says_failed_or_rolled_back_is_not_in_force(status: ItemStatus) -> None:
    record = device(ipv4=status, applied=0 if status == ItemStatus.ROLLED_BACK else 1)
    record = record.model_copy(update={"result": record.result.model_copy(update={
        "items": [ItemResult(item="ipv4", status=status, detail="broker unreachable")]})})
    assert drifts(device_drift(record)) == [
        (Drift.ITEM_NOT_IN_FORCE, "ipv4", "applied", f"{status.value}: broker unreachable")]


def test_an_agent_item_the_result_does_not_mention_is_not_in_force() -> None:
    check = device_drift(device(ipv4=None))
    assert drifts(check) == [(Drift.ITEM_NOT_IN_FORCE, "ipv4", "applied", "not in the result")]


def test_an_item_the_device_cannot_do_is_no_drift() -> None:
    """`unsupported` is a capability, not a change: correcting it would never end."""
    assert device_drift(device(ipv4=ItemStatus.UNSUPPORTED)).findings == ()


def test_a_device_that_applied_a_higher_version_ignores_its_config() -> None:
    """E.g. the database was restored from an older backup: the agent ignores versions at or below its own."""
    check = device_drift(device(version=3, applied=7, result_version=3))
    assert drifts(check) == [(Drift.CONFIG_IGNORED, "config", "version 3", "version 7 applied")]


def test_a_device_without_a_config_has_nothing_to_drift_from() -> None:
    record = device().model_copy(update={"config": None, "result": None})
    assert device_drift(record) == Check(Side.DEVICE, frozenset({Witness.INFO, Witness.RESULT}))


# --- the gateway's side: the driver's own listing --------------------------------------------

def gateway_with(cfg: Config) -> MemoryGatewayDriver:
    driver = MemoryGatewayDriver(LAN)
    driver.apply(cfg)
    return driver


def test_a_gateway_that_has_all_the_device_needs_has_no_drift() -> None:
    record = device().model_copy(update={"config": config(igmp=True)})
    check = gateway_drift(record, gateway_with(config(igmp=True)).actual())
    assert check == Check(Side.GATEWAY, frozenset({Witness.GATEWAY}))


def test_whatever_vanished_from_the_gateway_is_missing() -> None:
    record = device().model_copy(update={"config": config(igmp=True)})
    empty = MemoryGatewayDriver(LAN).actual()
    assert drifts(gateway_drift(record, empty)) == [
        (Drift.GATEWAY_MISSING, "igmp", "proxy on", None),
        (Drift.GATEWAY_MISSING, "port_mapping:tcp/8443", "192.168.1.20:443", None),
        (Drift.GATEWAY_MISSING, "qos", "192.168.1.20 dscp 8", None),
        (Drift.GATEWAY_MISSING, "reservation", f"{MAC} -> 192.168.1.20", None)]


def test_items_changed_on_the_gateway_differ_and_others_for_the_device_are_unexpected() -> None:
    actual = gateway_with(config()).actual()
    actual = actual.model_copy(update={
        "reservations": [Reservation(device_id="nas-1", mac=MAC, address=IPv4Address("192.168.1.21"))],
        "port_mappings": [*actual.port_mappings,
                          PortMapping(device_id="nas-1", protocol="udp", external_port=53,
                                      internal_address=IPv4Address(PLANNED), internal_port=53)],
        "qos": [QosRule(device_id="nas-1", address=IPv4Address(PLANNED), qos_class=QosClass.VIDEO, dscp=32)]})
    assert drifts(gateway_drift(device(), actual)) == [
        (Drift.GATEWAY_UNEXPECTED, "port_mapping:udp/53", None, "192.168.1.20:53"),
        (Drift.GATEWAY_DIFFERS, "qos", "192.168.1.20 dscp 8", "192.168.1.20 dscp 32"),
        (Drift.GATEWAY_DIFFERS, "reservation", f"{MAC} -> 192.168.1.20", f"{MAC} -> 192.168.1.21")]


def test_only_what_the_gateway_acts_on_is_compared() -> None:
    """A mapping's description is not enforced; a reservation needs a MAC; other devices' items are theirs."""
    actual = gateway_with(config()).actual()
    mapping = actual.port_mappings[0]
    other = PortMapping(device_id="cam-1", protocol="tcp", external_port=554,
                        internal_address=IPv4Address("192.168.1.30"), internal_port=554)
    actual = actual.model_copy(update={"port_mappings": [mapping.model_copy(update={"description": ""}), other]})
    assert gateway_drift(device(), actual).findings == ()
    no_mac = device().model_copy(update={"config": config(mac=None)})
    assert gateway_drift(no_mac, gateway_with(config(mac=None)).actual().model_copy(
        update={"reservations": []})).findings == ()


def test_an_igmp_proxy_that_stopped_is_missing_for_every_device_that_needs_it() -> None:
    record = device().model_copy(update={"config": config(igmp=True)})
    stopped = gateway_with(config(igmp=True)).actual().model_copy(update={"igmp_proxy": False})
    assert drifts(gateway_drift(record, stopped)) == [(Drift.GATEWAY_MISSING, "igmp", "proxy on", None)]


# --- over time: what to report and when to correct -------------------------------------------

MOVED = Finding(Drift.ADDRESS_DIFFERS, "ipv4", "192.168.1.20/24", "192.168.1.77/24")
MOVED_AGAIN = Finding(Drift.ADDRESS_DIFFERS, "ipv4", "192.168.1.20/24", "192.168.1.78/24")
NO_FORWARD = Finding(Drift.GATEWAY_MISSING, "port_mapping:tcp/8443", "192.168.1.20:443", None)
BOTH = frozenset({Witness.INFO, Witness.RESULT})


def seen(*findings: Finding, judged: frozenset[Witness] = BOTH) -> Check:
    return Check(Side.DEVICE, judged, findings)


def gateway_seen(*findings: Finding) -> Check:
    return Check(Side.GATEWAY, frozenset({Witness.GATEWAY}), findings)


def test_a_finding_is_reported_when_it_appears_and_corrected_when_it_is_gone() -> None:
    tracker = DriftTracker(correct=True, interval=60)
    first = tracker.observe("nas-1", seen(MOVED), now=0)
    assert (first.detected, first.correct, first.attempt) == ((MOVED,), True, 1)
    assert tracker.observe("nas-1", seen(), now=5).corrected == (MOVED,)
    assert tracker.observe("nas-1", seen(), now=10) == tracker.observe("nas-1", seen(), now=11)  # quiet


def test_a_finding_is_not_corrected_again_before_the_interval_and_not_reported_twice() -> None:
    tracker = DriftTracker(correct=True, interval=60)
    tracker.observe("nas-1", seen(MOVED), now=0)
    again = tracker.observe("nas-1", seen(MOVED_AGAIN), now=1)  # the same drift with other values
    assert (again.detected, again.corrected, again.correct) == ((), (), False)


def test_a_correction_that_does_not_hold_is_retried_and_reported_with_doubling_delay() -> None:
    tracker = DriftTracker(correct=True, interval=60)
    attempts = [t for t in range(0, 60 * 200, 10) if tracker.observe("nas-1", seen(MOVED), now=t).correct]
    assert attempts[:6] == [0, 60, 180, 420, 900, 1860]
    assert attempts[-1] - attempts[-2] <= 60 * MAX_BACKOFF, "the delay stops doubling"
    retry = DriftTracker(correct=True, interval=60)
    retry.observe("nas-1", seen(MOVED), now=0)
    step = retry.observe("nas-1", seen(MOVED), now=60)
    assert (step.detected, step.attempt) == ((MOVED,), 2), "each retry says the drift is still there"


def test_an_item_the_agent_reports_not_in_force_is_reported_but_not_sent_again() -> None:
    """Its result is the agent's verdict on this very config: the same config again would fail
    (or roll back, cutting the device off for a while) again."""
    failed = Finding(Drift.ITEM_NOT_IN_FORCE, "ipv4", "applied", "rolled_back: broker unreachable")
    tracker = DriftTracker(correct=True, interval=60)
    step = tracker.observe("nas-1", seen(failed), now=0)
    assert (step.detected, step.correct) == ((failed,), False)
    assert not tracker.observe("nas-1", seen(failed), now=6000).correct
    assert tracker.observe("nas-1", seen(failed, MOVED), now=6001).correct, "other drift still is"


def test_with_policy_report_drift_is_only_reported_once() -> None:
    tracker = DriftTracker(correct=False, interval=60)
    assert tracker.observe("nas-1", seen(MOVED), now=0).detected == (MOVED,)
    later = [tracker.observe("nas-1", seen(MOVED), now=t) for t in (60, 120, 600)]
    assert not any(s.correct or s.detected for s in later)
    assert tracker.observe("nas-1", seen(), now=700).corrected == (MOVED,), "fixed by hand, say so"


def test_findings_of_a_witness_not_judged_are_carried_over() -> None:
    """After the correction (a new version) the device's reports speak for the old version:
    neither corrected nor retried until the device answers for the new one."""
    tracker = DriftTracker(correct=True, interval=1)
    tracker.observe("nas-1", seen(MOVED), now=0)
    pending = tracker.observe("nas-1", seen(judged=frozenset()), now=100)
    assert (pending.corrected, pending.correct) == ((), False)
    assert tracker.observe("nas-1", seen(), now=101).corrected == (MOVED,)


def test_the_device_and_the_gateway_are_corrected_independently() -> None:
    tracker = DriftTracker(correct=True, interval=60)
    assert tracker.observe("nas-1", seen(MOVED), now=0).correct
    gateway = tracker.observe("nas-1", gateway_seen(NO_FORWARD), now=1)
    assert (gateway.detected, gateway.correct) == ((NO_FORWARD,), True)
    assert tracker.observe("nas-1", gateway_seen(), now=2).corrected == (NO_FORWARD,)
    assert not tracker.observe("nas-1", seen(MOVED), now=3).correct, "the device's backoff is its own"


def test_a_forgotten_device_is_forgotten_by_the_tracker_too() -> None:
    tracker = DriftTracker(correct=False, interval=60)
    tracker.observe("nas-1", seen(MOVED), now=0)
    tracker.retain(["cam-1"])
    assert tracker.observe("nas-1", seen(MOVED), now=1).detected == (MOVED,), "new again if it comes back"
