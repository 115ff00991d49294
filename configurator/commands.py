"""The operator's command channel (`configurator/command`, docs/protocol.md): approve, reject,
pair, reset, refresh, forget, replace, user.add, user.remove. Each command is handled in the
engine's batch like a device message, and answered on `command/reply` after the commit."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter

from homenet.accounts import AccountError
from homenet.acl import Role
from homenet.keys import KeyPair
from homenet.schemas import Envelope, decode, signed_by
from homenet.schemas.messages import Command, CommandReply, ConfigItem, DeviceInfo, RegisterStatus, Rpc, Severity
from homenet.schemas.signing import canonical_pairing_code, pairing_code, unb64

from .devices import Devices, Rejected
from .holdings import held_by
from .ipam import quarantine
from .operator import OPERATOR_KEY
from .lifecycle import PLANNABLE, Event, State, advance
from .planner import Handler, Parts
from .records import DeviceRecord, now

log = logging.getLogger(f"{__package__}.service")  # one name in the journal for the whole service

RETIRED_KEPT = 100
"""Forgotten devices whose settings a replacement unit can still take."""
_CONFIG_ITEM: TypeAdapter[ConfigItem] = TypeAdapter(ConfigItem)


def _model_of(info: DeviceInfo) -> list[str]:
    return [info.device_type, info.maker, info.model]


def _describe(model: list[str]) -> str:
    device_type, *made = model
    return f"{device_type} ({' '.join(m for m in made if m) or 'no model'})"


class Commands(Handler):
    """`close_session(name)`: closes a client's connection at the broker, where it can be done
    (read when needed: `Configurator.close_session` is set after construction)."""

    def __init__(self, parts: Parts, devices: Devices, close_session: Callable[[], Callable[[str], None] | None]) -> None:
        super().__init__(parts)
        self.devices = devices
        self._close_session = close_session
        self._operator: bytes | None = None
        self._ops: dict[str, Callable[[Command], dict[str, Any]]] = {
            "forget": self.forget, "approve": self._approve, "reject": self._reject,
            "pair": self._pair, "reset": self._reset, "refresh": self._refresh, "replace": self._replace,
            "user.add": self._user_add, "user.remove": self._user_remove}

    def on_command(self, payload: bytes) -> None:
        envelope, command = decode(payload, expected_kind="command")
        try:
            self._check_signed(envelope)
            result = self._ops[command.op](command)
            reply = CommandReply(re=envelope.id, ok=True, result=result)
        except (Rejected, AccountError) as exc:  # AccountError: e.g. Mosquitto refused the change
            log.warning("command %s from %s refused: %s", command.op, envelope.sender, exc)
            reply = CommandReply(re=envelope.id, ok=False, error=str(exc))
        self.out.publish(self.out.topics.command_reply, "command.reply", reply)

    def _check_signed(self, envelope: Envelope) -> None:
        """Only the gateway's operator key commands (the broker already admits only operator
        accounts on this topic, never a will); its seq must rise, so a command a reader saw
        cannot be sent again. Without broker accounts (a configurator in front of an open
        broker: no trust boundary at all, docs/security.md) commands are taken as they come."""
        if self.accounts is None:
            return
        if not signed_by(envelope, self._operator_public()):
            self.out.event("command.refused", Severity.WARNING, sender=envelope.sender,
                           reason=f"{envelope.sender}: not signed by the gateway's operator key")
            raise Rejected("not signed by the gateway's operator key (the CLI on the gateway, the owner's page "
                           "and Home Assistant's buttons sign with it)")
        last = int(self.store.meta().get("operator_seq", 0))
        if envelope.seq <= last:
            self.out.event("command.refused", Severity.WARNING, sender=envelope.sender,
                           reason=f"{envelope.sender}: replayed (seq {envelope.seq} is not above {last})")
            raise Rejected(f"replayed or out of order: seq {envelope.seq} is not above {last}")
        self.store.set_meta(operator_seq=envelope.seq)

    def _operator_public(self) -> bytes | None:
        """The operator key's public half, read once it exists (made with the identity)."""
        path = self.settings.data_dir / OPERATOR_KEY
        if self._operator is None and path.exists():
            self._operator = KeyPair.load_or_create(path).public
        return self._operator

    def _known(self, command: Command, *states: State) -> DeviceRecord:
        record = self.store.get(command.device_id or "")
        if record is None:
            raise Rejected(f"no device {command.device_id!r}")
        if states and record.state not in states:
            raise Rejected(f"{record.device_id} is {record.state.value}, not {' or '.join(s.value for s in states)}")
        return record

    # --- enrollment -------------------------------------------------------------------------

    def _approve(self, command: Command) -> dict[str, Any]:
        record = self.devices.accept(self._known(command, State.PENDING), Event.APPROVE)
        self.out.event("device.approved", device_id=record.device_id)
        return {"device_id": record.device_id, "address": record.address}

    def _reject(self, command: Command) -> dict[str, Any]:
        record = self._known(command, State.PENDING)
        record = record.model_copy(update={"state": advance(record.state, Event.REJECT), "updated": now()})
        self.planner.put(record)
        self.devices.reply(record.device_id, record.register_id, RegisterStatus.REJECTED, "rejected by the owner")
        self.out.event("device.rejected", Severity.WARNING, device_id=record.device_id,
                       reason="rejected by the owner")
        return {"device_id": record.device_id}

    def _pair(self, command: Command) -> dict[str, Any]:
        try:
            code = canonical_pairing_code(command.code)
        except ValueError as exc:
            raise Rejected(str(exc)) from None
        waiting = [r for r in self.store.all() if r.state == State.PENDING and r.public_key
                   and pairing_code(unb64(r.public_key) or b"") == code]
        if len(waiting) != 1:
            self.out.event("pairing.failed", Severity.WARNING,
                           reason=f"no device is waiting with pairing code {code!r}")
            raise Rejected(f"no device is waiting with pairing code {code!r}")
        return self._approve(Command(op="approve", device_id=waiting[0].device_id))

    def _reset(self, command: Command) -> dict[str, Any]:
        """Unbind the device's key (e.g. a reinstalled agent): its next register binds a new one."""
        record = self._known(command)
        self.planner.put(record.model_copy(update={"public_key": None, "last_seq": 0, "updated": now()}))
        self._drop_account(record.device_id)
        self.out.event("device.reset", Severity.WARNING, device_id=record.device_id,
                       reason="key binding cleared by the operator")
        return {"device_id": record.device_id}

    def _refresh(self, command: Command) -> dict[str, Any]:
        """Ask the device for its info now (rpc `refresh`), e.g. from Home Assistant's button."""
        record = self._known(command)
        self.out.publish(self.out.topics.device(record.device_id, "rpc"), "rpc", Rpc(method="refresh"))
        return {"device_id": record.device_id}

    # --- broker accounts --------------------------------------------------------------------

    def _drop_account(self, name: str) -> None:
        """Revoke the account and, once that is committed, close the session it logged in."""
        if self.accounts is not None and self.accounts.get(name) is not None:
            self.accounts.remove(name)
            close = self._close_session()
            if close is not None:
                self.out.later(close, name)

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
        self.out.event("user.added", reason=f"{role.value} account {name}")
        return {"username": name, "password": password, "role": role.value}

    def _user_remove(self, command: Command) -> dict[str, Any]:
        account = self.accounts.get(command.user or "") if self.accounts else None
        if account is None or account.role not in (Role.READER, Role.OPERATOR):
            raise Rejected(f"no operator account {command.user!r}")
        self.accounts.remove(account.name)
        self.out.event("user.removed", reason=f"{account.role.value} account {account.name}")
        return {"username": account.name}

    # --- forgetting and replacing -----------------------------------------------------------

    def forget(self, command: Command) -> dict[str, Any]:
        """Remove the device and everything set for it; if it comes back it registers afresh."""
        record = self._known(command)
        self.store.delete(record.device_id)
        self.devices.newcomers.settled(record.device_id)
        addresses = held_by(record)[0] if self.settings.forget_quarantine else set()
        self.planner.holdings.hold(record.device_id, addresses)  # its ports are free at once
        if addresses:
            self.store.set_meta(quarantine=quarantine(self.store.meta(), record.device_id, addresses,
                                                      time.time() + self.settings.forget_quarantine))
        self._drop_account(record.device_id)
        self.out.later(self.driver.remove, record.device_id)
        for channel in ("config", "config/result", "info", "status"):  # clear its retained messages
            self.out.publish_raw(self.out.topics.device(record.device_id, channel), b"", retain=True)
        self.planner.publish_gateway_state()
        self._retire(record)
        self.out.event("device.forgotten", device_id=record.device_id, address=record.address)
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
        self.planner.release(command.predecessor)  # gone for good, the owner says: its addresses are for its successor
        record = self.planner.replan(record, again=True, previous=previous)
        del retired[command.predecessor]
        self.store.set_meta(retired=retired)
        self.out.event("device.replaced", device_id=record.device_id, predecessor=command.predecessor,
                       reason=f"takes the place of {command.predecessor}: {record.address or record.error}")
        return {"device_id": record.device_id, "address": record.address}
