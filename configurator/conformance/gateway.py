"""The gateway side the conformance kit plays: a configurator it scripts, on its own broker.

It signs what it sends with its own key (or, to test refusals, another), keeps every message
the agent publishes with what a receiver must decide about it (`testvectors.verdict`), and
answers every register as an auto-enrolling configurator would: accepted, with a broker
account when the agent has none. Everything else it sends when the walk (`walk.py`) asks.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from nacl.signing import SigningKey

from homenet.accounts import Accounts
from homenet.acl import Role
from homenet.mqtt import make_client, set_nodelay
from homenet.schemas import Topics, encode
from homenet.schemas.messages import (ConfiguratorState, Credentials, Model, RegisterReply, RegisterStatus)
from homenet.schemas.signing import b64, unb64
from homenet.schemas.testvectors import verdict

CONFIGURATOR_ID = "conformance"


@dataclass
class Seen:
    """One message the agent published, as the kit received it."""

    topic: str
    channel: str
    payload: bytes
    retain: bool
    at: float
    verdict: str = ""
    """For an envelope: `valid`, or what is wrong with it (`testvectors.verdict`)."""
    body: dict[str, Any] = field(default_factory=dict)
    envelope: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.envelope.get("kind", ""))

    @property
    def seq(self) -> int:
        return int(self.envelope.get("seq", -1))


class ScriptedGateway:
    def __init__(self, port: int, accounts: Accounts, topics: Topics, epoch: int) -> None:
        self.topics, self.accounts, self.epoch = topics, accounts, epoch
        self.key, self.other = SigningKey.generate(), SigningKey.generate()
        self.seq = 0
        self.seen: list[Seen] = []
        self.device_id: str | None = None
        self.device_key: bytes | None = None
        self.config_version = 0
        self._cond = threading.Condition()
        self.port = port
        self._password = accounts.set(CONFIGURATOR_ID, Role.CONFIGURATOR)
        self.client = make_client(f"homenet-{CONFIGURATOR_ID}", clean_session=True,
                                  username=CONFIGURATOR_ID, password=self._password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the kit's own broker did not accept the scripted configurator")

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        set_nodelay(client)
        client.subscribe([(self.topics.device_filter(c), 1)
                          for c in ("register", "config/result", "info", "status", "rpc/reply")])

    # --- sending -----------------------------------------------------------------------

    def sign_with(self, key: SigningKey | None) -> Callable[[bytes], bytes]:
        chosen = key or self.key
        return lambda data: chosen.sign(data).signature

    def payload(self, kind: str, body: Model, *, key: SigningKey | None = None, seq: int | None = None) -> tuple[str, bytes]:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return encode(kind, body, sender=CONFIGURATOR_ID, seq=seq, sign=self.sign_with(key))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def send(self, channel: str, kind: str, body: Model, *, retain: bool = False,
             key: SigningKey | None = None) -> tuple[str, bytes]:
        assert self.device_id is not None
        msg_id, payload = self.payload(kind, body, key=key)
        self.publish(self.topics.device(self.device_id, channel), payload, retain)
        return msg_id, payload

    def announce(self, *, epoch: int | None = None, key: SigningKey | None = None) -> None:
        """A retained `configurator/state` online, signed by (and naming) `key`."""
        chosen = key or self.key
        body = ConfiguratorState(state="online", configurator_id=CONFIGURATOR_ID, epoch=epoch or self.epoch,
                                 public_key=b64(bytes(chosen.verify_key)))
        self.publish(self.topics.configurator_state, self.payload("configurator.state", body, key=chosen)[1], True)

    # --- receiving -----------------------------------------------------------------------

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            parsed = self.topics.parse_device(msg.topic)
        except ValueError:
            return
        seen = Seen(msg.topic, parsed.channel, bytes(msg.payload), bool(msg.retain), time.monotonic())
        if parsed.channel != "status" and msg.payload:
            try:
                seen.envelope = json.loads(msg.payload)
                seen.body = seen.envelope.get("body", {}) if isinstance(seen.envelope, dict) else {}
            except ValueError:
                seen.envelope = {}
            key = self.device_key
            if parsed.channel == "register":
                key = unb64(str(seen.body.get("public_key", ""))) or b""
            seen.verdict = verdict(seen.payload, key or b"")
        with self._cond:
            if self.device_id is None and parsed.channel in ("register", "status"):
                self.device_id = parsed.device_id
            self.seen.append(seen)
            self._cond.notify_all()
        if parsed.channel == "register" and parsed.device_id == self.device_id:
            # not on paho's network thread: sending waits for the broker's PUBACK, which that thread reads
            threading.Thread(target=self._answer_register, args=(seen,), daemon=True).start()

    def _answer_register(self, seen: Seen) -> None:
        """Accept a properly signed register from the device, with an account when it has none."""
        if seen.verdict != "valid" or seen.body.get("device_id") != self.device_id:
            return  # refused, as a configurator refuses it: the walk reports why
        key = unb64(str(seen.body.get("public_key")))
        if self.device_key is not None and key != self.device_key:
            return
        self.device_key = key
        credentials = None
        if seen.body.get("needs_credentials") or self.accounts.get(str(self.device_id)) is None:
            credentials = Credentials(username=str(self.device_id),
                                      password=self.accounts.set(str(self.device_id), Role.DEVICE))
        reply = RegisterReply(re=str(seen.envelope.get("id")), status=RegisterStatus.ACCEPTED,
                              config_version=self.config_version, credentials=credentials)
        self.send("register/reply", "register.reply", reply)

    def wait(self, match: Callable[[Seen], bool], timeout: float, after: float = 0.0) -> Seen | None:
        """The first message received at or after `after` (monotonic) that matches, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((s for s in self.seen if s.at >= after and match(s)), None)
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                self._cond.wait(remaining)

    def since(self, after: float, channel: str | None = None) -> list[Seen]:
        with self._cond:
            return [s for s in self.seen if s.at >= after and (channel is None or s.channel == channel)]

    def retained(self, topic: str, timeout: float = 3.0) -> bytes | None:
        """What the broker retains on `topic`, as a new subscriber gets it (a live message to an
        established subscription never shows the retain flag, MQTT-3.3.1-9)."""
        got: list[bytes] = []
        arrived = threading.Event()
        probe = make_client(f"homenet-{CONFIGURATOR_ID}-probe", clean_session=True,
                            username=CONFIGURATOR_ID, password=self._password)

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            if msg.retain:
                got.append(bytes(msg.payload))
                arrived.set()

        probe.on_message = on_message
        probe.on_connect = lambda c, *_: c.subscribe(topic, 1)
        probe.connect("127.0.0.1", self.port)
        probe.loop_start()
        try:
            arrived.wait(timeout)
        finally:
            probe.disconnect()
            probe.loop_stop()
        return got[0] if got else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
