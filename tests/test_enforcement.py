"""The configurator enforces what docs/protocol.md says, against a device played by hand: a
`config.result` must answer the config it names and account for every agent item; an
anonymous device that does not say it needs credentials still gets them; a read-only reader
on `#` costs no log line per message withheld from it."""

from __future__ import annotations

import logging
import queue
from typing import Any

import pytest

from homenet.acl import Role
from homenet.configurator.lifecycle import State
from homenet.keys import KeyPair
from homenet.mqtt import make_client
from homenet.schemas import Topics, decode, encode
from homenet.schemas.signing import b64
from homenet.schemas.messages import (ConfigResult, DeviceInfo, Interface, ItemResult, ItemStatus, Model,
                                      RegisterReply, ResultStatus)

from .harness import Gateway, wait_until
from .test_security import secure, secure_amqtt  # noqa: F401  (fixtures: a broker with accounts)

TOPICS = Topics()


class HandDevice:
    """A device whose every message the test writes: registers, reads its config, answers."""

    def __init__(self, gateway: Gateway, device_id: str, login: tuple[str, str] | None = None) -> None:
        self.gateway, self.device_id, self.key, self.seq = gateway, device_id, KeyPair.generate(), 0
        self.inbox: dict[str, queue.Queue[bytes]] = {
            TOPICS.device(device_id, c): queue.Queue() for c in ("register/reply", "config")}
        self.client = self._connect(login)

    def _connect(self, login: tuple[str, str] | None) -> Any:
        client = make_client(self.device_id, clean_session=True, username=login[0] if login else None,
                             password=login[1] if login else None)
        client.on_message = lambda _c, _u, msg: self.inbox[msg.topic].put(bytes(msg.payload))
        client.connect("127.0.0.1", self.gateway.broker.port)
        client.loop_start()
        wait_until(client.is_connected, what=f"{self.device_id} connected")
        topics = ("register/reply", "config") if login else ("register/reply",)
        client.subscribe([(TOPICS.device(self.device_id, c), 1) for c in topics])
        return client

    def login(self, username: str, password: str) -> None:
        self.close()
        self.client = self._connect((username, password))

    def send(self, channel: str, kind: str, body: Model, retain: bool = False) -> str:
        self.seq += 1
        msg_id, payload = encode(kind, body, sender=self.device_id, seq=self.seq, sign=self.key.sign)
        self.client.publish(TOPICS.device(self.device_id, channel), payload, qos=1, retain=retain)
        return msg_id

    def register(self, needs_credentials: bool = False) -> str:
        info = DeviceInfo(device_id=self.device_id, device_type="nas", public_key=b64(self.key.public),
                          needs_credentials=needs_credentials,
                          interfaces=[Interface(name="eth0", mac="02:00:00:00:00:31")])
        return self.send("register", "register", info)

    def receive(self, channel: str, timeout: float = 10.0) -> tuple[str, Any]:
        """(message id, body) of the next message on one of its channels."""
        envelope, body = decode(self.inbox[TOPICS.device(self.device_id, channel)].get(timeout=timeout))
        return envelope.id, body

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def configured_by_hand(gateway: Gateway, device_id: str) -> tuple[HandDevice, str, Any]:
    device = HandDevice(gateway, device_id)  # no broker accounts: it may read its config as it is
    device.client.subscribe(TOPICS.device(device_id, "config"), 1)
    device.register()
    config_id, config = device.receive("config")
    return device, config_id, config


def answer(device: HandDevice, config_id: str, version: int, items: list[ItemResult],
           status: ResultStatus = ResultStatus.OK) -> None:
    device.send("config/result", "config.result",
                ConfigResult(re=config_id, version=version, status=status, items=items), retain=True)


@pytest.mark.parametrize(("case", "reason"), [
    ("no items", "config.result refused: items do not match the config's agent items: missing ipv4"),
    ("a gateway item", "not agent items of this config (or repeated): qos"),
    ("another re", "is not the id"),
    ("ok for a failure", "status ok does not follow from its items (they make it failed)"),
])
def test_a_result_that_does_not_answer_its_config_is_refused(gateway: Gateway, case: str, reason: str) -> None:
    device, config_id, config = configured_by_hand(gateway, f"hand-{case.replace(' ', '-')}")
    try:
        ipv4 = ItemResult(item="ipv4", status=ItemStatus.APPLIED)
        items, re = {"no items": ([], config_id),
                     "a gateway item": ([ipv4, ItemResult(item="qos", status=ItemStatus.APPLIED)], config_id),
                     "another re": ([ipv4], "0" * 32),
                     "ok for a failure": ([ItemResult(item="ipv4", status=ItemStatus.FAILED)], config_id)}[case]
        answer(device, re, config.version, items)
        gateway.watcher.wait_event("message.rejected", reason=reason)
        assert gateway.record(device.device_id).state != State.CONFIGURED

        answer(device, config_id, config.version, [ipv4])  # the true answer is taken
        gateway.wait_configured(device.device_id)
    finally:
        device.close()


def test_an_anonymous_device_that_omits_needs_credentials_still_gets_an_account(secure: Gateway) -> None:
    device = HandDevice(secure, "hand-anon")
    try:
        device.register(needs_credentials=False)
        _, reply = device.receive("register/reply")
        assert isinstance(reply, RegisterReply) and reply.status == "accepted"
        assert reply.credentials and reply.credentials.username == "hand-anon", \
            "without an account it could never read its config"
        device.login(reply.credentials.username, reply.credentials.password)
        device.register(needs_credentials=False)  # logged in: no new password this time
        _, again = device.receive("register/reply")
        assert again.status == "accepted" and again.credentials is None
        _, config = device.receive("config")
        assert config.version == 1
    finally:
        device.close()


def test_a_reader_on_the_whole_tree_costs_no_log_line_per_withheld_message(
        secure_amqtt: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert secure_amqtt.configurator and secure_amqtt.configurator.accounts
    password = secure_amqtt.configurator.accounts.set("alice", Role.READER)
    seen: list[str] = []
    reader = make_client("alice", clean_session=True, username="alice", password=password)
    reader.on_message = lambda _c, _u, msg: seen.append(msg.topic)
    reader.on_connect = lambda c, *_: c.subscribe("#", 1)
    reader.connect("127.0.0.1", secure_amqtt.broker.port)
    reader.loop_start()
    device = HandDevice(secure_amqtt, "hand-read")
    try:
        wait_until(lambda: TOPICS.configurator_state in seen, what="the reader subscribed")
        device.register(needs_credentials=True)
        device.receive("register/reply")  # withheld from alice: it carries the password
        wait_until(lambda: any(t.endswith("/config") for t in seen), what="the reader sees the config")
        assert not any(t.endswith("register/reply") for t in seen)
        withheld = [r for r in caplog.records if "not allowed to receive" in r.getMessage()]
        assert all(r.levelno < logging.INFO for r in withheld), [r.getMessage() for r in withheld]
    finally:
        device.close()
        reader.disconnect()
        reader.loop_stop()
