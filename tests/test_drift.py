"""Drift, end to end (configurator/reconcile.py in the service): a device's address changed by
hand and gateway rules that vanished are detected from the device's reports and the gateway's
own listing, then corrected (policy `correct`) or only reported (`report`) on `events`. First
in-process on a real broker (both brokers), then a Linux gateway in namespaces with the real
nftables and dnsmasq (tests/gatewaylab.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from homenet.agent.service import Agent
from homenet.brokers import BrokerHandle
from homenet.configurator.drivers import dnsmasq, nftables
from homenet.schemas.messages import GatewayState, PortMapping, QosClass, QosRule, Reservation

from .gatewaylab import foreign_ruleset, nft_rules, start_linux_home
from .harness import Gateway, wait_until
from .netns import Lab
from .test_gateway_linux import serving_nas

INTERVAL = 0.5


@pytest.fixture
def make_gateway(broker: BrokerHandle, tmp_path: Path) -> Iterator[Callable[[str], Gateway]]:
    made: list[Gateway] = []

    def make(drift: str) -> Gateway:
        gateway = Gateway(broker, tmp_path, drift=drift, reconcile_interval=INTERVAL)
        gateway.start()
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.close()


def change_by_hand(agent: Agent, address: str) -> None:
    """Someone sets another address on the (simulated) device, behind the agent's back."""
    settings = agent.executor.in_force()
    agent.executor.rollback({**settings, "ipv4": {**settings["ipv4"], "address": address}})


def behind_its_back(gateway: Gateway, action: Callable[[], Any]) -> None:
    """Run `action` on the configurator's worker between two batches (so it races with nothing),
    as if a person changed the gateway: nothing the configurator does sees it happen."""
    assert gateway.configurator is not None
    gateway.configurator.submit(action)


def events(gateway: Gateway, name: str) -> list[dict[str, Any]]:
    assert gateway.watcher is not None
    return [e for e in gateway.watcher.events() if e["event"] == name]


def test_an_address_changed_by_hand_is_put_back_by_a_new_config_version(make_gateway: Callable[[str], Gateway]) -> None:
    gateway = make_gateway("correct")
    agent = gateway.agent("camera", info_interval=0.2)
    planned = gateway.wait_configured("test-camera").address

    change_by_hand(agent, "192.168.1.77")  # the agent reports it in its next `info`
    detected = gateway.watcher.wait_event("drift.detected", device_id="test-camera", timeout=20)
    assert detected["detail"] == {"what": "address_differs", "item": "ipv4", "desired": f"{planned}/24",
                                  "actual": "192.168.1.77/24", "attempt": 1}
    record = gateway.wait_configured("test-camera", version=2, timeout=30)
    assert record.address == planned and agent.executor.in_force()["ipv4"]["address"] == planned
    assert agent.state.state.applied_version == 2, "the same config, as a new version the agent applied"
    corrected = gateway.watcher.wait_event("drift.corrected", device_id="test-camera", timeout=20)
    assert corrected["detail"]["item"] == "ipv4"

    time.sleep(INTERVAL * 4)  # more reconciliations: nothing left to do
    assert [e["detail"]["version"] for e in events(gateway, "config.sent")] == [1, 2]
    assert len(events(gateway, "drift.detected")) == 1


def test_with_policy_report_drift_is_only_reported_once(make_gateway: Callable[[str], Gateway]) -> None:
    gateway = make_gateway("report")
    agent = gateway.agent("camera", info_interval=0.2)
    planned = gateway.wait_configured("test-camera").address

    change_by_hand(agent, "192.168.1.77")
    gateway.watcher.wait_event("drift.detected", device_id="test-camera", timeout=20)
    time.sleep(INTERVAL * 6)  # several reconciliations
    assert len(events(gateway, "drift.detected")) == 1
    assert gateway.record("test-camera").version == 1 and agent.state.state.applied_version == 1
    assert agent.executor.in_force()["ipv4"]["address"] == "192.168.1.77", "left as it is"

    change_by_hand(agent, planned)  # put right by hand: reported too
    corrected = gateway.watcher.wait_event("drift.corrected", device_id="test-camera", timeout=20)
    assert corrected["detail"]["attempt"] == 0, "the configurator did not correct it"


def test_gateway_items_that_vanished_are_put_back_within_the_interval(make_gateway: Callable[[str], Gateway]) -> None:
    gateway = make_gateway("correct")
    gateway.agent("nas")
    gateway.wait_configured("test-nas")
    driver = gateway.configurator.driver
    before = driver.actual()

    behind_its_back(gateway, lambda: driver.remove("test-nas"))
    wait_until(lambda: len(events(gateway, "drift.detected")) == 3, 20, "three findings")
    assert {(e["detail"]["what"], e["detail"]["item"]) for e in events(gateway, "drift.detected")} == {
        ("gateway_missing", "reservation"), ("gateway_missing", "qos"), ("gateway_missing", "port_mapping:tcp/443")}
    wait_until(lambda: len(events(gateway, "drift.corrected")) == 3, 20, "three corrections")
    assert driver.actual() == before


# --- a Linux gateway in namespaces ------------------------------------------------------------

@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def test_the_linux_driver_reads_back_the_rules_it_writes(lab: Lab) -> None:
    gw = lab.namespace("gw")
    mappings = [PortMapping(device_id="nas-1", protocol="tcp", external_port=8443,
                            internal_address=IPv4Address("192.168.1.20"), internal_port=443),
                PortMapping(device_id="console-1", protocol="udp", external_port=3074,
                            internal_address=IPv4Address("192.168.1.30"), internal_port=3074)]
    qos = [QosRule(device_id=f"dev-{c.value}", address=IPv4Address(f"192.168.1.{40 + i}"), qos_class=c,
                   dscp=d) for i, (c, d) in enumerate({QosClass.VOICE: 46, QosClass.VIDEO: 32, QosClass.INTERACTIVE: 34,
                                                       QosClass.BEST_EFFORT: 0, QosClass.BULK: 8}.items())]
    state = GatewayState(driver="linux", lan="192.168.1.0/24", port_mappings=mappings, qos=qos)
    gw.run("nft", "-f", "-", input=nftables.render(state, "wan0"))

    assert nftables.read(nft_rules(gw), "wan0") == (mappings, qos)
    assert nftables.read(nft_rules(gw), "eth9") == ([], []), "rules for another WAN do not do the job"
    accept = next(r for r in nft_rules(gw) if r["chain"] == "port_accept")
    gw.run("nft", "delete", "rule", "inet", "homenet", "port_accept", "handle", str(accept["handle"]))
    assert len(nftables.read(nft_rules(gw), "wan0")[0]) == 1, "a DNAT without its accept is not in force"
    reserved = Reservation(device_id="nas-1", mac="02:00:00:00:00:01", address=IPv4Address("192.168.1.20"))
    assert dnsmasq.parse_hosts(dnsmasq.render_hosts([reserved])) == [(reserved.mac, reserved.address)]


def test_rules_deleted_by_hand_on_a_linux_gateway_are_put_back(lab: Lab, tmp_path: Path) -> None:
    home = start_linux_home(lab, tmp_path, reconcile_interval=1)
    foreign = foreign_ruleset(home.gw)
    home.start_dnsmasq()
    home.start_gateway()
    nas, proc, log, record, mapping = serving_nas(home)
    item = f"port_mapping:tcp/{mapping.external_port}"
    hosts = tmp_path / "dhcp-hosts"
    wait_until(lambda: len(nft_rules(home.gw) or []) == 3, 15, "forward, accept and the NAS's QoS mark")
    time.sleep(3)  # a few reconciliations of a gateway that is as it should be
    assert "drift." not in home.log()

    # someone deletes the DNAT rule by hand
    dnat = next(r for r in nft_rules(home.gw) if r["chain"] == "port_forward")
    deleted = time.monotonic()
    home.gw.run("nft", "delete", "rule", "inet", "homenet", "port_forward", "handle", str(dnat["handle"]))
    wait_until(lambda: any(r["chain"] == "port_forward" for r in nft_rules(home.gw) or []), 30, "the DNAT back")
    restored = time.monotonic() - deleted
    home.wait_log(f"drift.detected device={record.device_id}: gateway_missing {item}: "
                  f"desired {record.address}:{mapping.internal_port}, actual None")
    home.wait_log(f"drift.corrected device={record.device_id}: gateway_missing {item}")
    assert home.wan_connect(mapping.external_port).returncode == 0

    # the whole table flushed and the reservations file emptied
    def reloads() -> int:  # dnsmasq logs each read of the hosts file (at start and on SIGHUP)
        return (tmp_path / "dnsmasq.log").read_text().count(f"read {hosts}")
    before = reloads()
    home.gw.run("nft", "flush", "table", "inet", "homenet")
    hosts.write_text(dnsmasq.HEADER)
    flushed = time.monotonic()
    wait_until(lambda: len(nft_rules(home.gw) or []) == 3 and str(record.address) in hosts.read_text(), 30,
               "the rules and the reservation back")
    refilled = time.monotonic() - flushed
    wait_until(lambda: reloads() > before, 10, "dnsmasq told to read the hosts file again")
    for what in ("qos", "reservation", item):
        home.wait_log(f"drift.corrected device={record.device_id}: gateway_missing {what}")
    assert foreign_ruleset(home.gw) == foreign, "the gateway's own rules are untouched"
    assert proc.poll() is None, log.read_text()
    print(f"\nreconcile_interval 1 s: DNAT rule deleted -> back in {restored:.2f} s; "
          f"table flushed and hosts file emptied -> back in {refilled:.2f} s")
