"""The configurator's engine (configurator/engine.py) through its interface, without a broker: a
real SQLite store in a temporary directory, a list for what is sent, a list for what is acked.
Nothing leaves before the batch has committed, a batch whose commit fails sends nothing and is
tried again, and a fenced batch sends nothing at all."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from homenet.configurator.bus import Bus
from homenet.configurator.devices import Devices
from homenet.configurator.engine import Engine
from homenet.configurator.gateway import MemoryGatewayDriver
from homenet.configurator.lifecycle import State
from homenet.configurator.planner import Parts, Planner
from homenet.configurator.publisher import Publisher
from homenet.configurator.records import DeviceRecord
from homenet.configurator.renumber import lan_plan
from homenet.configurator.store import SqliteStore
from homenet.keys import KeyPair
from homenet.schemas import Topics, decode, encode
from homenet.schemas.messages import DeviceInfo, Interface, RegisterStatus
from homenet.schemas.signing import b64
from homenet.sequence import SequenceCounter
from homenet.settings import ConfiguratorSettings


@dataclass
class Message:
    """What the broker would deliver; the engine only needs it not to be a task (callable)."""
    device_id: str
    topic: str = ""
    payload: bytes = b""
    retain: bool = False
    dup: bool = False
    qos: int = 1


def record(device_id: str) -> DeviceRecord:
    info = DeviceInfo(device_id=device_id, device_type="nas",
                      interfaces=[Interface(name="eth0", mac="02:00:00:00:00:01")])
    return DeviceRecord(device_id=device_id, info=info)


class Rig:
    """An engine whose handler stores each message's device and sends a reply after the commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = SqliteStore(path)
        self.store.claim_epoch()
        self.log: list[tuple[str, Any]] = []
        self.failed: list[str] = []
        self.heal: Any = None
        self.engine = Engine(self.store.transaction, self.handle, lambda m: self.log.append(("ack", m.device_id)),
                             lambda reason: self.log.append(("fenced", reason)), self.on_failed,
                             lambda: self.log.append(("rolled back", None)), lambda _s, n: self.log.append(("commit", n)))

    def handle(self, msg: Message) -> None:
        self.log.append(("handle", msg.device_id))
        self.store.put(record(msg.device_id))
        self.engine.later(self.send, msg.device_id)

    def send(self, device_id: str) -> None:
        """The reply, with what a second reader of the file sees at that moment."""
        on_disk = SqliteStore(self.path, read_only=True).get(device_id)
        self.log.append(("send", (device_id, on_disk is not None)))

    def on_failed(self, exc: Exception, messages: int, delay: float) -> None:
        self.failed.append(f"{exc}; {messages} kept, retry in {delay}")
        if self.heal:
            self.heal()


def test_the_outbox_goes_out_after_the_commit_and_the_acks_after_the_outbox(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "homenet.db")
    assert rig.engine.run([Message("nas-1"), Message("stb-1")])
    assert rig.log == [("handle", "nas-1"), ("handle", "stb-1"), ("commit", 2),
                       ("send", ("nas-1", True)), ("send", ("stb-1", True)), ("ack", "nas-1"), ("ack", "stb-1")]


def test_a_task_is_run_in_the_batch_and_not_acknowledged(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "homenet.db")
    assert rig.engine.run([lambda: rig.handle(Message("task-1")), Message("nas-1")])
    assert [e for e in rig.log if e[0] == "ack"] == [("ack", "nas-1")]
    assert rig.store.get("task-1") is not None


def test_a_batch_whose_commit_fails_sends_nothing_and_is_tried_again(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "homenet.db")
    other = sqlite3.connect(rig.path, isolation_level=None)  # a full disk, as SQLite reports one
    other.execute("CREATE TRIGGER full BEFORE INSERT ON devices BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
    rig.heal = lambda: other.execute("DROP TRIGGER full")
    assert rig.engine.run([Message("nas-1")])
    assert rig.failed == [f"cannot write {rig.path}: disk is full; 1 kept, retry in 0.5"]
    assert rig.log == [("handle", "nas-1"), ("rolled back", None),  # nothing sent, nothing acked
                       ("handle", "nas-1"), ("commit", 1), ("send", ("nas-1", True)), ("ack", "nas-1")]


def test_a_fenced_batch_sends_nothing_and_stops_the_worker(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "homenet.db")
    SqliteStore(rig.path).claim_epoch()  # another configurator took over
    assert not rig.engine.run([Message("nas-1")])
    assert rig.log == [("handle", "nas-1"), ("fenced", "epoch 2 was claimed by another configurator; this one has 1")]
    assert SqliteStore(rig.path, read_only=True).get("nas-1") is None


def test_the_worker_handles_what_is_put_and_finishes_it_when_stopped(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "homenet.db")
    rig.engine.start()
    for device_id in ("nas-1", "nas-2", "nas-3"):
        rig.engine.put(Message(device_id))
    rig.engine.stop(timeout=10)
    assert not rig.engine.thread.is_alive()
    assert [e for e in rig.log if e[0] == "ack"] == [("ack", "nas-1"), ("ack", "nas-2"), ("ack", "nas-3")]


@pytest.fixture
def devices(tmp_path: Path) -> tuple[Devices, Engine, list[tuple[str, bytes]]]:
    """The device protocol handler on a store and a fake outbox: what it publishes is a list."""
    settings = ConfiguratorSettings(data_dir=tmp_path)
    store = SqliteStore(tmp_path / "homenet.db")
    epoch = store.claim_epoch()
    sent: list[tuple[str, bytes]] = []
    engine = Engine(store.transaction, lambda m: handler.receive(m), lambda _m: None, lambda _r: None,
                    lambda *_a: None, lambda: None, lambda *_a: None)
    publisher = Publisher(Topics(settings.root), settings.configurator_id, KeyPair.generate(),
                          SequenceCounter(0, lambda _c: None), epoch,
                          lambda topic, payload, **_kw: sent.append((topic, payload)), engine.later, Bus())
    driver = MemoryGatewayDriver(lan_plan(settings.lan))
    planner = Planner(store, driver, engine, publisher, Bus())
    parts = Parts(settings, store, driver, None, engine, publisher, planner)
    handler = Devices(parts, lambda _p: None, lambda _p: None, lambda *_a, **_kw: None, lambda: None)
    return handler, engine, sent


def test_a_device_handler_runs_on_a_store_and_a_fake_outbox(devices) -> None:
    handler, engine, sent = devices
    topics = handler.out.topics
    key = KeyPair.generate()
    info = DeviceInfo(device_id="nas-1", device_type="nas", public_key=b64(key.public),
                      interfaces=[Interface(name="eth0", mac="02:00:00:00:00:01")])
    _, payload = encode("register", info, sender="nas-1", seq=1, sign=key.sign)
    register = SimpleNamespace(topic=topics.device("nas-1", "register"), payload=payload, retain=False, dup=False, qos=1)
    assert engine.run([register])
    assert handler.store.get("nas-1").state == State.CONFIGURING
    replies = [decode(p, expected_kind="register.reply")[1] for t, p in sent if t == topics.device("nas-1", "register/reply")]
    assert [r.status for r in replies] == [RegisterStatus.ACCEPTED]
    assert topics.device("nas-1", "config") in [t for t, _ in sent]

    del sent[:]
    _, older = encode("register", info, sender="nas-1", seq=0, sign=key.sign)
    assert engine.run([SimpleNamespace(**{**vars(register), "payload": older})])  # refused with an event
    [(topic, payload)] = sent
    _, event = decode(payload, expected_kind="event")
    assert topic == topics.events and event.event == "message.rejected"
    assert event.reason.startswith("replayed or out of order: seq 0 is not above 1")
