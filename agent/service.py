"""The configured agent: discovery, registration, execution and confirmation over MQTT.

Theory of operation: on every (re)connect the agent subscribes first (paho does not restore
subscriptions), marks itself online (the will says offline), and waits for the retained
`configurator/state`. Each time a configurator is online with an epoch it has not registered
with on this connection, it registers (a standby that took over has a new epoch). A retained
`config` above the applied version, and from an epoch no older than the applied config's (an
older one comes from a configurator fenced since), is executed item by item, safely
(`safeapply.py`): changed IPv4 settings that lose the broker are rolled back. The new
version and its result are saved before the result is published, so a restart neither
re-applies nor forgets a confirmation. A rolled-back version is not applied: a later version
is, and the same version once more only after a restart (the retained config comes back on
every reconnect, and retrying it each time would flap the device's network). An `info` goes
out when the device's interfaces or addresses change.

An agent that found the broker by the beacon follows the later beacons (`follow`): an IPv4
change is verified against the gateway's addresses the newest beacon names, and when the
address the agent is connected to is no longer among them (the LAN was renumbered), it
connects again to the endpoint the beacon leads to (docs/renumbering.md). A beacon with a
higher epoch than the one that led to the broker says the gateway restarted (it claims a new
epoch at every start): after a power cut no FIN or RST reaches the device and its connection
would look alive until the keepalive ran out, so it connects again at once
(docs/reliability.md, Power cut).

Before applying, the executor's checkpoint and the config are saved (the apply journal,
`AgentState.applying`); the write that saves the result drops it. An agent that finds the
journal at start was stopped mid-apply (crash, power cut): before going online it resumes
the apply from that checkpoint (`safeapply.py`), which completes it or, if the broker is
unreachable on the settings left behind, rolls back to the settings from before. Every item
of that result says `resumed after the agent stopped while applying version N`, its status
(`ok` or `rolled_back`) says which, and it is sent on connect like any saved result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho

from homenet.mqtt import BrokerUrl, make_client, set_nodelay
from homenet.schemas import ContractError, Envelope, Topics, decode, encode, signed_by
from homenet.schemas.results import overall
from homenet.schemas.signing import fingerprint, pairing_code, unb64
from homenet.schemas.messages import (Config, ConfigResult, ConfiguratorState, DeviceInfo, Model,
                                      ItemResult, RegisterStatus, ResultStatus, RpcReply, Target)
from homenet.sequence import SequenceCounter

from . import presence
from .device import Device
from .waiting import Waiting
from .safeapply import (Endpoint, apply_safely, ipv4_endpoints, load_checkpoint, note_resumed,
                        save_checkpoint)

if TYPE_CHECKING:  # the beacon listener loads psutil: only agents that discover need it
    from .bootstrap import Discovery

log = logging.getLogger(__name__)

STOP_WAIT = 0.5
"""Seconds a stop gives the broker connection (the goodbye, the network thread) in all."""


def _bounded(step: Callable[[], object], timeout: float) -> None:
    """Run `step` but wait for it at most `timeout` seconds (paho's loop_stop joins a network
    thread that may sit in a connect or an apply)."""
    thread = threading.Thread(target=step, daemon=True)
    thread.start()
    thread.join(timeout)


class Agent:
    def __init__(self, device: Device, broker: BrokerUrl, verify: list[Endpoint] | None = None,
                 cafile: Path | None = None) -> None:
        """`verify`: more endpoints of the broker (e.g. from its beacon) for the check after an
        IPv4 change; only IPv4 ones count, with the broker URL's host when it is IPv4.
        `cafile`: for TLS, the one certificate trusted (the pinned gateway certificate)."""
        self.cafile = cafile
        if device.key is None:
            raise ValueError("a device opened read-only has no key to run with")
        settings, state = device.settings, device.state
        self.device = device
        self.settings = settings
        self.device_id = device.device_id
        self.state = state
        self.executor = device.executor
        self.topics = Topics(settings.root)
        self.broker = broker
        self.verify_endpoints = ipv4_endpoints(broker, verify or ())
        self._rolled_back_version = 0
        self._gateway_epoch = state.state.beacon_epoch
        """The epoch of the beacon that led to the broker: the gateway claims a new one each time it starts."""
        self._seq = SequenceCounter(state.state.seq_reserved, lambda c: state.update(seq_reserved=c))
        self._lock = threading.Lock()
        self._life = threading.Lock()
        """Orders `stop` against starting a client (at start, on a reconnect)."""
        self.waiting = Waiting(log)
        self._registered_epoch: int | None = None
        self._register_id = ""
        self._register_sent = 0.0
        """When the last register went out, unanswered (0 once answered): see _retry_register."""
        self._last_info: DeviceInfo | None = None
        self._stop = threading.Event()
        self.registered = threading.Event()
        self.confirmed = threading.Event()
        self.client = self._new_client()
        self._routes: dict[str, Callable[[paho.MQTTMessage], None]] = {
            self.topics.configurator_state: self._on_configurator_state,
            self._topic("register/reply"): self._on_register_reply,
            self._topic("config"): self._on_config,
            self._topic("rpc"): self._on_rpc,
        }
        if state.state.applied_version:
            self.confirmed.set()

    def _new_client(self) -> paho.Client:
        """A paho client logging in with the account in the state, anonymously without one."""
        state = self.state.state
        client = make_client(self.device_id, clean_session=False, username=state.username,
                             password=state.password, will=(self._topic("status"), b'{"state":"offline"}'),
                             cafile=self.cafile)
        client.on_connect, client.on_disconnect, client.on_message = (
            self._on_connect, self._on_disconnect, self._on_message)
        return client

    def _reconnect(self) -> None:
        """Connect again, to `self.broker` with the account now in the state. Runs on its own
        thread: the old client's network thread (where the reason arrived) cannot stop itself."""
        with self._life:
            if self._stop.is_set():
                return
            old, self.client = self.client, self._new_client()
        old.on_disconnect = None  # left on purpose: not a loss of the broker to report
        log.info("disconnected from %s on purpose: connecting again", self.broker)
        old.disconnect()
        old.loop_stop()  # all of it: an apply under way there must end before the new client may start one
        self._connect()

    def _connect(self) -> None:
        with self._life:  # a stop that came first wins: no client is started after it
            if self._stop.is_set():
                return
            self.waiting.on(f"the broker at {self.broker} to accept the connection")
            self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
            self.client.loop_start()

    def _topic(self, channel: str) -> str:
        return self.topics.device(self.device_id, channel)

    def follow(self, found: Discovery) -> None:
        """A newer beacon: the gateway's addresses as they are now (called by the beacon listener)."""
        moved = not found.names(self.broker.host)
        restarted = found.beacon.epoch > self._gateway_epoch
        if restarted:  # a power cut sends no FIN: the old connection would look alive until the keepalive
            log.warning("the gateway restarted (its beacon's epoch is %d, was %d): connecting again to %s now",
                        found.beacon.epoch, self._gateway_epoch, found.broker)
            self._gateway_epoch = found.beacon.epoch
        elif moved:  # the address in use is gone from the gateway: the LAN was renumbered
            log.warning("the gateway no longer has %s; connecting to %s", self.broker.host, found.broker)
        if moved or restarted:
            self.broker = found.broker
        if found.verify:  # in place: an apply verifying right now tries the new endpoints
            self.verify_endpoints[:] = ipv4_endpoints(self.broker, found.verify)
        if moved or restarted:
            threading.Thread(target=self._reconnect, daemon=True).start()

    # --- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Resume an interrupted apply, then connect; in the background, so that a stop is
        prompt in every state. An agent stopped may be started again."""
        with self._life:
            self._stop.clear()

        def begin() -> None:
            self._resume_apply()  # first: settings half applied may be what keeps the broker away
            self._seq.reserve()  # the disk sync before connecting, not between CONNACK and register
            presence.record(self.settings.data_dir, str(self.broker), False)
            self._connect()
        threading.Thread(target=begin, name="agent-start", daemon=True).start()
        threading.Thread(target=self._watch_info, name="info-watch", daemon=True).start()

    def stop(self) -> None:
        """Within about a second whatever the agent is doing. An apply under way is left to
        its journal: the next start completes it or rolls it back (see the module doc)."""
        with self._life:
            self._stop.set()
        self.waiting.close()
        if (applying := self.state.state.applying) is not None:
            log.warning("stopping while config version %s is being applied: it is resumed from its journal "
                        "at the next start", applying.get("config", {}).get("version", "?"))
        if self.client.is_connected():  # a dead connection (power cut) must not hold the stop
            self.client.publish(self._topic("status"), b'{"state":"offline"}', qos=1,
                                retain=True).wait_for_publish(timeout=STOP_WAIT / 2)
        self.client.disconnect()
        _bounded(self.client.loop_stop, STOP_WAIT / 2)

    def problem(self) -> str | None:
        """What keeps this agent from working, for a watchdog: None while its MQTT loop runs
        (connected or reconnecting). paho shows its loop thread only as `_thread`."""
        thread = getattr(self.client, "_thread", None)
        return None if thread is not None and thread.is_alive() else "the MQTT network loop is not running"

    def _publish(self, channel: str, kind: str, body: Model, *, retain: bool = False) -> tuple[str, bytes]:
        msg_id, payload = encode(kind, body, sender=self.device_id, seq=self._seq.next(), sign=self.device.key.sign)
        self.client.publish(self._topic(channel), payload, qos=1, retain=retain)
        return msg_id, payload

    def device_info(self) -> DeviceInfo:
        return self.device.info()

    def _trusted(self, payload: bytes, kind: str) -> tuple[Envelope, Any]:
        """Decode a message from the configurator; refuse it unless the pinned key signed it.

        With no key pinned yet (no beacon, no provisioned key), the first `configurator/state`
        signed by the key it announces is trusted: trust on first use, as the beacon does.
        """
        envelope, body = decode(payload, expected_kind=kind)
        pinned = self.device.pinned
        if pinned.key is None and isinstance(body, ConfiguratorState) and body.public_key:
            key = unb64(body.public_key)
            if key is not None and signed_by(envelope, key):
                pinned.pin(key)
                log.info("pinned configurator key %s (first use, from configurator/state)", fingerprint(key))
        if pinned.key is None:
            raise ContractError(f"{kind} arrived before any configurator key was pinned")
        if not signed_by(envelope, pinned.key):
            raise ContractError(f"{kind} from {envelope.sender!r} is not signed by the pinned "
                                f"configurator key {fingerprint(pinned.key)}")
        return envelope, body

    # --- connection ------------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker %s refused the agent: %s", self.broker, reason)
            if self.state.state.username and reason.value in (134, 135):  # bad credentials, not authorized
                log.warning("dropping the broker account; enrolling again anonymously")
                self.state.update(username=None, password=None)
                threading.Thread(target=self._reconnect, daemon=True).start()
            return
        set_nodelay(client)
        with self._lock:
            self._registered_epoch = None
        self.registered.clear()
        client.subscribe([(self.topics.configurator_state, 1), (self._topic("register/reply"), 1),
                          (self._topic("config"), 1), (self._topic("rpc"), 1)])
        client.publish(self._topic("status"), b'{"state":"online"}', qos=1, retain=True)
        if self.state.state.last_result:  # the broker may have lost retained messages
            self._publish("config/result", "config.result",
                          ConfigResult.model_validate(self.state.state.last_result), retain=True)
        presence.record(self.settings.data_dir, str(self.broker), True)
        log.info("agent %s connected to %s", self.device_id, self.broker)
        self.waiting.on(f"a configurator to come online (retained {self.topics.configurator_state} on {self.broker})")

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.registered.clear()
        presence.record(self.settings.data_dir, str(self.broker), False)
        if not self._stop.is_set():
            # a normal disconnection is the agent's own (e.g. to log in with a new account)
            log.log(logging.WARNING if reason.is_failure else logging.INFO,
                    "disconnected from %s (%s); reconnecting with backoff", self.broker, reason)
            self.waiting.on(f"the broker at {self.broker} to accept the connection again")

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        handler = self._routes.get(msg.topic)
        if handler is None:
            log.warning("message on unexpected topic %s ignored", msg.topic)
            return
        try:
            handler(msg)
        except ContractError as exc:
            log.warning("rejected message on %s: %s", msg.topic, exc)
        except Exception:
            log.exception("internal error handling %s", msg.topic)

    # --- the sequence ----------------------------------------------------------------------

    def _on_configurator_state(self, msg: paho.MQTTMessage) -> None:
        envelope, state = self._trusted(msg.payload, "configurator.state")
        if self._registered_epoch is not None and state.epoch < self._registered_epoch:
            log.debug("configurator/state of epoch %d ignored: epoch %d is newer", state.epoch, self._registered_epoch)
            return
        if state.state != "online":
            log.info("configurator %s is offline; waiting", state.configurator_id)
            self.waiting.on(f"configurator {state.configurator_id} to come back online")
            return
        with self._lock:
            if self._registered_epoch == state.epoch:
                return
            self._registered_epoch = state.epoch
        self._register()
        self.waiting.on(f"configurator {state.configurator_id} to answer the registration")
        log.info("found configurator %s (epoch %d); registering as %s (%s)",
                 state.configurator_id, state.epoch, self.device_id, self.settings.device_type)

    def _register(self) -> None:
        info = self.device_info()
        self._register_id, _ = self._publish("register", "register", info)
        self._register_sent = time.monotonic()
        self._last_info = info

    def _retry_register(self) -> None:
        """A register may be dropped on its way (a configurator over its budget of new devices,
        a broker's full queue): unanswered after `register_retry` seconds, it is sent again."""
        retry = self.settings.register_retry
        if (self._register_sent and time.monotonic() - self._register_sent > retry
                and self.client.is_connected() and not self.registered.is_set()):
            log.info("no answer to the register after %g s; registering again", retry)
            self._register()

    def _on_register_reply(self, msg: paho.MQTTMessage) -> None:
        envelope, reply = self._trusted(msg.payload, "register.reply")
        # Its seq need not be on disk before this returns: a reply sent again after a restart
        # answers a registration this process never made (`re` below), so it is refused anyway.
        if not self._fresh(envelope, msg.dup, durable=False):
            return
        if reply.re != self._register_id:
            log.info("register.reply for an earlier registration ignored")
            return
        self._register_sent = 0.0
        if reply.status == RegisterStatus.ACCEPTED:
            log.info("registered; configuration version %d%s", reply.config_version,
                     f" ({reply.reason})" if reply.reason else "")
            if reply.credentials:
                self.state.update(username=reply.credentials.username, password=reply.credentials.password)
                log.info("received broker account %s; logging in with it", reply.credentials.username)
                threading.Thread(target=self._reconnect, daemon=True).start()
                return
            self.registered.set()
            if reply.config_version > self.state.state.applied_version:
                self.waiting.on(f"config version {reply.config_version}")
            else:
                self.waiting.done()
            self._send_info_if_changed()  # e.g. a config applied before this reply arrived
        else:
            log.warning("registration %s: %s", reply.status.value, reply.reason)
            self.waiting.on(f"the owner to let this device in ({reply.reason})" if reply.status == RegisterStatus.PENDING
                            else f"the owner: registration {reply.status.value} ({reply.reason})")
            if reply.status == RegisterStatus.PENDING:
                log.warning("pairing code of this device: %s", pairing_code(self.device.key.public))

    def _on_config(self, msg: paho.MQTTMessage) -> None:
        if not msg.payload:  # a cleared retained config
            return
        envelope, config = self._trusted(msg.payload, "config")
        if config.device_id != self.device_id:
            raise ContractError(f"config for {config.device_id} on the topic of {self.device_id}")
        applied = self.state.state.applied_version
        if config.version <= applied:
            log.debug("config version %d ignored: version %d is applied", config.version, applied)
            return
        if config.version == self._rolled_back_version:
            log.debug("config version %d ignored: it was rolled back", config.version)
            return
        if config.epoch < self.state.state.config_epoch:
            raise ContractError(f"config version {config.version} is from configurator epoch {config.epoch}, "
                                f"older than epoch {self.state.state.config_epoch} of the config applied")

        def journal(snapshot: object) -> None:  # durable before anything changes
            self.state.update(applying={"config_id": envelope.id, "config": config.model_dump(mode="json"),
                                        "checkpoint": save_checkpoint(snapshot)})

        results = apply_safely(self.executor, [item for item in config.items if item.target == Target.AGENT],
                               self.verify_endpoints, self.settings.apply_deadline, journal=journal)
        result = self._save_result(envelope.id, config, results)
        self._publish("config/result", "config.result", result, retain=True)
        log.info("config version %d: %s (%s)", config.version, result.status.value,
                 ", ".join(f"{r.item} {r.status.value}{': ' + r.detail if r.detail else ''}" for r in results)
                 or "no agent items")
        self.waiting.done()
        self.confirmed.set()
        self._send_info_if_changed()

    def _save_result(self, config_id: str, config: Config, results: list[ItemResult]) -> ConfigResult:
        """The result, saved with the applied version in one write that also drops the journal."""
        result = ConfigResult(re=config_id, version=config.version, status=overall([r.status for r in results]),
                              items=results, in_force=self.executor.in_force())
        if result.status == ResultStatus.ROLLED_BACK:  # not applied: a corrected version must apply
            self._rolled_back_version = config.version
            self.state.update(last_result=result.model_dump(mode="json"), applying=None)
        else:
            self.state.update(applied_version=config.version, applied_config_id=config_id,
                              config_epoch=config.epoch, last_result=result.model_dump(mode="json"),
                              applying=None)
        return result

    def _resume_apply(self) -> None:
        """Finish or roll back an apply that a stop interrupted (see the module doc)."""
        pending = self.state.state.applying
        if not pending:
            return
        try:
            config = Config.model_validate(pending["config"])
            snapshot = load_checkpoint(pending["checkpoint"])
        except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            log.error("apply journal unreadable (%s); dropped: the retained config applies again", exc)
            self.state.update(applying=None)
            return
        if config.version <= self.state.state.applied_version:  # its result was saved after all
            self.state.update(applying=None)
            return
        note = f"resumed after the agent stopped while applying version {config.version}"
        log.warning("the agent stopped while applying config version %d: resuming it from the checkpoint "
                    "taken before", config.version)
        results = apply_safely(self.executor, [item for item in config.items if item.target == Target.AGENT],
                               self.verify_endpoints, self.settings.apply_deadline, resume_from=snapshot)
        result = self._save_result(pending.get("config_id", ""), config, note_resumed(results, note))
        log.warning("config version %d %s: %s", config.version,
                    "rolled back" if result.status == ResultStatus.ROLLED_BACK else "completed",
                    "; ".join(f"{r.item} {r.status.value}" for r in result.items) or "no agent items")
        if result.status != ResultStatus.ROLLED_BACK:
            self.confirmed.set()

    def _on_rpc(self, msg: paho.MQTTMessage) -> None:
        envelope, rpc = self._trusted(msg.payload, "rpc")
        if not self._fresh(envelope, msg.dup):
            return
        result: dict[str, Any] = {}
        if rpc.method == "refresh":
            self._send_info_if_changed(force=True)
        elif rpc.method == "state":
            result = {**self.state.state.model_dump(exclude={"last_result", "password"}),
                      "in_force": self.executor.in_force()}
        self._publish("rpc/reply", "rpc.reply", RpcReply(re=envelope.id, ok=True, result=result))

    def _fresh(self, envelope: Envelope, redelivered: bool, durable: bool = True) -> bool:
        """A live message must be newer than every one accepted before (persisted: at once, or
        with the next write when not `durable`): a captured reply or rpc published again is
        refused. Retained messages (config, configurator/state) come back with their old seq
        by design; their version and epoch protect them. False: the last one accepted, sent
        again by the broker (DUP: its PUBACK was lost with a connection closed right after,
        as when the agent logs in with a new account), to be ignored quietly."""
        last = self.state.state.configurator_seq
        if redelivered and envelope.seq == last:
            log.debug("%s seq %d delivered again", envelope.kind, envelope.seq)
            return False
        if envelope.seq <= last:
            raise ContractError(f"replayed or out of order: {envelope.kind} seq {envelope.seq} "
                                f"is not above {last}, the last accepted from the configurator")
        (self.state.update if durable else self.state.note)(configurator_seq=envelope.seq)
        return True

    # --- info ------------------------------------------------------------------------------

    def _send_info_if_changed(self, force: bool = False) -> None:
        if not self.registered.is_set():
            return
        with self._lock:
            info = self.device_info()
            if not force and info == self._last_info:
                return
            self._last_info = info
            self._publish("info", "info", info, retain=True)
            log.info("sent info: %s", json.dumps([i.addresses for i in info.interfaces]))

    def _watch_info(self) -> None:
        while not self._stop.wait(self.settings.info_interval):
            try:
                self._retry_register()
                self._send_info_if_changed()
            except Exception:
                log.exception("collecting device info failed")
