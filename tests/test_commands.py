"""Operator commands go through the running configurator, which owns the database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from homenet.brokers import BrokerHandle
from homenet.schemas.messages import PortMappingItem

from .harness import Gateway, gateway_view, wait_until

HOMENET = str(Path(sys.executable).parent / "homenet")


def homenet(broker: BrokerHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HOMENET, *args, "--broker", broker.url], capture_output=True, text=True, timeout=30)


def test_forget_removes_the_device_and_what_the_gateway_set_for_it(gateway: Gateway) -> None:
    gateway.agent("nas")
    record = gateway.wait_configured("test-nas")

    out = homenet(gateway.broker, "devices", "forget", "test-nas")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"forgot test-nas ({record.address})"

    assert gateway.record("test-nas") is None
    gateway.watcher.wait_event("device.forgotten", device_id="test-nas")
    state = wait_until(lambda: (v := gateway_view(list(gateway.watcher.messages), gateway.topics))
                       and not v["reservations"] and v, what="gateway state without the NAS")
    assert state["port_mappings"] == []
    summary = [p for t, p, _ in gateway.watcher.messages if t == gateway.topics.gateway_state][-1]
    assert json.loads(summary)["body"]["devices"] == 0
    config_topic = gateway.topics.device("test-nas", "config")
    wait_until(lambda: [p for t, p, _ in gateway.watcher.messages if t == config_topic][-1] == b"",
               what="retained config cleared")
    assert not [e for e in gateway.watcher.events() if e["event"] == "message.rejected"]


def test_forgetting_an_unknown_device_is_a_clear_error(gateway: Gateway) -> None:
    out = homenet(gateway.broker, "devices", "forget", "ghost")
    assert out.returncode != 0
    assert "forget ghost: no device 'ghost'" in out.stderr


def test_a_command_without_a_configurator_says_so(embedded: BrokerHandle) -> None:
    out = subprocess.run([HOMENET, "devices", "forget", "x", "--broker", embedded.url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no answer from a configurator" in out.stderr


def test_a_forgotten_device_that_comes_back_gets_a_version_it_will_apply(gateway: Gateway) -> None:
    agent = gateway.agent("nas")
    gateway.wait_configured("test-nas")
    gateway.stop_agent(agent)
    assert homenet(gateway.broker, "devices", "forget", "test-nas").returncode == 0

    again = gateway.agent("nas")  # same state dir: it applied version 1 before
    record = gateway.wait_configured("test-nas", version=2)
    assert again.state.state.applied_version == 2 and record.result.version == 2


def test_a_new_unit_of_a_forgotten_devices_model_takes_its_place_when_the_owner_says_so(gateway: Gateway) -> None:
    def forward(record: Any) -> int:
        return next(i.external_port for i in record.config.items if isinstance(i, PortMappingItem))

    gateway.agent("nas", "nas-a")
    old = gateway.wait_configured("nas-a")
    gateway.agent("nas", "nas-new")  # the broken NAS's successor, same model, plugged in beside it
    fresh = gateway.wait_configured("nas-new")
    assert fresh.address != old.address and forward(fresh) != forward(old)
    gateway.agent("iptv-stb", "stb")
    gateway.wait_configured("stb")
    gateway.stop_agent(next(a for a in gateway.agents if a.device_id == "nas-a"))
    assert homenet(gateway.broker, "devices", "forget", "nas-a").returncode == 0

    refused = homenet(gateway.broker, "devices", "replace", "stb", "nas-a")
    assert refused.returncode != 0 and "replace stb: stb is a iptv-stb (Test iptv-stb), nas-a was a nas (Test nas): " \
        "only a unit of the same model takes its place" in refused.stderr

    out = homenet(gateway.broker, "devices", "replace", "nas-new", "nas-a")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"nas-new took the place of nas-a ({old.address})"
    took = gateway.wait_configured("nas-new", version=2)
    assert took.address == old.address and forward(took) == forward(old)
    gateway.watcher.wait_event("device.replaced", device_id="nas-new", reason="takes the place of nas-a")
    again = homenet(gateway.broker, "devices", "replace", "nas-new", "nas-a")  # once only
    assert again.returncode != 0 and "no forgotten device 'nas-a'" in again.stderr
