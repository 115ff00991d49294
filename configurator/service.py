"""The configurator service: wire contract v1 over paho-mqtt around the pure core.

Theory of operation. paho's network thread only queues what arrives. One worker thread takes
everything waiting (up to MAX_BATCH) and handles it inside one store transaction: each
handler validates (topic, envelope, body, sender binding, seq), computes the new device
record with the core and puts it; what it would send (replies, retained configs, events,
gateway changes) is held back in an outbox. After the batch commits (one fsync for all of
it) the outbox goes out, then the broker gets its PUBACKs (manual acks): no acknowledgement,
at the MQTT level or ours, is ever ahead of the database. If the commit fails, nothing goes
out, the store is as before, and the same batch is tried again with backoff; the broker
keeps the unacknowledged messages meanwhile. A batch whose commit finds that another
configurator claimed a higher epoch (`Fenced`; checked even when the batch wrote nothing)
makes this one stand down without sending anything: it disconnects cleanly, so its will does
not cover the new primary's `online`, and sets `fenced` (configurator/standby.py).
The LAN watch's renumbering is queued onto the worker like a message.
A message that fails validation is dropped with a log line and an `events` entry.
Reconciliation (`reconcile.py`) runs every `reconcile_interval` seconds, after every connect,
and for one device on its `info` and `config.result`: it compares committed state only, after
the batch's commit, and a correction that writes queues a task of its own.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import partial
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import paho.mqtt.client as paho
from pydantic import TypeAdapter, ValidationError

from homenet.mqtt import BrokerUrl, make_client, set_nodelay
from homenet.accounts import AccountError, AccountStore
from homenet.acl import Role
from homenet.keys import KeyPair
from homenet.schemas import (MAX_PAYLOAD, ContractError, Envelope, Topics, TopicError, decode, encode, signed_by,
                             strictjson)
from homenet.schemas.results import result_problem
from homenet.schemas.signing import b64, canonical_pairing_code, fingerprint, pairing_code, unb64
from homenet.schemas.messages import (Command, CommandReply, Config, ConfigItem, ConfigResult, ConfiguratorState,
                                      DeviceInfo,
                                      DeviceStatus,
                                      Event as EventBody, ItemResult, ItemStatus, Model,
                                      RegisterReply, RegisterStatus, ResultStatus, Rpc, Severity)
from homenet.sequence import SequenceCounter
from homenet.settings import ConfiguratorSettings

from .bus import Bus, Committed, DeviceChanged
from .gateway import GatewayDriver
from .gatewaystate import Published
from .holdings import Holdings, held_by
from .ipam import quarantine, quarantined
from .ipam import LanPlan
from .newcomers import Newcomers
from .lanwatch import LanWatch
from .lifecycle import PLANNABLE, Event, State, advance
from .policy import NetworkView, PlanError, evaluate
from .profiles import Profile
from .reconcile import Check, DriftTracker, GatewayListing, Side, device_drift, gateway_drift
from .records import DeviceRecord, now
from .renumber import lan_plan, left_the_lan, saved, saved_plan
from .store import Fenced, Store, StoreError

log = logging.getLogger(__name__)

_LEVEL = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING, Severity.ERROR: logging.ERROR}
SUBSCRIBED_CHANNELS = ("register", "config/result", "info", "status", "config")
MAX_BATCH = 500
"""Messages handled in one transaction at most: bounds the work lost to one failed commit."""
_STOP = object()
Task = Callable[[], None]


RETIRED_KEPT = 100
"""Forgotten devices whose settings a replacement unit can still take."""
_CONFIG_ITEM: TypeAdapter[ConfigItem] = TypeAdapter(ConfigItem)


def _model_of(info: DeviceInfo) -> list[str]:
    return [info.device_type, info.maker, info.model]


def _describe(model: list[str]) -> str:
    device_type, *made = model
    return f"{device_type} ({' '.join(m for m in made if m) or 'no model'})"


class Extension(Protocol):
    """A feature beside the core (design: extensions): `start` and `stop` with the service."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


class Rejected(Exception):
    """A message that is dropped; the text is the reason given in the log and the event."""


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
        self._seq = SequenceCounter(int(store.meta().get("seq_reserved", 0)),
                                    lambda ceiling: store.set_meta_now(seq_reserved=ceiling))
        self.holdings = self._holdings()
        hosts = max(1, self.driver.lan().subnet.num_addresses - 2)
        self.newcomers = Newcomers(settings.max_new_devices or hosts)
        self._limited = [0, 0.0]
        """Registers dropped by the budget since the last event, and when that was."""
        self.connected = threading.Event()
        self.fenced = threading.Event()
        """Set when another configurator took over: this one has stopped sending."""
        self.bus = Bus()
        """What was committed, for the extensions (configurator/bus.py)."""
        self.close_session: Callable[[str], None] | None = None
        """Closes a client's connection at the broker, where the broker lets the configurator
        do it (the embedded one, in `homenet gateway run`); Mosquitto's dynamic security closes
        it itself when the account is deleted."""
        self._stopping = False
        self._replanned = False
        self._inbox: queue.SimpleQueue[paho.MQTTMessage | Task | object] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="configurator", daemon=True)
        self._drift = DriftTracker(settings.drift == "correct", settings.reconcile_interval)
        self._halt = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="reconcile", daemon=True)
        self._outbox = threading.local()
        self._gateway_published = Published()
        self._gateway_lock = threading.Lock()
        self.lan_watch = LanWatch(driver, self.renumber, settings.gateway.lan_check_interval)
        self.broker = BrokerUrl.parse(settings.broker)
        self.client = make_client(client_id or f"homenet-{self.sender}", clean_session=False,
                                  username=login[0] if login else None, password=login[1] if login else None,
                                  will=(self.topics.configurator_state, self._state_payload("offline")),
                                  cafile=settings.broker_cafile if self.broker.tls else None,
                                  manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._handlers: dict[str, Callable[[str, Envelope, Any, DeviceRecord | None], None]] = {
            "register": self._on_register, "config.result": self._on_result, "info": self._on_info}
        # Extensions started and stopped with the service (configurator/cloudlink.py; it hears
        # what was committed on `bus`), and asked for a model's own profile when planning.
        self.extensions: list[Extension] = []
        self.profile_source: Callable[[DeviceInfo], Profile | None] = lambda _info: None
        for record in store.all():  # a fresh gateway (reboot, new driver) is caught up at once
            if record.config:
                self.gateway_reported(record.device_id, driver.apply(record.config))

    # --- lifecycle of the service --------------------------------------------------------

    def start(self) -> None:
        self._worker.start()
        self._ticker.start()
        for extension in self.extensions:
            extension.start()
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()

    def submit(self, task: Task) -> None:
        """Run `task` on the worker, in a batch of its own (for extensions, from their threads)."""
        self._inbox.put(task)

    def replan(self) -> None:
        """Plan every device again (an extension learned something that changes plans)."""
        self.submit(self._replan_all)

    def reconcile_now(self) -> None:
        """Reconcile every device now, correcting what drifted (as `drift` allows)."""
        self.submit(self._reconcile_all)

    def problem(self) -> str | None:
        """What keeps this configurator from serving, for a watchdog: None while its threads run."""
        dead = [t.name for t in (self._worker, self._ticker) if not t.is_alive()]
        return f"configurator thread {', '.join(dead)} ended" if dead else None

    def stop(self) -> None:
        """Finish what was received, say `offline`, disconnect (so the will is not sent)."""
        for extension in self.extensions:
            extension.stop()
        self._stopping = True
        self._halt.set()
        self._inbox.put(_STOP)
        self._worker.join(timeout=30)
        if self.connected.is_set() and not self.fenced.is_set():
            try:
                self.store.check_fence()  # fenced, its `offline` would hide the new primary's `online`
                self.client.publish(self.topics.configurator_state, self._state_payload("offline"),
                                    qos=1, retain=True).wait_for_publish(timeout=5)
            except Fenced as exc:
                self._stand_down(str(exc))
        self.client.disconnect()
        self.client.loop_stop()
        self.lan_watch.stop()
        self.driver.close()

    def _state_payload(self, state: str) -> bytes:
        body = ConfiguratorState(state=state, configurator_id=self.sender, epoch=self.epoch,
                                 public_key=b64(self.key.public))
        return encode("configurator.state", body, sender=self.sender, seq=self._seq.next(), sign=self.key.sign)[1]

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker %s refused the configurator: %s", self.broker, reason)
            return
        set_nodelay(client)
        if self.fenced.is_set():
            return
        client.subscribe([(self.topics.device_filter(c), 1) for c in SUBSCRIBED_CHANNELS]
                         + [(self.topics.command, 1), (self.topics.configurator_state, 1)])
        self._inbox.put(self._caught_up)  # in order: before anything the subscriptions bring

    def _caught_up(self) -> None:
        """After every (re)connect: announce, re-plan once after start, republish the rest."""
        self._publish_raw(self.topics.configurator_state, self._state_payload("online"), retain=True)
        self._presume_offline()
        sent: set[str] = set()
        if not self._replanned:  # the LAN or the policy may have changed while we were down
            self._replanned = True
            sent = self._replan_all()
            self._later(self.lan_watch.start)
        # The broker may have lost its retained messages (amqtt keeps none across restarts); a
        # config just re-planned is not sent in its old version first (it would come back to us).
        self._gateway_published.forget()  # its retained parts too may be gone
        for record in self.store.all():
            if record.config_payload and record.device_id not in sent:
                self._publish_raw(self.topics.device(record.device_id, "config"), record.config_payload.encode(),
                                  retain=True)
        self.publish_gateway_state()
        self._reconcile_all()
        self._later(log.info, "configurator %s (epoch %d) online at %s", self.sender, self.epoch, self.broker)
        self._later(self.connected.set)

    def _presume_offline(self) -> None:
        """Nobody is online until it says so on this connection. While the configurator was
        away (a restart, a power cut) devices may have gone, and a broker that restarted sends
        no wills for them: the `status` each connected agent keeps retained, or publishes when
        it connects again, marks it online once more (it comes after this, in order)."""
        stale = [r for r in self.store.all() if r.online]
        for record in stale:
            self._put(record.model_copy(update={"online": False}))
        if stale:
            self._later(log.info, "%d devices shown offline until they say they are online again", len(stale))

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        if not self._stopping:
            log.warning("disconnected from broker %s (%s); reconnecting", self.broker, reason)

    # --- the worker: batches, group commits, the outbox ------------------------------------

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self._inbox.put(msg)

    def _work(self) -> None:
        while True:
            batch = [self._inbox.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            work = [item for item in batch if item is not _STOP]
            if work and not self._run(work):
                return
            if len(work) < len(batch):
                return

    def _run(self, batch: list[Any]) -> bool:
        """Handle, commit, send, acknowledge; retry the batch while the commit fails. False:
        this configurator was fenced and must stop."""
        delay = 0.5
        while True:
            actions: list[Task] = []
            self._outbox.actions, self._outbox.gateway_changed = actions, False
            try:
                # accounts first: a reply's credentials must work when the commit lets it out
                started = time.perf_counter()
                with self.store.transaction(), self._accounts_batch():
                    for item in batch:
                        self._handle(item)
                self.bus.emit(Committed(time.perf_counter() - started, len(batch)))
                break
            except Fenced as exc:
                self._stand_down(str(exc))
                return False
            except (StoreError, AccountError, OSError) as exc:
                self._outbox.actions = None  # what the batch would have sent is dropped
                self.holdings = self._holdings()  # the store is back as it was
                self._report_failed_commit(exc, sum(isinstance(i, paho.MQTTMessage) for i in batch), delay)
                if self._stopping:
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 30)
            finally:
                self._outbox.actions = None
        for action in actions:
            action()
        if self._outbox.gateway_changed:
            self._send_gateway_state()
        for item in batch:
            if isinstance(item, paho.MQTTMessage) and item.qos:
                self.client.ack(item.mid, item.qos)
        return True

    def _report_failed_commit(self, exc: Exception, messages: int, delay: float) -> None:
        reason = f"{exc}; {messages} messages kept unacknowledged, retrying in {delay:.1f} s"
        try:
            self.event("store.failed", Severity.ERROR, reason=reason)
        except (StoreError, OSError):  # the event's sequence number needs the disk too
            log.error("store.failed: %s", reason)

    def _accounts_batch(self) -> AbstractContextManager[None]:
        return self.accounts.batch() if self.accounts is not None else nullcontext()

    def _handle(self, item: Any) -> None:
        if isinstance(item, paho.MQTTMessage):
            self._handle_message(item)
            return
        try:
            item()
        except (Fenced, StoreError):
            raise
        except Exception:  # a bug must not stop the service
            log.exception("internal error in %s", getattr(item, "__name__", item))

    def _later(self, action: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run `action` once the batch being handled has committed (now, outside a batch)."""
        actions = getattr(self._outbox, "actions", None)
        if actions is None:
            action(*args, **kwargs)
        else:
            actions.append(lambda: action(*args, **kwargs))

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
            self._publish_raw(self.topics.configurator_state, self._state_payload("online"), retain=True)
            return
        _, state = decode(payload, expected_kind="configurator.state")
        if (state.state, state.epoch) != ("online", self.epoch) and state.epoch <= self.epoch:
            log.info("configurator/state says %s (epoch %d); this primary (epoch %d) says online again",
                     state.state, state.epoch, self.epoch)
            self._publish_raw(self.topics.configurator_state, self._state_payload("online"), retain=True)

    # --- publishing ----------------------------------------------------------------------

    def _publish(self, topic: str, kind: str, body: Model, *, retain: bool = False) -> str:
        msg_id, payload = encode(kind, body, sender=self.sender, seq=self._seq.next(), sign=self.key.sign)
        self._publish_raw(topic, payload, retain=retain)
        return msg_id

    def _publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._later(self.client.publish, topic, payload, qos=1, retain=retain)

    def event(self, name: str, severity: Severity = Severity.INFO, *, device_id: str | None = None,
              reason: str = "", topic: str | None = None, sender: str | None = None, **detail: Any) -> None:
        """Log and publish an audit entry on `events`."""
        log.log(_LEVEL[severity], "%s%s%s%s", name, f" device={device_id}" if device_id else "",
                f" topic={topic} sender={sender}" if topic else "", f": {reason}" if reason else "")
        body = EventBody(event=name, severity=severity, device_id=device_id, topic=topic,
                         sender=sender, reason=reason, detail=detail)
        self._publish(self.topics.events, "event", body)
        self._later(self.bus.emit, body)

    def publish_gateway_state(self) -> None:
        """What the driver has set, retained on `gateway/state` and `gateway/device/{id}` (also
        called by the driver's retries); a batch sends it once, after all its gateway changes."""
        if threading.current_thread() is self._worker:
            self._outbox.gateway_changed = True
        else:
            self._send_gateway_state()

    def _send_gateway_state(self) -> None:
        """Only what changed since the last time: the summary, and each device whose part did."""
        with self._gateway_lock:  # in order, whichever thread the driver reports from
            summary, devices = self._gateway_published.changes(self.driver.state())
            for device_id, part in devices.items():
                topic = self.topics.gateway_device(device_id)
                if part is None:
                    self._publish_raw(topic, b"", retain=True)
                else:
                    self._publish(topic, "gateway.device", part, retain=True)
            if summary is not None:
                self._publish(self.topics.gateway_state, "gateway.state", summary, retain=True)

    # --- receiving -----------------------------------------------------------------------

    def _handle_message(self, msg: paho.MQTTMessage) -> None:
        sender = None
        try:
            if msg.topic == self.topics.command:
                self._on_command(msg.payload)
                return
            if msg.topic == self.topics.configurator_state:
                self._on_configurator_state(msg.payload)
                return
            topic = self.topics.parse_device(msg.topic)
            sender = topic.device_id
            if len(msg.payload) > MAX_PAYLOAD:
                raise Rejected(f"payload of {len(msg.payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
            if topic.channel == "config":
                self._on_config_seen(topic.device_id, msg.payload, msg.retain)
                return
            if not msg.payload:  # a retained message being deleted, not a message
                return
            if topic.channel == "status":
                self._on_status(topic.device_id, msg.payload)
                return
            envelope, body = decode(msg.payload, expected_kind=topic.kind)
            sender = envelope.sender
            if envelope.sender != topic.device_id:
                raise Rejected(f"sender {envelope.sender!r} published on the topic of device {topic.device_id!r}")
            if isinstance(body, DeviceInfo) and body.device_id != topic.device_id:
                raise Rejected(f"body names device {body.device_id!r} on the topic of {topic.device_id!r}")
            record = self.store.get(topic.device_id)
            if record is not None and envelope.seq <= record.last_seq:
                if msg.retain:  # our own earlier input, handed back on (re)subscribe
                    log.debug("retained %s seq %d already processed", msg.topic, envelope.seq)
                    return
                if msg.dup:
                    # QoS 1 redelivery (DUP is set by the broker, not passed on from the sender):
                    # a configurator that died after its commit and before its PUBACKs gets the
                    # batch again from its persistent session. Already processed; not a replay.
                    log.debug("redelivered %s seq %d already processed", msg.topic, envelope.seq)
                    return
                if envelope.seq == record.last_seq and record.public_key and \
                        signed_by(envelope, unb64(record.public_key) or b""):
                    # the last accepted message once more: after a broker restart the agent's
                    # re-sent retained result arrives both retained and live. Nothing to redo.
                    log.debug("%s seq %d delivered again", msg.topic, envelope.seq)
                    return
                raise Rejected(f"replayed or out of order: seq {envelope.seq} is not above "
                               f"{record.last_seq}, the last accepted from {topic.device_id}")
            if envelope.kind != "register":  # a register may bring the key; its handler checks
                self._check_signature(envelope, record)
            self._handlers[envelope.kind](msg.topic, envelope, body, record)
        except (TopicError, ContractError, Rejected) as exc:
            self.event("message.rejected", Severity.WARNING, device_id=sender, topic=msg.topic,
                       sender=sender, reason=str(exc))
        except (Fenced, StoreError):
            raise  # the batch's fate, not this message's
        except Exception as exc:  # a bug must not stop the service; say so loudly
            log.exception("internal error handling %s", msg.topic)
            self.event("internal.error", Severity.ERROR, topic=msg.topic, sender=sender,
                       reason=f"{type(exc).__name__}: {exc}")

    def _on_status(self, device_id: str, payload: bytes) -> None:
        try:
            status = DeviceStatus.model_validate(strictjson.loads(payload))
        except (ValueError, ValidationError) as exc:
            raise Rejected(f"bad status payload: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
        record = self.store.get(device_id)
        online = status.state == "online"
        if record is None or record.online == online:
            return
        self._put(record.model_copy(update={"online": online, "updated": now()}))
        self.event(f"device.{status.state}", device_id=device_id)

    # --- operator commands -----------------------------------------------------------------

    def _on_command(self, payload: bytes) -> None:
        envelope, command = decode(payload, expected_kind="command")
        try:
            handler = {"forget": self._forget, "approve": self._approve, "reject": self._reject,
                       "pair": self._pair, "reset": self._reset, "refresh": self._refresh, "replace": self._replace,
                       "user.add": self._user_add, "user.remove": self._user_remove}[command.op]
            result = handler(command)
            reply = CommandReply(re=envelope.id, ok=True, result=result)
        except (Rejected, AccountError) as exc:  # AccountError: e.g. Mosquitto refused the change
            log.warning("command %s from %s refused: %s", command.op, envelope.sender, exc)
            reply = CommandReply(re=envelope.id, ok=False, error=str(exc))
        self._publish(self.topics.command_reply, "command.reply", reply)

    def _known(self, command: Command, *states: State) -> DeviceRecord:
        record = self.store.get(command.device_id or "")
        if record is None:
            raise Rejected(f"no device {command.device_id!r}")
        if states and record.state not in states:
            raise Rejected(f"{record.device_id} is {record.state.value}, not {' or '.join(s.value for s in states)}")
        return record

    def _approve(self, command: Command) -> dict[str, Any]:
        record = self._accept(self._known(command, State.PENDING), Event.APPROVE)
        self.event("device.approved", device_id=record.device_id)
        return {"device_id": record.device_id, "address": record.address}

    def _reject(self, command: Command) -> dict[str, Any]:
        record = self._known(command, State.PENDING)
        record = record.model_copy(update={"state": advance(record.state, Event.REJECT), "updated": now()})
        self._put(record)
        self._reply(record.device_id, record.register_id, RegisterStatus.REJECTED, "rejected by the owner")
        self.event("device.rejected", Severity.WARNING, device_id=record.device_id, reason="rejected by the owner")
        return {"device_id": record.device_id}

    def _pair(self, command: Command) -> dict[str, Any]:
        try:
            code = canonical_pairing_code(command.code)
        except ValueError as exc:
            raise Rejected(str(exc)) from None
        waiting = [r for r in self.store.all() if r.state == State.PENDING and r.public_key
                   and pairing_code(unb64(r.public_key) or b"") == code]
        if len(waiting) != 1:
            self.event("pairing.failed", Severity.WARNING, reason=f"no device is waiting with pairing code {code!r}")
            raise Rejected(f"no device is waiting with pairing code {code!r}")
        return self._approve(Command(op="approve", device_id=waiting[0].device_id))

    def _reset(self, command: Command) -> dict[str, Any]:
        """Unbind the device's key (e.g. a reinstalled agent): its next register binds a new one."""
        record = self._known(command)
        self._put(record.model_copy(update={"public_key": None, "last_seq": 0, "updated": now()}))
        self._drop_account(record.device_id)
        self.event("device.reset", Severity.WARNING, device_id=record.device_id,
                   reason="key binding cleared by the operator")
        return {"device_id": record.device_id}

    def _refresh(self, command: Command) -> dict[str, Any]:
        """Ask the device for its info now (rpc `refresh`), e.g. from Home Assistant's button."""
        record = self._known(command)
        self._publish(self.topics.device(record.device_id, "rpc"), "rpc", Rpc(method="refresh"))
        return {"device_id": record.device_id}

    def _drop_account(self, name: str) -> None:
        """Revoke the account and, once that is committed, close the session it logged in."""
        if self.accounts is not None and self.accounts.get(name) is not None:
            self.accounts.remove(name)
            if self.close_session is not None:
                self._later(self.close_session, name)

    def _user_add(self, command: Command) -> dict[str, Any]:
        """An operator account for `mosquitto_sub` (read-only) or for these commands."""
        name = command.user or ""
        if self.accounts is None:
            raise Rejected("this broker authenticates nobody: there are no accounts to add")
        existing = self.accounts.get(name)
        if self.store.get(name) is not None or (existing and existing.role not in (Role.READER, Role.OPERATOR)):
            raise Rejected(f"{name!r} is the name of a device or service account")
        role = Role.READER if command.read_only else Role.OPERATOR
        password = self.accounts.set(name, role)
        self.event("user.added", reason=f"{role.value} account {name}")
        return {"username": name, "password": password, "role": role.value}

    def _user_remove(self, command: Command) -> dict[str, Any]:
        account = self.accounts.get(command.user or "") if self.accounts else None
        if account is None or account.role not in (Role.READER, Role.OPERATOR):
            raise Rejected(f"no operator account {command.user!r}")
        self.accounts.remove(account.name)
        self.event("user.removed", reason=f"{account.role.value} account {account.name}")
        return {"username": account.name}

    def _forget(self, command: Command) -> dict[str, Any]:
        """Remove the device and everything set for it; if it comes back it registers afresh."""
        record = self._known(command)
        self.store.delete(record.device_id)
        self.newcomers.settled(record.device_id)
        addresses = held_by(record)[0] if self.settings.forget_quarantine else set()
        self.holdings.hold(record.device_id, addresses)  # its ports are free at once
        if addresses:
            self.store.set_meta(quarantine=quarantine(self.store.meta(), record.device_id, addresses,
                                                      time.time() + self.settings.forget_quarantine))
        self._drop_account(record.device_id)
        self._later(self.driver.remove, record.device_id)
        for channel in ("config", "config/result", "info", "status"):  # clear its retained messages
            self._publish_raw(self.topics.device(record.device_id, channel), b"", retain=True)
        self.publish_gateway_state()
        self._retire(record)
        self.event("device.forgotten", device_id=record.device_id, address=record.address)
        return {"device_id": record.device_id, "address": record.address}

    def _retire(self, record: DeviceRecord) -> None:
        """Keep what a forgotten device had, so that a new unit of its model can take it (`replace`)."""
        if record.config is None:
            return
        retired = dict(self.store.meta().get("retired", {}))
        retired.pop(record.device_id, None)
        retired[record.device_id] = {"model": _model_of(record.info),
                                     "items": [i.model_dump(mode="json") for i in record.config.items]}
        self.store.set_meta(retired=dict(list(retired.items())[-RETIRED_KEPT:]))

    def _replace(self, command: Command) -> dict[str, Any]:
        """A new unit of a forgotten device's model takes its settings (address, port forwards),
        when the owner says so: `homenet devices replace NEW OLD`."""
        record = self._known(command, *PLANNABLE)
        retired = dict(self.store.meta().get("retired", {}))
        old = retired.get(command.predecessor or "")
        if old is None:
            raise Rejected(f"no forgotten device {command.predecessor!r} whose place {record.device_id} could take")
        if old["model"] != _model_of(record.info):
            raise Rejected(f"{record.device_id} is a {_describe(_model_of(record.info))}, {command.predecessor} was a "
                           f"{_describe(old['model'])}: only a unit of the same model takes its place")
        previous = [_CONFIG_ITEM.validate_python(i) for i in old["items"]]
        self._release(command.predecessor)  # gone for good, the owner says: its addresses are for its successor
        record, planned = self._plan(record, again=True, previous=previous)
        self._put(record)
        self._after_commit(record, planned)
        del retired[command.predecessor]
        self.store.set_meta(retired=retired)
        self.event("device.replaced", device_id=record.device_id, predecessor=command.predecessor,
                   reason=f"takes the place of {command.predecessor}: {record.address or record.error}")
        return {"device_id": record.device_id, "address": record.address}

    def _on_config_seen(self, device_id: str, payload: bytes, retained: bool) -> None:
        """Only this configurator writes configs: anything else on a config topic is put right."""
        record = self.store.get(device_id)
        ours = record.config_payload.encode() if record and record.config_payload else None
        if payload == ours or (not payload and ours is None):
            return
        if retained and ours is not None and self._superseded(payload, record.version):
            return  # handed back at (re)subscribe; the newer one, sent since, has replaced it
        if ours is not None:  # restore the retained config the device must see
            self._publish_raw(self.topics.device(device_id, "config"), ours, retain=True)
        if not payload:
            raise Rejected("retained config cleared by another client; restored")
        envelope, config = decode(payload, expected_kind="config")
        if envelope.sender != self.sender:
            raise Rejected(f"config published by {envelope.sender!r}, not by this configurator")
        if not signed_by(envelope, self.key.public):
            raise Rejected("config not signed by this configurator's key; current config restored")
        raise Rejected(f"config version {config.version} is not the current one "
                       f"({record.version if record else 0}): stale or replayed; current config restored")

    def _superseded(self, payload: bytes, current: int) -> bool:
        """An older config of this configurator's own, signed by its key."""
        try:
            envelope, config = decode(payload, expected_kind="config")
        except ContractError:
            return False
        return envelope.sender == self.sender and signed_by(envelope, self.key.public) and config.version < current

    def _check_signature(self, envelope: Envelope, record: DeviceRecord | None) -> None:
        key = unb64(record.public_key) if record and record.public_key else None
        if key is None:
            raise Rejected(f"{envelope.kind} from {envelope.sender}, which has no enrolled key")
        if not signed_by(envelope, key):
            raise Rejected(f"bad or missing signature: {envelope.kind} not signed by the key "
                           f"bound to {envelope.sender} ({fingerprint(key)})")

    def _on_register(self, _topic: str, envelope: Envelope, info: DeviceInfo, record: DeviceRecord | None) -> None:
        key = unb64(info.public_key or "")
        if key is None or len(key) != 32:
            raise Rejected("register without a valid Ed25519 public_key")
        if record is not None and record.public_key and record.public_key != info.public_key:
            if signed_by(envelope, key):  # the alert is for a real key change, not for noise
                self.event("device.key_mismatch", Severity.ERROR, device_id=record.device_id,
                           reason=f"registered with key {fingerprint(key)}, but key "
                                  f"{fingerprint(unb64(record.public_key) or b'')} is bound to this id; "
                                  f"refused until `homenet devices reset {record.device_id}`")
                self._reply(record.device_id, envelope.id, RegisterStatus.REJECTED,
                            "another key is bound to this device id")
                return
            raise Rejected("bad signature on a register carrying another key")
        if not signed_by(envelope, key):
            raise Rejected(f"bad or missing signature: register not signed by the key it carries ({fingerprint(key)})")
        if record is not None and record.state == State.REJECTED:
            self._reply(record.device_id, envelope.id, RegisterStatus.REJECTED, "rejected by the owner")
            return
        if record is None and not self.newcomers.admit(info.device_id, time.monotonic()):
            self._registration_limited(info.device_id)
            return
        is_new = record is None
        record = (record or DeviceRecord(device_id=info.device_id, info=info)).model_copy(update={
            "info": info, "last_seq": envelope.seq, "online": True, "updated": now(),
            "public_key": info.public_key, "register_id": envelope.id})
        if is_new:
            self.event("device.registered", device_id=record.device_id, key=fingerprint(key),
                       device_type=info.device_type, model=info.model)
        if record.state in (State.NEW, State.PENDING) and self.settings.enrollment != "auto":
            self._hold(record)
        else:
            self._accept(record, Event.ACCEPT)

    def _registration_limited(self, device_id: str) -> None:
        """Nothing stored, no reply: the device registers again (agents retry after 30 s).
        One event per 5 s at most, counting every register dropped."""
        self._limited[0] += 1
        if time.monotonic() - self._limited[1] < 5:
            return
        count, self._limited = self._limited[0], [0, time.monotonic()]
        self.event("registration.limited", Severity.WARNING, device_id=device_id,
                   reason=f"{count} register(s) of new devices dropped: {len(self.newcomers)} new devices have "
                          f"not confirmed their first config yet, the limit (max_new_devices)", dropped=count)

    def _hold(self, record: DeviceRecord) -> None:
        """Enrollment needs the owner: the device waits, told how to let it in."""
        record = record.model_copy(update={"state": advance(record.state, Event.HOLD)})
        self._put(record)
        how = (f"waiting for the owner: homenet devices approve {record.device_id}"
               if self.settings.enrollment == "approve" else
               "waiting for the owner to enter the pairing code this device shows: homenet devices pair CODE")
        self.event("device.pending", Severity.WARNING, device_id=record.device_id, reason=how)
        self._reply(record.device_id, record.register_id, RegisterStatus.PENDING, how)

    def _accept(self, record: DeviceRecord, event: Event) -> DeviceRecord:
        """Enrolled: plan, commit, then answer the device's last register and publish its config."""
        record, planned = self._plan(record.model_copy(update={"state": advance(record.state, event)}))
        self._put(record)
        credentials = None
        if self.accounts is not None and (record.info.needs_credentials or self.accounts.get(record.device_id) is None):
            # the register was signed by the bound key: only the device itself gets here. A device
            # with no account logged in anonymously, whatever it said: without one it could never
            # read its config (docs/protocol.md, Enrollment)
            credentials = {"username": record.device_id,
                           "password": self.accounts.set(record.device_id, Role.DEVICE)}
        self._reply(record.device_id, record.register_id, RegisterStatus.ACCEPTED, record.error,
                    record.version, credentials)
        self._after_commit(record, planned)
        return record

    def _reply(self, device_id: str, register_id: str, status: RegisterStatus, reason: str,
               version: int = 0, credentials: dict[str, str] | None = None) -> None:
        reply = RegisterReply(re=register_id, status=status, config_version=version, reason=reason,
                              credentials=credentials)
        self._publish(self.topics.device(device_id, "register/reply"), "register.reply", reply)

    def _on_info(self, _topic: str, envelope: Envelope, info: DeviceInfo, record: DeviceRecord | None) -> None:
        if record is None:
            raise Rejected(f"info from {info.device_id}, which has not registered")
        moved = info.interfaces != record.info.interfaces
        strays = left_the_lan(self.driver.lan(), record.info, info)
        record, planned = self._plan(record.model_copy(update={
            "info": info, "last_seq": envelope.seq, "updated": now()}))
        self._put(record)
        if moved:
            self.event("device.info", device_id=record.device_id,
                       addresses=[a for i in info.interfaces for a in i.addresses])
        if strays:  # the LAN may have moved under the device: look at the gateway now
            self.event("lan.mismatch", Severity.WARNING, device_id=record.device_id,
                       reason=f"reports {', '.join(strays)}, outside the LAN {self.driver.lan().subnet}; "
                              f"checking the gateway's LAN")
            self.lan_watch.poke()
        self._after_commit(record, planned)
        self._later(self._reconcile, [record], gateway=False)

    def _on_result(self, _topic: str, envelope: Envelope, result: ConfigResult, record: DeviceRecord | None) -> None:
        if record is None or record.config is None:
            raise Rejected("config.result from a device that was sent no config")
        if result.version != record.version:
            raise Rejected(f"stale config.result for version {result.version}; current is {record.version}")
        problem = result_problem(result, record.config, json.loads(record.config_payload)["id"])
        if problem:  # e.g. `ok` for no items: the device would pass for configured
            raise Rejected(f"config.result refused: {problem}")
        if result == record.result:  # the agent re-sent it after a reconnect
            self._put(record.model_copy(update={"last_seq": envelope.seq}))
            return
        ok = result.status == ResultStatus.OK
        record = record.model_copy(update={
            "result": result, "last_seq": envelope.seq, "updated": now(),
            "state": advance(record.state, Event.RESULT_OK if ok else Event.RESULT_FAILED)})
        self._put(record)
        if ok:
            self.newcomers.settled(record.device_id)
            self.event("config.applied", device_id=record.device_id, version=result.version)
        else:
            failed = {r.item: r.detail for r in result.items
                      if r.status not in (ItemStatus.APPLIED, ItemStatus.UNCHANGED)}
            self.event("config.failed", Severity.ERROR, device_id=record.device_id,
                       reason=f"{result.status.value}: {failed}", version=result.version)
        self._later(self._reconcile, [record], gateway=False)

    # --- evaluation ----------------------------------------------------------------------

    def renumber(self, lan: LanPlan, timeout: float = 60.0) -> None:
        """The gateway's LAN moved to `lan` (docs/renumbering.md): keep it, then re-plan every
        device in it. Called from the LAN watch's thread; done by the worker in a batch of its
        own, and returns once that batch has committed."""
        done = threading.Event()

        def task() -> None:
            self._renumber(lan)
            self._later(done.set)

        self._inbox.put(task)
        done.wait(timeout)

    def _renumber(self, lan: LanPlan) -> None:
        # the committed plan, not the driver's: a batch that failed to commit is tried again
        old = saved_plan(self.settings.lan, self.store.meta()) or lan_plan(self.settings.lan)
        if old == lan:  # the watch saw the move twice before the first one was done
            return
        self.store.set_meta(lan=saved(lan, self.settings.lan))
        self.driver.set_lan(lan)
        self.event("lan.renumbered", reason=f"{old.subnet} (gateway {old.gateway}) -> {lan.subnet} "
                                            f"(gateway {lan.gateway})", old=str(old.subnet), new=str(lan.subnet))
        self._replan_all()
        self.publish_gateway_state()

    def _replan_all(self) -> set[str]:
        """Plan every enrolled device again; the ids of those given a new config version."""
        sent = set()
        for record in self.store.all():
            if record.state not in PLANNABLE:
                continue
            record, planned = self._plan(record)
            if planned:
                self._put(record)
                self._after_commit(record, planned)
                sent.add(record.device_id)
        return sent

    def _put(self, record: DeviceRecord) -> None:
        self.store.put(record)
        self.holdings.update(record)
        self._later(self.bus.emit, DeviceChanged(record))

    def _view(self, device_id: str) -> NetworkView:
        return self.holdings.view(self.driver.lan(), device_id, self.driver.name)

    def _plan(self, record: DeviceRecord, again: bool = False,
              previous: list[ConfigItem] | None = None) -> tuple[DeviceRecord, bool]:
        """Evaluate the device; return the updated record and whether a new config version was made
        (`again`: even when nothing changed, so that the agent applies it once more; `previous`:
        the items to keep stable, by default its own config's)."""
        if previous is None:
            previous = record.config.items if record.config else []
        try:
            plan = evaluate(record.info, self._view(record.device_id), previous, self.profile_source(record.info))
        except PlanError as exc:
            self.event("device.unplanned", Severity.ERROR, device_id=record.device_id, reason=str(exc))
            return record.model_copy(update={"state": advance(record.state, Event.PLAN_FAILED),
                                             "error": str(exc)}), False
        if record.config and plan.items == record.config.items and record.state != State.UNPLANNED and not again:
            return record, False
        # Above what the device reports applied too: after `forget` the record starts afresh,
        # and an agent ignores any version at or below the one it applied.
        version = max(record.version, record.info.applied_version) + 1
        config = Config(device_id=record.device_id, version=version, epoch=self.epoch,
                        profile=plan.profile.name, items=plan.items)
        _, payload = encode("config", config, sender=self.sender, seq=self._seq.next(), sign=self.key.sign)
        return record.model_copy(update={
            "config": config, "config_payload": payload.decode(), "profile": plan.profile.name,
            "error": "", "state": advance(record.state, Event.CONFIG_SENT)}), True

    def _after_commit(self, record: DeviceRecord, planned: bool) -> None:
        if not planned or record.config is None:
            return
        self._publish_raw(self.topics.device(record.device_id, "config"), record.config_payload.encode(), retain=True)
        self.event("config.sent", device_id=record.device_id, version=record.version, profile=record.profile)
        self._later(self._apply_on_gateway, record)

    def _apply_on_gateway(self, record: DeviceRecord) -> None:
        assert record.config is not None
        results = self.driver.apply(record.config)
        for failure in (r for r in results if r.status == ItemStatus.FAILED):
            self.event("gateway.failed", Severity.ERROR, device_id=record.device_id,
                       reason=f"{failure.item}: {failure.detail}")
        for refused in (r for r in results if r.status == ItemStatus.UNSUPPORTED):  # e.g. a third-party router
            self.event("gateway.unsupported", device_id=record.device_id, reason=f"{refused.item}: {refused.detail}")
        self.gateway_reported(record.device_id, results)
        self.publish_gateway_state()

    def gateway_reported(self, device_id: str, results: list[ItemResult]) -> None:
        """Keep in the device's record what holds of its gateway items (from any thread: the
        driver's retries report here too); written by a task of its own, as every write is."""
        self._inbox.put(partial(self._keep_gateway_items, device_id, results))

    def _keep_gateway_items(self, device_id: str, results: list[ItemResult]) -> None:
        record = self.store.get(device_id)
        if record is not None and record.config is not None and record.gateway != results:
            self._put(record.model_copy(update={"gateway": results, "updated": now()}))

    # --- reconciliation (reconcile.py) ------------------------------------------------------

    def _tick(self) -> None:
        while not self._halt.wait(self.settings.reconcile_interval):
            if self.connected.is_set():
                self._inbox.put(self._reconcile_all)

    def _reconcile_all(self) -> None:
        """Every device, once this batch commits. The records are those at this point of the batch,
        as is the gateway then: the batch's gateway changes run in order after the commit."""
        self._end_quarantines()
        # again, in case a wrong one is retained that this configurator never received (amqtt
        # hands nothing to a connection that took a session over: docs/amqtt-notes.md)
        self._publish_raw(self.topics.configurator_state, self._state_payload("online"), retain=True)
        records = self.store.all()
        self._later(self._drift.retain, [r.device_id for r in records])
        self._later(self._reconcile, records, gateway=True)

    def _holdings(self) -> Holdings:
        """Who holds what, from the records and the quarantined addresses of forgotten devices."""
        holdings = Holdings(self.store.all())
        for device_id, addresses in quarantined(self.store.meta(), time.time()).items():
            if self.store.get(device_id) is None:
                holdings.hold(device_id, addresses)
        return holdings

    def _end_quarantines(self) -> None:
        """Addresses of forgotten devices whose quarantine has run out are free again."""
        meta = self.store.meta()
        for device_id in meta.get("quarantine", {}).keys() - quarantined(meta, time.time()).keys():
            self._release(device_id)
            log.info("addresses of forgotten device %s are free again", device_id)

    def _release(self, device_id: str) -> None:
        """End the quarantine of a forgotten device's addresses."""
        entries = dict(self.store.meta().get("quarantine", {}))
        if entries.pop(device_id, None) is None:
            return
        if self.store.get(device_id) is None:  # back since, its record holds what it uses
            self.holdings.remove(device_id)
        self.store.set_meta(quarantine=entries)

    def _reconcile(self, records: list[DeviceRecord], gateway: bool) -> None:
        """Each device's own reports, and with `gateway` the driver's listing. The driver is given
        nothing for a device without a config, so there is nothing to compare."""
        try:
            state = self.driver.actual() if gateway else None
            actual = GatewayListing(state) if state is not None else None
            for record in records:
                self._settle(record, device_drift(record))
                if actual is not None and record.config:
                    self._settle(record, gateway_drift(record, actual))
        except Exception:  # after the commit: a bug must not stop the worker
            log.exception("internal error in reconciliation")

    def _settle(self, record: DeviceRecord, check: Check) -> None:
        """Report what changed; correct the gateway at once, a device by a task (it writes a version)."""
        step = self._drift.observe(record.device_id, check, time.monotonic())
        for f in step.detected:
            self.event("drift.detected", Severity.WARNING, device_id=record.device_id,
                       reason=f"{f.drift.value} {f.item}: desired {f.desired}, actual {f.actual}",
                       what=f.drift.value, item=f.item, desired=f.desired, actual=f.actual, attempt=step.attempt)
        for f in step.corrected:
            self.event("drift.corrected", device_id=record.device_id,
                       reason=f"{f.drift.value} {f.item}: as desired again ({f.desired})",
                       what=f.drift.value, item=f.item, desired=f.desired, was=f.actual, attempt=step.attempt)
        if step.correct and check.side == Side.GATEWAY:
            self._apply_on_gateway(record)
        elif step.correct:
            self._inbox.put(partial(self._resend, record.device_id, record.version))

    def _resend(self, device_id: str, version: int) -> None:
        """Device drift, corrected: the config again as a new version, unless it changed meanwhile."""
        record = self.store.get(device_id)
        if (record is None or record.version != version
                or not any(f.correctable for f in device_drift(record).findings)):
            return
        record, planned = self._plan(record, again=True)
        self._put(record)
        self._after_commit(record, planned)
