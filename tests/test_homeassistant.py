"""Home Assistant discovery: what HA gets on the broker, checked against its documented schema."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homenet.brokers import Embedded, Mosquitto
from homenet.mqtt import BrokerUrl, make_client
from homenet.settings import GatewaySettings, HomeAssistantSettings, Switch

from .conftest import require_program
from .ha_schema import problems, unique_ids
from .harness import Gateway, wait_until

HOMENET = str(Path(sys.executable).parent / "homenet")
CONFIG = "homeassistant/device/{}/config"


class HomeAssistantClient:
    """What Home Assistant does on the broker: logs in with an operator account, reads its
    discovery tree and the homenet tree, announces itself (birth) and presses buttons."""

    def __init__(self, url: str, login: tuple[str, str], prefix: str = "homeassistant") -> None:
        self.messages: list[tuple[str, bytes, bool, float]] = []
        self._lock = threading.Lock()
        broker = BrokerUrl.parse(url)
        self.client = make_client("home-assistant-test", clean_session=True, username=login[0], password=login[1])
        ready = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe([(f"{prefix}/#", 1), ("homenet/#", 1)])
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))

    def on(self, topic: str, since: float = 0.0) -> list[bytes]:
        with self._lock:
            return [p for t, p, _, at in self.messages if t == topic and at >= since]

    def last(self, topic: str) -> dict[str, Any] | None:
        payloads = self.on(topic)
        return json.loads(payloads[-1]) if payloads and payloads[-1] else None

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def extensions(homeassistant: bool = True, prefix: str = "homeassistant") -> GatewaySettings:
    return GatewaySettings(web=Switch(enabled=False), metrics=Switch(enabled=False),
                           homeassistant=HomeAssistantSettings(enabled=homeassistant, prefix=prefix))


def secured_gateway(tmp_path: Path, settings: GatewaySettings,
                    kind: str = "amqtt") -> Iterator[tuple[Gateway, HomeAssistantClient]]:
    """A broker enforcing the ACL (the embedded one, or Mosquitto with dynamic security), a
    configurator in `approve` enrollment with the extensions, and Home Assistant logged in
    with an operator account made as the owner makes it (`homenet users add`)."""
    if kind == "mosquitto":
        missing = Mosquitto.dynsec_missing()
        if missing:
            require_program(missing)
        broker: Any = Mosquitto(dynsec=True)
        broker.start()
        gateway = Gateway(broker, tmp_path, enrollment="approve", dynsec_admin=broker.admin, extensions=settings)
    else:
        accounts = tmp_path / "gateway" / "broker-accounts.json"
        broker = Embedded(accounts_file=accounts, discovery=settings.homeassistant.prefix)
        broker.start()
        gateway = Gateway(broker, tmp_path, accounts_file=accounts, enrollment="approve", extensions=settings)
    ha = None
    try:
        gateway.start()
        ha = HomeAssistantClient(broker.url, ("homeassistant", add_user(gateway, "homeassistant")),
                                 settings.homeassistant.prefix)
        yield gateway, ha
    finally:
        if ha:
            ha.close()
        gateway.close()
        broker.stop()


def add_user(gateway: Gateway, name: str) -> str:
    out = subprocess.run([HOMENET, "users", "add", name, "--broker", gateway.broker.url,
                          "--data-dir", str(gateway.data_dir)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.rsplit("password: ", 1)[1].strip()


@pytest.fixture
def with_ha(tmp_path: Path) -> Iterator[tuple[Gateway, HomeAssistantClient]]:
    yield from secured_gateway(tmp_path, extensions())


@pytest.fixture(params=["amqtt", "mosquitto"])
def on_both(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, HomeAssistantClient]]:
    yield from secured_gateway(tmp_path, extensions(), request.param)


def test_a_device_appears_in_home_assistant_as_documented_and_is_approved_from_its_button(
        on_both: tuple[Gateway, HomeAssistantClient]) -> None:
    gateway, ha = on_both
    gateway.agent("nas", "nas-1")
    pending = wait_until(lambda: ha.last(CONFIG.format("nas-1")), what="discovery of the pending device")
    assert problems(pending) == []
    assert pending["dev"]["cns"] == [["mac", m.lower()] for m in sorted(
        {i.mac for i in gateway.record("nas-1").info.interfaces if i.mac})] and pending["dev"]["cns"]
    assert pending["o"]["name"] == "homenet" and pending["dev"]["mdl"] == "Test nas"
    platforms = {cid.removeprefix("nas-1_"): c["p"] for cid, c in pending["cmps"].items()}
    assert platforms == {"address": "sensor", "state": "sensor", "result": "sensor", "online": "binary_sensor",
                         "refresh": "button", "approve": "button"}
    assert pending["availability"] == [{"topic": "homenet/v1/device/nas-1/status",
                                        "value_template": "{{ value_json.state }}"}]
    assert ha.last(pending["state_topic"])["state"] == "pending"

    ha.publish(pending["cmps"]["nas-1_approve"]["command_topic"], b"approve")  # HA's button
    record = gateway.wait_configured("nas-1")
    sent = wait_until(lambda: (c := [json.loads(p) for p in ha.on(CONFIG.format("nas-1"))])
                      and "nas-1_approve" not in c[-1]["cmps"] and c, what="the approve button gone")
    assert {"p": "button"} in [c["cmps"].get("nas-1_approve") for c in sent]  # how HA removes a component
    assert "nas-1_approve" not in sent[-1]["cmps"] and all(problems(c) == [] for c in sent)
    state = wait_until(lambda: (s := ha.last(pending["state_topic"])) and s["state"] == "configured" and s,
                       what="state configured")
    assert state["address"] == record.address and state["result"] == "ok" and state["online"] is True


def test_unique_ids_differ_across_components_and_devices(with_ha: tuple[Gateway, HomeAssistantClient]) -> None:
    gateway, ha = with_ha
    for n in (1, 2):
        gateway.agent("camera", f"cam-{n}")
    payloads = [wait_until(lambda n=n: ha.last(CONFIG.format(f"cam-{n}")), what=f"cam-{n}") for n in (1, 2)]
    ids = [u for p in payloads for u in unique_ids(p)]
    assert len(ids) == len(set(ids)) == 12


def test_birth_message_resends_everything_after_a_short_random_delay(
        with_ha: tuple[Gateway, HomeAssistantClient]) -> None:
    gateway, ha = with_ha
    gateway.agent("nas", "nas-1")
    wait_until(lambda: ha.last(CONFIG.format("nas-1")), what="discovery")
    time.sleep(0.3)
    born = time.monotonic()
    ha.publish("homeassistant/status", b"online")
    wait_until(lambda: ha.on(CONFIG.format("nas-1"), since=born), timeout=6, what="discovery sent again")
    delay = min(at for t, _, _, at in ha.messages if t == CONFIG.format("nas-1") and at >= born) - born
    assert 0.05 < delay < 4.5  # BIRTH_DELAY is 3 s at most; the rest is a loaded machine
    assert ha.on("homenet/v1/ha/nas-1/state", since=born)


def test_a_forgotten_device_is_removed_by_an_empty_retained_config(
        with_ha: tuple[Gateway, HomeAssistantClient]) -> None:
    gateway, ha = with_ha
    gateway.agent("nas", "nas-1")
    wait_until(lambda: ha.last(CONFIG.format("nas-1")), what="discovery")
    out = subprocess.run([HOMENET, "devices", "forget", "nas-1", "--broker", gateway.broker.url,
                          "--data-dir", str(gateway.data_dir)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: ha.on(CONFIG.format("nas-1"))[-1] == b"", what="empty discovery payload")
    retained = HomeAssistantClient(gateway.broker.url, ("homeassistant", add_user(gateway, "homeassistant")))
    try:
        time.sleep(0.5)
        assert not [t for t, p, r, _ in retained.messages if t.startswith("homeassistant/") and p]
    finally:
        retained.close()


def test_switched_off_nothing_is_published_for_home_assistant(tmp_path: Path) -> None:
    for gateway, ha in secured_gateway(tmp_path, extensions(homeassistant=False)):
        gateway.agent("nas", "nas-1")
        wait_until(lambda: (r := gateway.record("nas-1")) and r.state.value == "pending", what="pending")
        time.sleep(0.5)
        assert not [t for t, *_ in ha.messages if t.startswith("homeassistant/") or "/ha/" in t]


def test_another_discovery_prefix_is_followed_by_the_broker_acl(tmp_path: Path) -> None:
    """HA's MQTT integration lets the owner change its discovery prefix: the configurator
    publishes under it and the embedded broker's ACL lets it (and Home Assistant) through."""
    for gateway, ha in secured_gateway(tmp_path, extensions(prefix="ha/discovery")):
        gateway.agent("nas", "nas-1")
        pending = wait_until(lambda: ha.last("ha/discovery/device/nas-1/config"), what="discovery under the prefix")
        assert problems(pending) == []
        assert not ha.on(CONFIG.format("nas-1")), "nothing under the default prefix"
