"""Security (IEC 62608-1 Q4): enrolled identities, broker accounts and ACLs, signed and
replay-proof messages, the three enrollment policies, read-only operators, brute force."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from homenet.brokers import Embedded
from homenet.configurator.lifecycle import State
from homenet.keys import KeyPair
from homenet.mqtt import make_client
from homenet.schemas import decode, encode
from homenet.schemas.messages import Config, Ipv4Item
from homenet.schemas.signing import pairing_code

from .harness import Gateway, wait_until

HOMENET = str(Path(sys.executable).parent / "homenet")


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Gateway]:
    """The embedded broker authenticating against the accounts the configurator issues."""
    accounts = tmp_path / "gateway" / "broker-accounts.json"
    broker = Embedded(accounts_file=accounts)
    broker.start()
    gateway = Gateway(broker, tmp_path, accounts_file=accounts)
    gateway.start()
    yield gateway
    gateway.close()
    broker.stop()


def enrolled(gateway: Gateway, kind: str, device_id: str | None = None):  # noqa: ANN201
    agent = gateway.agent(kind, device_id)
    record = gateway.wait_configured(agent.device_id)
    wait_until(lambda: agent.state.state.username == agent.device_id and agent.client.is_connected(),
               what=f"{agent.device_id} logged in with its own account")
    return agent, record


def pub(gateway: Gateway, mosquitto_pub: str, topic: str, payload: bytes, *login: str,
        client_id: str = "intruder", retain: bool = False) -> int:
    args = [mosquitto_pub, "-h", "127.0.0.1", "-p", str(gateway.broker.port), "-i", client_id, "-q", "1",
            "-t", topic, "-s", *(["-r"] if retain else [])]
    if login:
        args += ["-u", login[0], "-P", login[1]]
    return subprocess.run(args, input=payload, capture_output=True, timeout=10).returncode


def seen(gateway: Gateway, topic: str, payload: bytes) -> bool:
    return any(t == topic and p == payload for t, p, _ in gateway.watcher.messages)


def db_digest(gateway: Gateway) -> str:
    return hashlib.sha256((gateway.data_dir / "homenet-db.json").read_bytes()).hexdigest()


def test_an_enrolled_device_logs_in_with_its_own_account(secure: Gateway) -> None:
    agent, _ = enrolled(secure, "nas")
    assert agent.state.state.password and len(agent.state.state.password) >= 40
    text = (secure.data_dir / "broker-accounts.json").read_text()
    assert agent.state.state.password not in text, "the broker keeps only a hash"


def test_a_device_cannot_publish_on_another_devices_topics(secure: Gateway, mosquitto_pub: str) -> None:
    a, _ = enrolled(secure, "nas", "dev-a")
    enrolled(secure, "camera", "dev-b")
    spoof = b'{"spoofed": true}'
    for channel in ("info", "config", "config/result", "register"):
        pub(secure, mosquitto_pub, secure.topics.device("dev-b", channel), spoof,
            a.state.state.username, a.state.state.password, client_id="dev-a")
    probe = b'{"probe": "own topic"}'  # the same account on its own topic does get through
    pub(secure, mosquitto_pub, secure.topics.device("dev-a", "info"), probe,
        a.state.state.username, a.state.state.password, client_id="dev-a")
    wait_until(lambda: seen(secure, secure.topics.device("dev-a", "info"), probe), what="the probe")
    assert not any(p == spoof for _, p, _ in secure.watcher.messages)


def test_an_unknown_client_cannot_publish_a_config(secure: Gateway, mosquitto_pub: str) -> None:
    agent, record = enrolled(secure, "iptv-stb")
    forged = Config(device_id=agent.device_id, version=99, profile="generic", items=[])
    _, payload = encode("config", forged, sender="configurator", seq=10**9)
    topic = secure.topics.device(agent.device_id, "config")
    pub(secure, mosquitto_pub, topic, payload, client_id="stranger", retain=True)
    probe = encode("register", agent.device_info(), sender="stranger", seq=1)[1]
    pub(secure, mosquitto_pub, secure.topics.device("stranger", "register"), probe, client_id="stranger")
    wait_until(lambda: seen(secure, secure.topics.device("stranger", "register"), probe), what="the probe")
    assert not seen(secure, topic, payload)
    assert agent.state.state.applied_version == record.version


def test_configurator_rights_with_a_wrong_signature_are_refused(secure: Gateway, mosquitto_pub: str) -> None:
    agent, record = enrolled(secure, "nas")
    login = ("configurator", (secure.data_dir / "configurator.secret").read_text().strip())
    evil = KeyPair.generate()
    forged = Config(device_id=agent.device_id, version=99, profile="nas", items=[Ipv4Item(
        interface="sim0", address="192.168.1.66", prefix_len=24, gateway="192.168.1.1")])
    _, payload = encode("config", forged, sender="configurator", seq=10**9, sign=evil.sign)
    pub(secure, mosquitto_pub, secure.topics.device(agent.device_id, "config"), payload, *login,
        client_id="forger", retain=True)
    secure.watcher.wait_event("message.rejected", reason="not signed by this configurator's key")
    # an info in the device's name, signed by another key
    _, info = encode("info", agent.device_info(), sender=agent.device_id, seq=10**9, sign=evil.sign)
    before = db_digest(secure)
    pub(secure, mosquitto_pub, secure.topics.device(agent.device_id, "info"), info, *login, client_id="forger")
    secure.watcher.wait_event("message.rejected", reason="bad or missing signature: info not signed")
    assert db_digest(secure) == before
    assert agent.state.state.applied_version == record.version == 1
    assert agent.executor.in_force()["ipv4"]["address"] == record.address


def test_captured_config_and_result_replayed_are_ignored(secure: Gateway, mosquitto_pub: str) -> None:
    agent, record = enrolled(secure, "camera")
    config_topic = secure.topics.device(agent.device_id, "config")
    result_topic = secure.topics.device(agent.device_id, "config/result")
    captured_config = record.config_payload.encode()
    captured_result = wait_until(lambda: next((p for t, p, _ in secure.watcher.messages
                                               if t == result_topic and p), None), what="a captured result")
    before = db_digest(secure)
    login = ("configurator", (secure.data_dir / "configurator.secret").read_text().strip())
    pub(secure, mosquitto_pub, config_topic, captured_config, *login, client_id="replayer")
    pub(secure, mosquitto_pub, result_topic, captured_result, agent.state.state.username,
        agent.state.state.password, client_id=agent.device_id)
    secure.watcher.wait_event("message.rejected", reason="replayed or out of order")
    assert agent.state.state.applied_version == 1
    assert db_digest(secure) == before


def test_a_known_id_with_another_key_is_refused_with_an_alert(gateway: Gateway) -> None:
    gateway.agent("nas", "dev-k")
    record = gateway.wait_configured("dev-k")
    impostor = gateway.agent("nas", "dev-k", start=False)
    impostor.device.state.update(seq_reserved=10**6)  # not a replay: only the key differs
    object.__setattr__(impostor.device, "key", KeyPair.generate())
    impostor.start()
    event = gateway.watcher.wait_event("device.key_mismatch", device_id="dev-k")
    assert event["severity"] == "error" and "homenet devices reset dev-k" in event["reason"]
    after = gateway.record("dev-k")
    assert (after.public_key, after.version, after.address) == (record.public_key, record.version, record.address)


def test_an_anonymous_client_cannot_take_an_enrolled_devices_id(secure: Gateway) -> None:
    agent, _ = enrolled(secure, "nas", "dev-t")
    impostor = make_client("dev-t", clean_session=True)
    refused = threading.Event()
    impostor.on_connect = lambda c, u, f, reason, p: reason.is_failure and refused.set()
    impostor.connect("127.0.0.1", secure.broker.port)
    impostor.loop_start()
    try:
        assert refused.wait(10)
        event = secure.watcher.wait_event("auth.failed")
        assert "device dev-t is enrolled and must log in" in event["reason"]
    finally:
        impostor.loop_stop()
    assert agent.client.is_connected()


def homenet_cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HOMENET, *args, "--broker", gateway.broker.url, "--data-dir", str(gateway.data_dir)],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def approving(tmp_path: Path) -> Iterator[Gateway]:
    yield from _enrolling(tmp_path, "approve")


@pytest.fixture
def pairing(tmp_path: Path) -> Iterator[Gateway]:
    yield from _enrolling(tmp_path, "pairing-code")


def _enrolling(tmp_path: Path, policy: str) -> Iterator[Gateway]:
    accounts = tmp_path / "gateway" / "broker-accounts.json"
    broker = Embedded(accounts_file=accounts)
    broker.start()
    gateway = Gateway(broker, tmp_path, accounts_file=accounts, enrollment=policy)
    gateway.start()
    yield gateway
    gateway.close()
    broker.stop()


def pending(gateway: Gateway, device_id: str) -> None:
    wait_until(lambda: (r := gateway.record(device_id)) and r.state == State.PENDING, what=f"{device_id} pending")


def test_approve_policy_waits_for_the_owner(approving: Gateway) -> None:
    agent = approving.agent("nas", "nas-1")
    pending(approving, "nas-1")
    approving.watcher.wait_event("device.pending", device_id="nas-1")
    assert not agent.registered.is_set() and agent.state.state.username is None

    out = homenet_cli(approving, "devices", "approve", "nas-1")
    assert out.returncode == 0, out.stderr
    approving.wait_configured("nas-1")
    wait_until(lambda: agent.state.state.username == "nas-1", what="an account after approval")


def test_a_rejected_device_stays_rejected(approving: Gateway) -> None:
    agent = approving.agent("camera", "cam-1")
    pending(approving, "cam-1")
    out = homenet_cli(approving, "devices", "reject", "cam-1")
    assert out.returncode == 0, out.stderr
    approving.watcher.wait_event("device.rejected", device_id="cam-1")
    approving.stop_agent(agent)
    again = approving.agent("camera", "cam-1")
    wait_until(lambda: sum(e["event"] == "device.rejected" for e in approving.watcher.events()) == 1
               and approving.record("cam-1").state == State.REJECTED and again.client.is_connected(),
               what="still rejected after re-registering")
    assert approving.record("cam-1").config is None and again.state.state.username is None


def test_pairing_code_policy(pairing: Gateway) -> None:
    agent = pairing.agent("media-player", "mp-1")
    pending(pairing, "mp-1")
    wrong = homenet_cli(pairing, "devices", "pair", "000-000")
    assert wrong.returncode != 0 and "no device is waiting with pairing code '000-000'" in wrong.stderr
    pairing.watcher.wait_event("pairing.failed")
    assert pairing.record("mp-1").state == State.PENDING

    code = pairing_code(agent.device.key.public)  # what the device shows its owner
    out = homenet_cli(pairing, "devices", "pair", code)
    assert out.returncode == 0 and out.stdout.strip() == "paired mp-1", out.stderr
    pairing.wait_configured("mp-1")


def test_a_read_only_operator_reads_the_tree_and_cannot_publish(secure: Gateway, mosquitto_sub: str,
                                                                  mosquitto_pub: str) -> None:
    agent, record = enrolled(secure, "nas")
    out = homenet_cli(secure, "users", "add", "alice", "--read-only")
    assert out.returncode == 0, out.stderr
    password = out.stdout.strip().rsplit(" ", 1)[1]
    got = subprocess.run([mosquitto_sub, "-h", "127.0.0.1", "-p", str(secure.broker.port), "-u", "alice",
                          "-P", password, "-v", "-t", "homenet/#", "-W", "3"],
                         capture_output=True, text=True, timeout=20).stdout
    assert f"homenet/v1/device/{agent.device_id}/config " in got and "homenet/v1/configurator/state " in got
    command = b'{"not": "allowed"}'
    pub(secure, mosquitto_pub, secure.topics.command, command, "alice", password, client_id="alice")
    pub(secure, mosquitto_pub, secure.topics.device(agent.device_id, "config"), command, "alice", password,
        client_id="alice")
    probe = b"probe"
    pub(secure, mosquitto_pub, secure.topics.device("probe-1", "register"), probe, client_id="probe-1")
    wait_until(lambda: seen(secure, secure.topics.device("probe-1", "register"), probe), what="the probe")
    assert not any(p == command for _, p, _ in secure.watcher.messages)
    wrong = subprocess.run([mosquitto_sub, "-h", "127.0.0.1", "-p", str(secure.broker.port), "-u", "alice",
                            "-P", "guess", "-t", "homenet/#", "-W", "3"], capture_output=True, text=True, timeout=20)
    assert wrong.returncode != 0


def test_brute_force_is_visible_and_does_not_stop_legitimate_agents(secure: Gateway) -> None:
    def attack() -> None:
        for n in range(40):
            client = make_client("attacker", clean_session=True, username="admin", password=f"guess-{n}")
            try:
                client.connect("127.0.0.1", secure.broker.port)
                client.loop(timeout=1.0)
            except OSError:
                pass
            finally:
                client.disconnect()

    attackers = [threading.Thread(target=attack) for _ in range(2)]
    for t in attackers:
        t.start()
    enrolled(secure, "game-console")  # onboards while the attack goes on
    for t in attackers:
        t.join(60)
    event = secure.watcher.wait_event("auth.failed", reason="refused login(s) from 127.0.0.1")
    assert "bad password for 'admin'" in event["reason"]
