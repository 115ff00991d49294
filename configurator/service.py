"""The configurator service: wire contract v1 over paho-mqtt around the pure core.

This is the facade that wires the parts and holds the MQTT connection; how the batches, the
commit and the outbox work is told at the top of engine.py. Where things are:

| module | what |
|---|---|
| `engine.py` | batches, one transaction each, outbox after commit, manual acks, fencing |
| `publisher.py` | signing, numbering and sending through the outbox; `events` |
| `planner.py` | writing a record and what follows: plan, config sent, gateway applied and published |
| `devices.py` | the device protocol: register, info, config.result, status, config seen |
| `commands.py` | the operator's commands: approve, reject, pair, reset, refresh, forget, replace, users |
| `tasks.py` | renumbering, reconciliation, quarantines ending |
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import paho.mqtt.client as paho

from homenet.mqtt import BrokerUrl, make_client, set_nodelay
from homenet.accounts import AccountStore
from homenet.keys import KeyPair
from homenet.schemas import Topics, decode
from homenet.schemas.messages import DeviceInfo, ItemResult, Severity
from homenet.sequence import SequenceCounter
from homenet.settings import ConfiguratorSettings

from .bus import Bus, Committed
from .commands import Commands
from .devices import Devices
from .engine import Engine, Task
from .gateway import GatewayDriver
from .holdings import Holdings
from .ipam import LanPlan
from .lanwatch import LanWatch
from .newcomers import Newcomers
from .planner import Parts, Planner
from .profiles import Profile
from .publisher import Publisher
from .store import Fenced, Store, StoreError
from .tasks import Tasks

log = logging.getLogger(__name__)

SUBSCRIBED_CHANNELS = ("register", "config/result", "info", "status", "config")


class Extension(Protocol):
    """A feature beside the core (design: extensions): `start` and `stop` with the service."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


class Configurator:
    def __init__(self, settings: ConfiguratorSettings, store: Store, driver: GatewayDriver,
                 key: KeyPair, accounts: AccountStore | None = None, login: tuple[str, str] | None = None,
                 client_id: str | None = None) -> None:
        """`accounts`: the broker accounts this configurator issues (None: no broker auth);
        `login`: its own (username, password) on the broker; `client_id`: its MQTT client id
        (default `homenet-<configurator id>`)."""
        self.settings = settings
        self.key = key
        self.accounts = accounts
        self.store = store
        self.driver = driver
        self.topics = Topics(settings.root)
        self.sender = settings.configurator_id
        self.epoch = store.claim_epoch()
        self.connected = threading.Event()
        self.fenced = threading.Event()
        """Set when another configurator took over: this one has stopped sending."""
        self.bus = Bus()
        """What was committed, for the extensions (configurator/bus.py)."""
        self.close_session: Callable[[str], None] | None = None
        """Closes a client's connection at the broker, where the broker lets the configurator
        do it (the embedded one, in `homenet gateway run`); Mosquitto's dynamic security closes
        it itself when the account is deleted."""
        self._replanned = False
        self.engine = Engine(self._transaction, self._receive, self._ack, self._stand_down,
                             self._report_failed_commit, self._rolled_back, self._committed)
        seq = SequenceCounter(int(store.meta().get("seq_reserved", 0)),
                              lambda ceiling: store.set_meta_now(seq_reserved=ceiling))
        self.publisher = Publisher(self.topics, self.sender, key, seq, self.epoch,
                                   lambda *args, **kwargs: self.client.publish(*args, **kwargs),
                                   self.engine.later, self.bus)
        self.planner = Planner(store, driver, self.engine, self.publisher, self.bus)
        parts = Parts(settings, store, driver, accounts, self.engine, self.publisher, self.planner)
        self.tasks = Tasks(parts, self.connected)
        self.lan_watch = LanWatch(driver, self.renumber, settings.gateway.lan_check_interval)
        self.devices = Devices(parts, self._on_command, self._on_configurator_state, self.tasks.reconcile,
                               self.lan_watch.poke)
        self.commands = Commands(parts, self.devices, lambda: self.close_session)
        self.broker = BrokerUrl.parse(settings.broker)
        self.client = make_client(client_id or f"homenet-{self.sender}", clean_session=False,
                                  username=login[0] if login else None, password=login[1] if login else None,
                                  will=(self.topics.configurator_state, self.publisher.state_payload("offline")),
                                  cafile=settings.broker_cafile if self.broker.tls else None,
                                  manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # Extensions started and stopped with the service (configurator/cloudlink.py; it hears
        # what was committed on `bus`), and asked for a model's own profile when planning.
        self.extensions: list[Extension] = []
        for record in store.all():  # a fresh gateway (reboot, new driver) is caught up at once
            if record.config:
                self.gateway_reported(record.device_id, driver.apply(record.config))

    # --- what the extensions and the app use -------------------------------------------------

    @property
    def holdings(self) -> Holdings:
        return self.planner.holdings

    @property
    def newcomers(self) -> Newcomers:
        return self.devices.newcomers

    @property
    def profile_source(self) -> Callable[[DeviceInfo], Profile | None]:
        """Asked for a model's own profile when planning (an extension's, e.g. cloudlink.py)."""
        return self.planner.profile_source

    @profile_source.setter
    def profile_source(self, source: Callable[[DeviceInfo], Profile | None]) -> None:
        self.planner.profile_source = source

    def event(self, name: str, severity: Severity = Severity.INFO, **fields: Any) -> None:
        """Log and publish an audit entry on `events` (publisher.py)."""
        self.publisher.event(name, severity, **fields)

    def publish_gateway_state(self) -> None:
        """What the driver has set, retained on `gateway/state` and `gateway/device/{id}` (also
        called by the driver's retries); a batch sends it once, after all its gateway changes."""
        self.planner.publish_gateway_state()

    def gateway_reported(self, device_id: str, results: list[ItemResult]) -> None:
        """Keep in the device's record what holds of its gateway items (from any thread)."""
        self.planner.gateway_reported(device_id, results)

    def renumber(self, lan: LanPlan, timeout: float = 60.0) -> None:
        """The gateway's LAN moved to `lan` (docs/renumbering.md); returns once that is committed."""
        self.tasks.renumber(lan, timeout)

    # --- lifecycle of the service --------------------------------------------------------

    def start(self) -> None:
        self.engine.start()
        self.tasks.start()
        for extension in self.extensions:
            extension.start()
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()

    def submit(self, task: Task) -> None:
        """Run `task` on the worker, in a batch of its own (for extensions, from their threads)."""
        self.engine.put(task)

    def replan(self) -> None:
        """Plan every device again (an extension learned something that changes plans)."""
        self.submit(self.planner.replan_all)

    def reconcile_now(self) -> None:
        """Reconcile every device now, correcting what drifted (as `drift` allows)."""
        self.submit(self.tasks.reconcile_all)

    def problem(self) -> str | None:
        """What keeps this configurator from serving, for a watchdog: None while its threads run."""
        dead = [t.name for t in (self.engine.thread, self.tasks.ticker) if not t.is_alive()]
        return f"configurator thread {', '.join(dead)} ended" if dead else None

    def stop(self) -> None:
        """Finish what was received, say `offline`, disconnect (so the will is not sent)."""
        for extension in self.extensions:
            extension.stop()
        self.tasks.stop()
        self.engine.stop(timeout=30)
        if self.connected.is_set() and not self.fenced.is_set():
            try:
                self.store.check_fence()  # fenced, its `offline` would hide the new primary's `online`
                self.client.publish(self.topics.configurator_state, self.publisher.state_payload("offline"),
                                    qos=1, retain=True).wait_for_publish(timeout=5)
            except Fenced as exc:
                self._stand_down(str(exc))
        self.client.disconnect()
        self.client.loop_stop()
        self.lan_watch.stop()
        self.driver.close()

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker %s refused the configurator: %s", self.broker, reason)
            return
        set_nodelay(client)
        if self.fenced.is_set():
            return
        client.subscribe([(self.topics.device_filter(c), 1) for c in SUBSCRIBED_CHANNELS]
                         + [(self.topics.command, 1), (self.topics.configurator_state, 1)])
        self.engine.put(self._caught_up)  # in order: before anything the subscriptions bring

    def _caught_up(self) -> None:
        """After every (re)connect: announce, re-plan once after start, republish the rest."""
        self.publisher.online()
        self._presume_offline()
        sent: set[str] = set()
        if not self._replanned:  # the LAN or the policy may have changed while we were down
            self._replanned = True
            sent = self.planner.replan_all()
            self.engine.later(self.lan_watch.start)
        # The broker may have lost its retained messages (amqtt keeps none across restarts); a
        # config just re-planned is not sent in its old version first (it would come back to us).
        self.planner.gateway_published.forget()  # its retained parts too may be gone
        for record in self.store.all():
            if record.config_payload and record.device_id not in sent:
                self.publisher.publish_raw(self.topics.device(record.device_id, "config"),
                                           record.config_payload.encode(), retain=True)
        self.publish_gateway_state()
        self.tasks.reconcile_all()
        self.engine.later(log.info, "configurator %s (epoch %d) online at %s", self.sender, self.epoch, self.broker)
        self.engine.later(self.connected.set)

    def _presume_offline(self) -> None:
        """Nobody is online until it says so on this connection. While the configurator was
        away (a restart, a power cut) devices may have gone, and a broker that restarted sends
        no wills for them: the `status` each connected agent keeps retained, or publishes when
        it connects again, marks it online once more (it comes after this, in order)."""
        stale = [r for r in self.store.all() if r.online]
        for record in stale:
            self.planner.put(record.model_copy(update={"online": False}))
        if stale:
            self.engine.later(log.info, "%d devices shown offline until they say they are online again", len(stale))

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        if not self.engine.stopping:
            log.warning("disconnected from broker %s (%s); reconnecting", self.broker, reason)

    # --- what the engine is given ----------------------------------------------------------

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self.engine.put(msg)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # accounts first: a reply's credentials must work when the commit lets it out
        with self.store.transaction(), self._accounts_batch():
            yield

    def _accounts_batch(self) -> AbstractContextManager[None]:
        return self.accounts.batch() if self.accounts is not None else nullcontext()

    def _receive(self, msg: paho.MQTTMessage) -> None:
        self.devices.receive(msg)

    def _on_command(self, payload: bytes) -> None:
        self.commands.on_command(payload)

    def _ack(self, msg: paho.MQTTMessage) -> None:
        if msg.qos:
            self.client.ack(msg.mid, msg.qos)

    def _committed(self, seconds: float, items: int) -> None:
        self.bus.emit(Committed(seconds, items))

    def _rolled_back(self) -> None:
        self.planner.reload()

    def _report_failed_commit(self, exc: Exception, messages: int, delay: float) -> None:
        reason = f"{exc}; {messages} messages kept unacknowledged, retrying in {delay:.1f} s"
        try:
            self.event("store.failed", Severity.ERROR, reason=reason)
        except (StoreError, OSError):  # the event's sequence number needs the disk too
            log.error("store.failed: %s", reason)

    def _stand_down(self, reason: str) -> None:
        """Another configurator has a higher epoch: send nothing more, leave without a will
        (its `offline` would overwrite the new primary's `online`). Its own `online`, if it is
        still the retained state, is replaced by the process standing by (standby.py)."""
        log.error("standing down: %s", reason)
        self.fenced.set()
        self.connected.clear()
        self.client.disconnect()

    def _on_configurator_state(self, payload: bytes) -> None:
        """The retained state must be this primary's `online`: what a configurator that stood
        down (or a stale one) left there is replaced."""
        if not payload:
            self.publisher.online()
            return
        _, state = decode(payload, expected_kind="configurator.state")
        if (state.state, state.epoch) != ("online", self.epoch) and state.epoch <= self.epoch:
            log.info("configurator/state says %s (epoch %d); this primary (epoch %d) says online again",
                     state.state, state.epoch, self.epoch)
            self.publisher.online()
