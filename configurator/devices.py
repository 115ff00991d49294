"""The device protocol, configurator side (docs/protocol.md): what arrives on a device's topics
(register, info, config.result, status, and anything on its config topic) is checked — topic,
size, envelope, sender binding, seq, signature — and handled inside the engine's batch."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ValidationError

from homenet.acl import Role
from homenet.schemas import MAX_PAYLOAD, ContractError, Envelope, TopicError, decode, signed_by, strictjson
from homenet.schemas.results import result_problem
from homenet.schemas.signing import fingerprint, unb64
from homenet.schemas.messages import (ConfigResult, DeviceInfo, DeviceStatus, ItemStatus, RegisterReply,
                                      RegisterStatus, ResultStatus, Severity)

from .lifecycle import Event, State, advance
from .newcomers import Newcomers
from .planner import Handler, Parts
from .records import DeviceRecord, now
from .renumber import left_the_lan
from .store import Fenced, StoreError

log = logging.getLogger(f"{__package__}.service")  # one name in the journal for the whole service


class Rejected(Exception):
    """A message that is dropped; the text is the reason given in the log and the event."""


class Message(Protocol):
    """What the broker delivered (paho's MQTTMessage has these)."""
    topic: str
    payload: bytes
    retain: bool
    dup: bool


class Devices(Handler):
    """`on_command` and `on_state`: the configurator's own channels (command, configurator/state),
    which arrive in the same batches; `reconcile(records, gateway=)`: after a device's reports;
    `lan_moved`: a device reports addresses outside the LAN."""

    def __init__(self, parts: Parts, on_command: Callable[[bytes], None], on_state: Callable[[bytes], None],
                 reconcile: Callable[..., None], lan_moved: Callable[[], None]) -> None:
        super().__init__(parts)
        self._on_command = on_command
        self._on_state = on_state
        self._reconcile = reconcile
        self._lan_moved = lan_moved
        hosts = max(1, self.driver.lan().subnet.num_addresses - 2)
        self.newcomers = Newcomers(self.settings.max_new_devices or hosts)
        self._limited = [0, 0.0]
        """Registers dropped by the budget since the last event, and when that was."""
        self._handlers: dict[str, Callable[[str, Envelope, Any, DeviceRecord | None], None]] = {
            "register": self._on_register, "config.result": self._on_result, "info": self._on_info}

    def receive(self, msg: Message) -> None:
        """One message of the batch: handled, or rejected with an event; never raises but for the batch."""
        topics = self.out.topics
        sender = None
        try:
            if msg.topic == topics.command:
                self._on_command(msg.payload)
                return
            if msg.topic == topics.configurator_state:
                self._on_state(msg.payload)
                return
            topic = topics.parse_device(msg.topic)
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
            self.out.event("message.rejected", Severity.WARNING, device_id=sender, topic=msg.topic,
                           sender=sender, reason=str(exc))
        except (Fenced, StoreError):
            raise  # the batch's fate, not this message's
        except Exception as exc:  # a bug must not stop the service; say so loudly
            log.exception("internal error handling %s", msg.topic)
            self.out.event("internal.error", Severity.ERROR, topic=msg.topic, sender=sender,
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
        self.planner.put(record.model_copy(update={"online": online, "updated": now()}))
        self.out.event(f"device.{status.state}", device_id=device_id)

    def _on_config_seen(self, device_id: str, payload: bytes, retained: bool) -> None:
        """Only this configurator writes configs: anything else on a config topic is put right."""
        record = self.store.get(device_id)
        ours = record.config_payload.encode() if record and record.config_payload else None
        if payload == ours or (not payload and ours is None):
            return
        if retained and ours is not None and self._superseded(payload, record.version):
            return  # handed back at (re)subscribe; the newer one, sent since, has replaced it
        if ours is not None:  # restore the retained config the device must see
            self.out.publish_raw(self.out.topics.device(device_id, "config"), ours, retain=True)
        if not payload:
            raise Rejected("retained config cleared by another client; restored")
        envelope, config = decode(payload, expected_kind="config")
        if envelope.sender != self.out.sender:
            raise Rejected(f"config published by {envelope.sender!r}, not by this configurator")
        if not signed_by(envelope, self.out.key.public):
            raise Rejected("config not signed by this configurator's key; current config restored")
        raise Rejected(f"config version {config.version} is not the current one "
                       f"({record.version if record else 0}): stale or replayed; current config restored")

    def _superseded(self, payload: bytes, current: int) -> bool:
        """An older config of this configurator's own, signed by its key."""
        try:
            envelope, config = decode(payload, expected_kind="config")
        except ContractError:
            return False
        return (envelope.sender == self.out.sender and signed_by(envelope, self.out.key.public)
                and config.version < current)

    def _check_signature(self, envelope: Envelope, record: DeviceRecord | None) -> None:
        key = unb64(record.public_key) if record and record.public_key else None
        if key is None:
            raise Rejected(f"{envelope.kind} from {envelope.sender}, which has no enrolled key")
        if not signed_by(envelope, key):
            raise Rejected(f"bad or missing signature: {envelope.kind} not signed by the key "
                           f"bound to {envelope.sender} ({fingerprint(key)})")

    # --- enrollment ----------------------------------------------------------------------------

    def _on_register(self, _topic: str, envelope: Envelope, info: DeviceInfo, record: DeviceRecord | None) -> None:
        key = unb64(info.public_key or "")
        if key is None or len(key) != 32:
            raise Rejected("register without a valid Ed25519 public_key")
        if record is not None and record.public_key and record.public_key != info.public_key:
            if signed_by(envelope, key):  # the alert is for a real key change, not for noise
                self.out.event("device.key_mismatch", Severity.ERROR, device_id=record.device_id,
                               reason=f"registered with key {fingerprint(key)}, but key "
                                      f"{fingerprint(unb64(record.public_key) or b'')} is bound to this id; "
                                      f"refused until `homenet devices reset {record.device_id}`")
                self.reply(record.device_id, envelope.id, RegisterStatus.REJECTED,
                           "another key is bound to this device id")
                return
            raise Rejected("bad signature on a register carrying another key")
        if not signed_by(envelope, key):
            raise Rejected(f"bad or missing signature: register not signed by the key it carries ({fingerprint(key)})")
        if record is not None and record.state == State.REJECTED:
            self.reply(record.device_id, envelope.id, RegisterStatus.REJECTED, "rejected by the owner")
            return
        if record is None and not self.newcomers.admit(info.device_id, time.monotonic()):
            self._registration_limited(info.device_id)
            return
        is_new = record is None
        record = (record or DeviceRecord(device_id=info.device_id, info=info)).model_copy(update={
            "info": info, "last_seq": envelope.seq, "online": True, "updated": now(),
            "public_key": info.public_key, "register_id": envelope.id})
        if is_new:
            self.out.event("device.registered", device_id=record.device_id, key=fingerprint(key),
                           device_type=info.device_type, model=info.model)
        if record.state in (State.NEW, State.PENDING) and self.settings.enrollment != "auto":
            self._hold(record)
        else:
            self.accept(record, Event.ACCEPT)

    def _registration_limited(self, device_id: str) -> None:
        """Nothing stored, no reply: the device registers again (agents retry after 30 s).
        One event per 5 s at most, counting every register dropped."""
        self._limited[0] += 1
        if time.monotonic() - self._limited[1] < 5:
            return
        count, self._limited = self._limited[0], [0, time.monotonic()]
        self.out.event("registration.limited", Severity.WARNING, device_id=device_id,
                       reason=f"{count} register(s) of new devices dropped: {len(self.newcomers)} new devices "
                              f"have not confirmed their first config yet, the limit (max_new_devices)",
                       dropped=count)

    def _hold(self, record: DeviceRecord) -> None:
        """Enrollment needs the owner: the device waits, told how to let it in."""
        record = record.model_copy(update={"state": advance(record.state, Event.HOLD)})
        self.planner.put(record)
        how = (f"waiting for the owner: homenet devices approve {record.device_id}"
               if self.settings.enrollment == "approve" else
               "waiting for the owner to enter the pairing code this device shows: homenet devices pair CODE")
        self.out.event("device.pending", Severity.WARNING, device_id=record.device_id, reason=how)
        self.reply(record.device_id, record.register_id, RegisterStatus.PENDING, how)

    def accept(self, record: DeviceRecord, event: Event) -> DeviceRecord:
        """Enrolled: plan, commit, then answer the device's last register and publish its config."""
        record, planned = self.planner.plan(record.model_copy(update={"state": advance(record.state, event)}))
        self.planner.put(record)
        credentials = None
        if self.accounts is not None and (record.info.needs_credentials or self.accounts.get(record.device_id) is None):
            # the register was signed by the bound key: only the device itself gets here. A device
            # with no account logged in anonymously, whatever it said: without one it could never
            # read its config (docs/protocol.md, Enrollment)
            credentials = {"username": record.device_id,
                           "password": self.accounts.set(record.device_id, Role.DEVICE)}
        self.reply(record.device_id, record.register_id, RegisterStatus.ACCEPTED, record.error,
                   record.version, credentials)
        self.planner.after_commit(record, planned)
        return record

    def reply(self, device_id: str, register_id: str, status: RegisterStatus, reason: str,
              version: int = 0, credentials: dict[str, str] | None = None) -> None:
        reply = RegisterReply(re=register_id, status=status, config_version=version, reason=reason,
                              credentials=credentials)
        self.out.publish(self.out.topics.device(device_id, "register/reply"), "register.reply", reply)

    # --- a device's reports --------------------------------------------------------------------

    def _on_info(self, _topic: str, envelope: Envelope, info: DeviceInfo, record: DeviceRecord | None) -> None:
        if record is None:
            raise Rejected(f"info from {info.device_id}, which has not registered")
        moved = info.interfaces != record.info.interfaces
        strays = left_the_lan(self.driver.lan(), record.info, info)
        record, planned = self.planner.plan(record.model_copy(update={
            "info": info, "last_seq": envelope.seq, "updated": now()}))
        self.planner.put(record)
        if moved:
            self.out.event("device.info", device_id=record.device_id,
                           addresses=[a for i in info.interfaces for a in i.addresses])
        if strays:  # the LAN may have moved under the device: look at the gateway now
            self.out.event("lan.mismatch", Severity.WARNING, device_id=record.device_id,
                           reason=f"reports {', '.join(strays)}, outside the LAN {self.driver.lan().subnet}; "
                                  f"checking the gateway's LAN")
            self._lan_moved()
        self.planner.after_commit(record, planned)
        self.out.later(self._reconcile, [record], gateway=False)

    def _on_result(self, _topic: str, envelope: Envelope, result: ConfigResult, record: DeviceRecord | None) -> None:
        if record is None or record.config is None:
            raise Rejected("config.result from a device that was sent no config")
        if result.version != record.version:
            raise Rejected(f"stale config.result for version {result.version}; current is {record.version}")
        problem = result_problem(result, record.config, json.loads(record.config_payload)["id"])
        if problem:  # e.g. `ok` for no items: the device would pass for configured
            raise Rejected(f"config.result refused: {problem}")
        if result == record.result:  # the agent re-sent it after a reconnect
            self.planner.put(record.model_copy(update={"last_seq": envelope.seq}))
            return
        ok = result.status == ResultStatus.OK
        record = record.model_copy(update={
            "result": result, "last_seq": envelope.seq, "updated": now(),
            "state": advance(record.state, Event.RESULT_OK if ok else Event.RESULT_FAILED)})
        self.planner.put(record)
        if ok:
            self.newcomers.settled(record.device_id)
            self.out.event("config.applied", device_id=record.device_id, version=result.version)
        else:
            failed = {r.item: r.detail for r in result.items
                      if r.status not in (ItemStatus.APPLIED, ItemStatus.UNCHANGED)}
            self.out.event("config.failed", Severity.ERROR, device_id=record.device_id,
                           reason=f"{result.status.value}: {failed}", version=result.version)
        self.out.later(self._reconcile, [record], gateway=False)
