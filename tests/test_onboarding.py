"""IEC 62608-2 new device connection, end to end over a real broker (embedded amqtt and Mosquitto):
discovery (retained configurator/state), registration, evaluation, configuration, confirmation."""

from __future__ import annotations

import json
import subprocess
from ipaddress import IPv4Address, IPv4Network

from homenet.configurator.lifecycle import State
from homenet.configurator.profiles import PROFILES
from homenet.schemas import decode
from homenet.schemas.messages import Ipv4Item, ResultStatus

from .harness import Gateway, gateway_view, wait_until


def test_every_built_in_device_type_completes_the_sequence(gateway: Gateway) -> None:
    agents = {kind: gateway.agent(kind) for kind in PROFILES}
    records = {kind: gateway.wait_configured(f"test-{kind}") for kind in agents}

    addresses = [IPv4Address(r.address) for r in records.values()]
    assert len(set(addresses)) == len(addresses), "no two devices share an address"
    lan = IPv4Network("192.168.1.0/24")
    for kind, record in records.items():
        assert record.profile == kind
        assert record.result is not None and record.result.status == ResultStatus.OK
        address = IPv4Address(record.address)
        assert address in lan and not IPv4Address("192.168.1.100") <= address <= IPv4Address("192.168.1.199")
        # the agent's executor holds exactly what the configurator planned
        in_force = agents[kind].executor.in_force()["ipv4"]
        assert in_force["address"] == record.address and in_force["gateway"] == "192.168.1.1"


def test_gateway_state_shows_what_the_configurator_set(gateway: Gateway) -> None:
    gateway.agent("iptv-stb")
    gateway.agent("nas")
    stb = gateway.wait_configured("test-iptv-stb")
    nas = gateway.wait_configured("test-nas")

    def latest_state() -> dict | None:
        body = gateway_view(list(gateway.watcher.messages), gateway.topics)
        return body if body and len(body["reservations"]) == 2 else None

    state = wait_until(latest_state, what="gateway/state with two reservations")
    assert state["igmp_proxy"] is True and state["igmp_devices"] == ["test-iptv-stb"]
    assert {(q["address"], q["dscp"]) for q in state["qos"]} == {(stb.address, 32), (nas.address, 8)}
    assert state["port_mappings"] == [{"device_id": "test-nas", "protocol": "tcp", "external_port": 443,
                                       "internal_address": nas.address, "internal_port": 443,
                                       "description": "NAS remote access"}]


def test_agent_reports_its_new_address_in_info(gateway: Gateway) -> None:
    gateway.agent("camera")
    record = gateway.wait_configured("test-camera")
    reported = wait_until(lambda: [a for i in gateway.record("test-camera").info.interfaces for a in i.addresses],
                          what="info with the applied address")
    assert reported == [f"{record.address}/24"]
    assert gateway.record("test-camera").version == 1, "an info that fits the plan makes no new version"


def test_mosquitto_sub_reads_a_devices_retained_config_and_result(gateway: Gateway, mosquitto_sub: str) -> None:
    gateway.agent("nas")
    gateway.wait_configured("test-nas")
    root = "homenet/v1/device/test-nas"
    out = subprocess.run([mosquitto_sub, "-h", "127.0.0.1", "-p", str(gateway.broker.port), "-v",
                          "-t", f"{root}/config", "-t", f"{root}/config/result", "-C", "2", "-W", "10"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    _, config = decode(lines[f"{root}/config"].encode(), expected_kind="config")
    _, result = decode(lines[f"{root}/config/result"].encode(), expected_kind="config.result")
    assert config.version == result.version == 1
    assert any(isinstance(i, Ipv4Item) for i in config.items)
    assert result.status == ResultStatus.OK


def test_address_exhaustion_is_an_error_event_not_a_duplicate(broker, tmp_path) -> None:
    from homenet.settings import LanSettings

    # 192.168.7.0/29: hosts .1-.6, gateway .1, pool .4-.6 -> two static addresses (.2, .3)
    gw = Gateway(broker, tmp_path, LanSettings(subnet="192.168.7.0/29", gateway="192.168.7.1",
                                               pool_start="192.168.7.4", pool_end="192.168.7.6"))
    gw.start()
    try:
        for n in range(3):
            gw.agent("generic", f"dev-{n}")
        wait_until(lambda: len(gw.configurator.store.all()) == 3, what="three registrations")
        event = gw.watcher.wait_event("device.unplanned", severity="error")
        assert "no free static address in 192.168.7.0/29" in event["reason"]
        records = gw.configurator.store.all()
        configured = [r for r in records if r.state == State.CONFIGURED]
        wait_until(lambda: sum(r.state == State.CONFIGURED for r in gw.configurator.store.all()) == 2,
                   what="two configured devices")
        records = gw.configurator.store.all()
        assert sorted(r.address for r in records if r.address) == ["192.168.7.2", "192.168.7.3"]
        assert [r.state for r in records].count(State.UNPLANNED) == 1
        assert configured is not None
    finally:
        gw.close()
