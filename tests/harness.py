"""A configurator, agents and an `events` watcher on a real broker, driven from a test."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from homenet.agent.app import build as build_agent
from homenet.agent.service import Agent
from homenet.brokers import BrokerHandle
from homenet.configurator.app import ADMIN, ADMIN_SECRET, build as build_configurator, db_path
from homenet.configurator.extensions import Extensions
from homenet.configurator.gatewaystate import merge
from homenet.configurator.lifecycle import State
from homenet.configurator.records import DeviceRecord
from homenet.configurator.service import Configurator
from homenet.configurator.store import SqliteStore
from homenet.mqtt import BrokerUrl, make_client, set_nodelay
from homenet.schemas import Topics
from homenet.schemas.messages import GatewayDevice, GatewaySummary
from homenet.settings import AgentSettings, ConfiguratorSettings, GatewaySettings, LanSettings


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Watcher:
    """Collects every message under the topic root, as `mosquitto_sub -v -t 'homenet/#'` would."""

    def __init__(self, url: str, topics: Topics, login: tuple[str, str] | None = None,
                 cafile: Path | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        broker = BrokerUrl.parse(url)
        self.client = make_client(f"test-watcher-{id(self)}", clean_session=True,
                                  username=login[0] if login else None, password=login[1] if login else None,
                                  cafile=cafile if broker.tls else None)
        ready = threading.Event()

        def on_connect(client: Any, *_: Any) -> None:
            set_nodelay(client)
            client.subscribe(topics.all, qos=1)

        def on_subscribe(*_: Any) -> None:
            ready.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with self._lock:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        ready.wait(10)
        self.events_topic = topics.events

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p)["body"] for t, p, _ in self.messages if t == self.events_topic]

    def wait_event(self, name: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((e for e in self.events() if e["event"] == name
                         and all(m in str(e.get(k, "")) for k, m in match.items())), None)
        return wait_until(find, timeout, f"event {name} {match}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(url: str, wanted: int, timeout: float = 20.0,
             login: tuple[str, str] | None = None) -> dict[str, bytes]:
    """The retained messages a newcomer gets from the broker (topic -> payload), once there are
    `wanted` of them. A fresh subscriber each time: to one already subscribed, a message
    published later arrives live, without the retain flag."""
    deadline = time.monotonic() + timeout
    while True:
        watcher = Watcher(url, Topics(), login)
        time.sleep(0.5)
        with watcher._lock:
            found = {t: p for t, p, r in watcher.messages if r and p}
        watcher.close()
        if len(found) >= wanted:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{wanted} retained messages wanted, got {sorted(found)}")


def gateway_view(messages: list[tuple[str, bytes, bool]], topics: Topics) -> dict[str, Any] | None:
    """The whole gateway state, as `merge` puts together the latest `gateway/state` and every
    device's `gateway/device/{id}` seen (an empty payload deletes one); None before a summary."""
    summary, devices = None, {}
    prefix = topics.gateway_devices[:-1]
    for topic, payload, _ in messages:
        if topic == topics.gateway_state:
            summary = GatewaySummary.model_validate(json.loads(payload)["body"])
        elif topic.startswith(prefix):
            if payload:
                devices[topic[len(prefix):]] = GatewayDevice.model_validate(json.loads(payload)["body"])
            else:
                devices.pop(topic[len(prefix):], None)
    return merge(summary, devices.values()).model_dump(mode="json") if summary else None


def load_records(data_dir: Path) -> dict[str, DeviceRecord]:
    """The configurator's database as a fresh reader sees it (it must always load)."""
    store = SqliteStore(db_path(data_dir), read_only=True)
    try:
        return {r.device_id: r for r in store.all()}
    finally:
        store.close()


class Gateway:
    """The configurator under test, plus the agents a test starts, all cleaned up at the end."""

    def __init__(self, broker: BrokerHandle, tmp: Path, lan: LanSettings | None = None,
                 accounts_file: Path | None = None, enrollment: str = "auto",
                 dynsec_admin: tuple[str, str] | None = None, extensions: GatewaySettings | None = None,
                 **settings: Any) -> None:
        """With `accounts_file` (the one the broker reads), or with Mosquitto's `dynsec_admin`
        login, the configurator issues accounts and the watcher logs in as the gateway's local
        operator. `extensions`: the extensions' settings (its `configurator` section is
        replaced), started around the configurator as `gateway run` does. `settings`: more
        ConfiguratorSettings (e.g. `reconcile_interval`)."""
        self.broker = broker
        self.tmp = tmp
        self.lan = lan or LanSettings()
        self.accounts_file = accounts_file
        self.dynsec_admin = dynsec_admin
        self.enrollment = enrollment
        self.settings = settings
        self.extension_settings = extensions
        self.extensions: Extensions | None = None
        self.topics = Topics()
        self.configurator: Configurator | None = None
        self.agents: list[Agent] = []
        self.watcher: Watcher | None = None

    @property
    def data_dir(self) -> Path:
        return self.tmp / "gateway"

    def database_digest(self) -> str:
        """A digest of every byte committed to the database (the file and its write-ahead log):
        it stays the same exactly when nothing was written."""
        db = db_path(self.data_dir)
        files = [db, db.with_name(db.name + "-wal")]
        return hashlib.sha256(b"".join(p.read_bytes() for p in files if p.exists())).hexdigest()

    def start(self) -> Configurator:
        dynsec: dict[str, Any] = {}
        if self.dynsec_admin:
            secret = self.tmp / "dynsec-admin.secret"
            secret.write_text(self.dynsec_admin[1] + "\n")
            dynsec = {"dynsec_admin": self.dynsec_admin[0], "dynsec_admin_password_file": secret}
        self.configurator = build_configurator(ConfiguratorSettings(
            broker=self.broker.url, data_dir=self.data_dir, lan=self.lan, accounts_file=self.accounts_file,
            enrollment=self.enrollment, broker_cafile=self.broker.cafile, **dynsec, **self.settings))
        if self.watcher is None:
            self.watcher = Watcher(self.broker.url, self.topics, self.admin, self.broker.cafile)
        if self.extension_settings is not None:
            self.extensions = Extensions(self.configurator, self.extension_settings.model_copy(
                update={"configurator": self.configurator.settings}))
            self.extensions.start()
        self.configurator.start()
        wait_until(self.configurator.connected.is_set, what="configurator connected")
        return self.configurator

    @property
    def admin(self) -> tuple[str, str] | None:
        """The gateway's local operator login, when accounts are on."""
        secret = self.data_dir / ADMIN_SECRET
        accounts = self.accounts_file or self.dynsec_admin
        return (ADMIN, secret.read_text().strip()) if accounts and secret.exists() else None

    def stop(self) -> None:
        if self.configurator:
            self.configurator.stop()
            if self.extensions:
                self.extensions.stop()
            self.configurator.store.close()
            self.configurator = None

    def agent(self, device_type: str, device_id: str | None = None, start: bool = True, **settings: Any) -> Agent:
        """A simulated agent; `settings`: more AgentSettings, e.g. `info_interval`."""
        device_id = device_id or f"test-{device_type}"
        agent = build_agent(AgentSettings(broker=self.broker.url, device_id=device_id, device_type=device_type,
                                          model=f"Test {device_type}", collector="simulated",
                                          broker_fingerprint=self.broker.fingerprint,
                                          data_dir=self.tmp / "agents" / device_id, **settings))
        self.agents.append(agent)
        if start:
            agent.start()
        return agent

    def stop_agent(self, agent: Agent) -> None:
        agent.stop()
        self.agents.remove(agent)

    def record(self, device_id: str) -> DeviceRecord | None:
        assert self.configurator is not None
        return self.configurator.store.get(device_id)

    def wait_configured(self, device_id: str, version: int = 1, timeout: float = 15.0) -> DeviceRecord:
        def done() -> DeviceRecord | None:
            r = self.record(device_id)
            return r if r and r.state == State.CONFIGURED and r.version == version else None
        return wait_until(done, timeout, f"{device_id} configured at version {version}")

    def close(self) -> None:
        for agent in list(self.agents):
            agent.stop()
        self.stop()
        if self.watcher:
            self.watcher.close()
