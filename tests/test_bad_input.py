"""Bad input published with the real mosquitto_pub: each message is refused with an `events`
entry and a log line saying what was wrong; the service keeps running and the database is
unchanged."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from homenet.schemas import MAX_PAYLOAD, encode
from homenet.schemas.messages import Config, DeviceInfo, Interface, Ipv4Item

from .harness import Gateway, wait_until

ROOT = "homenet/v1"


def envelope(kind: str, body: dict, sender: str = "test-nas", seq: int = 10**9) -> str:
    return json.dumps({"v": 1, "kind": kind, "id": f"x{seq}", "seq": seq, "from": sender,
                       "time": "2026-01-01T00:00:00Z", "body": body})


def register_body(device_id: str) -> dict:
    return DeviceInfo(device_id=device_id, device_type="nas",
                      interfaces=[Interface(name="eth0", mac="02:00:00:00:00:99")]).model_dump(mode="json")


BAD_MESSAGES = {
    "not JSON": ("device/test-nas/register", "hello, configurator", "not JSON"),
    "JSON but not an object": ("device/test-nas/info", "[1, 2, 3]", "not a JSON object"),
    "wrong envelope schema": ("device/test-nas/register", '{"hello": "world"}', "bad envelope"),
    "wrong body schema": ("device/test-nas/register",
                          envelope("register", {"device_id": "test-nas", "device_type": 7}),
                          "bad register body: device_type"),
    "unknown kind": ("device/test-nas/register", envelope("reboot", {}), "unknown kind 'reboot'"),
    "kind not carried by the topic": ("device/test-nas/info", envelope("register", register_body("test-nas")),
                                      "kind 'register' on a topic that carries 'info'"),
    "sender differs from topic": ("device/intruder/register", envelope("register", register_body("intruder")),
                                  "sender 'test-nas' published on the topic of device 'intruder'"),
    "body names another device": ("device/test-nas/info", envelope("info", register_body("other")),
                                  "body names device 'other'"),
    "unsafe device id in topic": ("device/$evil/register", envelope("register", register_body("test-nas")),
                                  "is not a safe topic level"),
    "bad status": ("device/test-nas/status", "online", "bad status payload"),
    "over the size limit": ("device/test-nas/register", "x" * (MAX_PAYLOAD + 1), "over the 65536-byte limit"),
}


@pytest.fixture
def configured_nas(gateway: Gateway) -> Gateway:
    gateway.agent("nas")
    record = gateway.wait_configured("test-nas")
    wait_until(lambda: gateway.record("test-nas").info.interfaces[0].addresses, what="info after config")
    assert record.version == 1
    time.sleep(0.3)  # let the online status and info settle in the database
    return gateway


def publish(gateway: Gateway, mosquitto_pub: str, topic: str, payload: str, retain: bool = False) -> None:
    subprocess.run([mosquitto_pub, "-h", "127.0.0.1", "-p", str(gateway.broker.port), "-q", "1",
                    "-t", f"{ROOT}/{topic}", "-s", *(["-r"] if retain else [])],
                   input=payload.encode(), check=True, timeout=10)


def assert_still_serving(gateway: Gateway) -> None:
    gateway.agent("camera")
    gateway.wait_configured("test-camera")


@pytest.mark.parametrize("case", BAD_MESSAGES)
def test_bad_message_is_refused_with_an_event_and_changes_nothing(
        configured_nas: Gateway, mosquitto_pub: str, case: str) -> None:
    gateway = configured_nas
    topic, payload, reason = BAD_MESSAGES[case]
    before = gateway.database_digest()
    publish(gateway, mosquitto_pub, topic, payload)
    event = gateway.watcher.wait_event("message.rejected", reason=reason)
    assert event["severity"] == "warning" and event["topic"] == f"{ROOT}/{topic}"
    assert gateway.database_digest() == before
    assert_still_serving(gateway)


def test_replayed_register_is_refused(configured_nas: Gateway, mosquitto_pub: str) -> None:
    gateway = configured_nas
    seq = gateway.record("test-nas").last_seq
    _, payload = encode("register", DeviceInfo.model_validate(register_body("test-nas")),
                        sender="test-nas", seq=seq)
    before = gateway.database_digest()
    publish(gateway, mosquitto_pub, "device/test-nas/register", payload.decode())
    event = gateway.watcher.wait_event("message.rejected", reason="replayed or out of order")
    assert f"seq {seq} is not above {seq}" in event["reason"]
    assert gateway.database_digest() == before


def test_the_last_accepted_message_delivered_again_is_not_called_a_replay(configured_nas: Gateway,
                                                                          mosquitto_pub: str) -> None:
    """After a broker restart an agent's retained result can arrive twice (retained and live)."""
    gateway = configured_nas
    last_seq = gateway.record("test-nas").last_seq
    topic, payload = next((t, p) for t, p, _ in reversed(gateway.watcher.messages)
                          if "/device/test-nas/" in t and p.startswith(b"{") and b'"sig"' in p
                          and json.loads(p).get("seq") == last_seq)
    before = gateway.record("test-nas")
    publish(gateway, mosquitto_pub, topic.removeprefix(f"{ROOT}/"), payload.decode())
    assert_still_serving(gateway)  # handled in order: the copy was before the camera
    assert not [e for e in gateway.watcher.events() if e["event"] == "message.rejected"]
    assert gateway.record("test-nas") == before


@pytest.mark.parametrize("sender,reason", [
    ("configurator", "config not signed by this configurator's key; current config restored"),
    ("mallory", "config published by 'mallory', not by this configurator"),
])
def test_a_foreign_or_stale_config_is_ignored_by_the_agent_and_undone(
        configured_nas: Gateway, mosquitto_pub: str, sender: str, reason: str) -> None:
    gateway = configured_nas
    agent = gateway.agents[0]
    genuine = gateway.record("test-nas")
    forged = Config(device_id="test-nas", version=1, profile="nas", items=[Ipv4Item(
        interface="sim0", address="192.168.1.66", prefix_len=24, gateway="192.168.1.1")])
    _, payload = encode("config", forged, sender=sender, seq=10**9)
    before = gateway.database_digest()
    publish(gateway, mosquitto_pub, "device/test-nas/config", payload.decode(), retain=True)
    gateway.watcher.wait_event("message.rejected", reason=reason)
    # the configurator put its own config back in the retained slot
    wait_until(lambda: [p for t, p, _ in gateway.watcher.messages
                        if t == f"{ROOT}/device/test-nas/config"][-1] == genuine.config_payload.encode(),
               what="genuine config restored")
    assert agent.executor.in_force()["ipv4"]["address"] == genuine.address
    assert agent.state.state.applied_version == 1
    assert gateway.database_digest() == before


def test_payload_over_the_broker_limit_never_reaches_the_configurator(
        configured_nas: Gateway, mosquitto_pub: str) -> None:
    gateway = configured_nas
    before = gateway.database_digest()
    publish(gateway, mosquitto_pub, "device/test-nas/register", "x" * (300 * 1024))
    if gateway.broker.name == "amqtt":  # our broker says why the message vanished
        event = gateway.watcher.wait_event("message.rejected", sender="")
        assert "over the broker's 262144-byte limit" in event["reason"]
    else:  # Mosquitto drops it (message_size_limit) and logs nothing to events
        time.sleep(1)
    assert not [e for e in gateway.watcher.events() if e.get("sender") == "test-nas"]
    assert gateway.database_digest() == before
    assert_still_serving(gateway)


def test_the_json_validation_holes_are_rejected_never_internal_errors(configured_nas: Gateway,
                                                                     mosquitto_pub: str) -> None:
    """Issue 11, point 9, through a real broker: each payload of tests/test_strict_json.py is a
    `message.rejected` with its reason; none is an `internal.error`; nothing is stored."""
    from .test_strict_json import HOLES

    gateway = configured_nas
    for payload, _ in HOLES.values():
        subprocess.run([mosquitto_pub, "-h", "127.0.0.1", "-p", str(gateway.broker.port), "-q", "1",
                        "-t", f"{ROOT}/device/dev-1/register", "-s"], input=payload, check=True, timeout=10)
    for _, reason in HOLES.values():
        gateway.watcher.wait_event("message.rejected", reason=reason.split(":")[0])
    assert not [e for e in gateway.watcher.events() if e["event"] == "internal.error"]
    assert_still_serving(gateway)
    assert gateway.record("dev-1") is None
