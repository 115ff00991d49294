"""Broker accounts kept by an external Mosquitto's dynamic-security plugin.

To change accounts the configurator logs in as the plugin's admin, publishes JSON commands on
`$CONTROL/dynamic-security/v1` and reads the answers on `.../response`, matched by
`correlationData`. Each change is one short admin session (connect, subscribe, commands,
answers, disconnect): changes are rare (an enrollment, an operator account) and nothing is left
connected that would need closing. Its own MQTT session uses its `configurator` account, like
every other client's.

What Mosquitto is given, all rendered from the one table `homenet.acl.RULES`:

- roles `homenet-configurator`, `homenet-reader`, `homenet-operator`, each shared by the
  accounts (dynsec clients, named as homenet names them) of that role;
- per enrolled device D, a role `homenet-device-D` and a client D bound to client id D. The
  dynamic-security plugin of Mosquitto 2.0 matches ACL topics literally (no `%u`/`%c`), so a
  device's own topics need a role of their own;
- the anonymous group `homenet-unknown` (role `homenet-unknown`): what every unknown device may
  read (configurator/state). Its own topics (register, status, register/reply) depend on its
  client id, which 2.0's plugin cannot substitute: `unknown_acl_file` renders them as
  `pattern` lines for Mosquitto's `acl_file`, which Mosquitto consults when the plugin has no
  answer (the listener needs `allow_anonymous true`);
- every homenet role but the anonymous one ends with deny-all entries (lowest priority), so the
  plugin answers every question about homenet's clients and those patterns never widen them;
- the plugin's default access (where no ACL matches) denies sending, subscribing and, unlike
  the plugin's own default, receiving (`DEFAULT_ACCESS`). This applies to the broker's other
  clients too: they need explicit publishClientReceive grants.

Roles and the group are (re)made idempotently by `ensure_roles`, at every configurator start,
so a changed rule or topic root reaches the broker.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from homenet.accounts import Account, AccountError, new_password
from homenet.acl import OWN, RULES, TREE, Role, render
from homenet.mqtt import BrokerUrl, make_client
from homenet.schemas import Topics
from homenet.schemas.topics import check_device_id

log = logging.getLogger(__name__)

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSE = CONTROL + "/response"
SHARED_ROLES = {Role.CONFIGURATOR: "homenet-configurator", Role.READER: "homenet-reader",
                Role.OPERATOR: "homenet-operator"}
DEVICE_ROLE = "homenet-device-"
"""Followed by the device id."""
UNKNOWN = "homenet-unknown"
"""The anonymous group, and its role."""
WITHHELD, ALLOW, DENY_ALL = 1, 0, -1
"""ACL priorities: withheld secrets are checked first, the deny-all entries last."""
DEFAULT_ACCESS = [{"acltype": "publishClientSend", "allow": False},
                  {"acltype": "publishClientReceive", "allow": False},
                  {"acltype": "subscribe", "allow": False}]
"""The plugin's answer where no ACL matches. Its own default lets a client receive: it would
then answer "allowed" at once, and an anonymous client, whose subscriptions Mosquitto's
`acl_file` lets through (checking on delivery), would get every device's messages. Denied,
the plugin defers to the `acl_file` patterns."""


class DynsecError(AccountError):
    """The broker refused the admin, did not answer, or refused a command."""


def device_role(device_id: str) -> str:
    return DEVICE_ROLE + check_device_id(device_id)


def role_acls(role: Role, topics: Topics, name: str = "") -> list[dict[str, Any]]:
    """The role's ACL entries. For `Role.UNKNOWN` only what does not depend on the client id
    (see `unknown_acl_file`) and no deny-all, which would also deny what the patterns allow."""
    rules = RULES[role]
    if role == Role.DEVICE:
        check_device_id(name)
    mine = (lambda entry: OWN not in entry) if role == Role.UNKNOWN else (lambda entry: True)
    acls: list[dict[str, Any]] = []

    def add(acltype: str, entries: Iterable[str]) -> None:
        acls.extend({"acltype": acltype, "topic": render(e, topics, name), "allow": True, "priority": ALLOW}
                    for e in entries if mine(e))

    add("publishClientSend", rules.publish)
    add("publishClientReceive", rules.receive)
    acls.extend({"acltype": "publishClientReceive", "topic": render(e, topics, name), "allow": False,
                 "priority": WITHHELD} for e in rules.withheld)
    if rules.any_filter:
        acls.append({"acltype": "subscribePattern", "topic": "#", "allow": True, "priority": ALLOW})
    else:
        add("subscribeLiteral", [e for e in rules.receive if e != TREE])
        add("subscribePattern", [e for e in rules.receive if e == TREE])
    if role != Role.UNKNOWN:
        for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern"):
            if not any(a["acltype"] == acltype and a["topic"] == "#" for a in acls):
                acls.append({"acltype": acltype, "topic": "#", "allow": False, "priority": DENY_ALL})
    return acls


def unknown_acl_file(topics: Topics) -> str:
    """Mosquitto `acl_file` lines for what an unknown device may do on its own topics (`%c`
    is its client id): the part of its rules the dynamic-security plugin of 2.0 cannot say."""
    rules = RULES[Role.UNKNOWN]
    lines = ["# homenet: an unknown device (anonymous; its client id is its device id) on its own topics",
             "# (rendered from homenet.acl.RULES; the rest is in dynamic security)"]
    lines += [f"pattern write {render(e, topics, '%c')}" for e in rules.publish if OWN in e]
    lines += [f"pattern read {render(e, topics, '%c')}" for e in rules.receive if OWN in e]
    return "\n".join(lines) + "\n"


def _role_of(client: dict[str, Any]) -> Role | None:
    """The homenet role of a dynsec client, None for a client homenet did not make."""
    names = {r.get("rolename") for r in client.get("roles", [])}
    for role, rolename in SHARED_ROLES.items():
        if rolename in names:
            return role
    return Role.DEVICE if DEVICE_ROLE + str(client.get("username")) in names else None


class _Session:
    """One admin connection, driven from the calling thread: send commands, wait for answers."""

    def __init__(self, broker: BrokerUrl, login: tuple[str, str], cafile: Path | None, timeout: float) -> None:
        self.broker = broker
        self.login = login[0]
        self.timeout = timeout
        self.client = make_client(f"homenet-dynsec-{secrets.token_hex(4)}", clean_session=True,
                                  username=login[0], password=login[1], cafile=cafile)
        self.connack: Any = None
        self._subscribed: list[Any] | None = None
        self._answers: dict[str, dict[str, Any]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = reason

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any) -> None:
        self._subscribed = list(reasons)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable dynamic-security response: %r", msg.payload[:200])
            return
        for response in responses:
            if isinstance(response, dict) and response.get("correlationData"):
                self._answers[response["correlationData"]] = response

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done():
            if time.monotonic() > deadline:
                raise DynsecError(f"{self.broker}: no {what} within {self.timeout:g} s")
            rc = self.client.loop(timeout=0.05)
            if rc != paho.MQTT_ERR_SUCCESS and not done():
                raise DynsecError(f"{self.broker}: connection lost waiting for {what} ({paho.error_string(rc)})")

    def connect(self) -> Any:
        """The CONNACK's reason code."""
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as exc:
            raise DynsecError(f"cannot reach the broker at {self.broker}: {exc}") from None
        self._wait(lambda: self.connack is not None, "CONNACK")
        return self.connack

    def __enter__(self) -> _Session:
        try:
            if self.connect().is_failure:
                raise DynsecError(f"{self.broker} refused the dynamic-security admin: {self.connack}")
            self.client.subscribe(RESPONSE, qos=1)
            self._wait(lambda: self._subscribed is not None, "SUBACK")
            if any(r.is_failure for r in self._subscribed or []):
                raise DynsecError(f"{self.broker} does not let {self.login!r} read {RESPONSE}: "
                                  "is it the plugin's admin?")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.client.socket() is not None:
            self.client.disconnect()
            self.client.loop(timeout=0.01)  # sends the DISCONNECT; paho then closes the socket

    def run(self, *commands: dict[str, Any]) -> list[dict[str, Any]]:
        """The answers, in order; an answer with an `error` is returned, not raised."""
        tag = secrets.token_hex(6)
        sent = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(commands)]
        self.client.publish(CONTROL, json.dumps({"commands": sent}), qos=1)
        ids = [c["correlationData"] for c in sent]
        self._wait(lambda: all(i in self._answers for i in ids),
                   f"answer to {', '.join(c['command'] for c in commands)} (is {self.login!r} the plugin's admin?)")
        return [self._answers.pop(i) for i in ids]

    def check(self, *commands: dict[str, Any]) -> list[dict[str, Any]]:
        """Like `run`, but an error answer raises."""
        answers = self.run(*commands)
        for command, answer in zip(commands, answers):
            if answer.get("error"):
                raise DynsecError(f"{command['command']} {_subject(command)}: {answer['error']}")
        return answers


def _subject(command: dict[str, Any]) -> str:
    return next((repr(command[k]) for k in ("username", "rolename", "groupname") if k in command), "")


class DynsecAccounts:
    """An `AccountStore` (homenet.accounts) in Mosquitto's dynamic-security plugin.

    Only clients holding a homenet role are homenet's: `get` does not see other clients of
    the broker, and `set`/`remove` refuse to touch them (the admin's own client included).
    """

    def __init__(self, broker: str, admin: tuple[str, str], topics: Topics, *,
                 cafile: Path | None = None, timeout: float = 10.0) -> None:
        self.broker = BrokerUrl.parse(broker)
        self.admin = admin
        self.topics = topics
        self.cafile = cafile if self.broker.tls else None
        self.timeout = timeout
        self._lock = threading.Lock()

    def _session(self) -> _Session:
        return _Session(self.broker, self.admin, self.cafile, self.timeout)

    # --- roles --------------------------------------------------------------------------

    def ensure_roles(self) -> None:
        """Create or update the shared roles, every device role and the anonymous group."""
        with self._lock, self._session() as s:
            listed = s.check({"command": "listRoles", "verbose": False, "count": -1, "offset": 0})[0]
            existing = set(listed.get("data", {}).get("roles", []))
            wanted = {name: role_acls(role, self.topics) for role, name in SHARED_ROLES.items()}
            wanted[UNKNOWN] = role_acls(Role.UNKNOWN, self.topics)
            for name in existing:
                if name.startswith(DEVICE_ROLE):
                    try:
                        wanted[name] = role_acls(Role.DEVICE, self.topics, name[len(DEVICE_ROLE):])
                    except ValueError:
                        log.warning("dynamic security: role %s is not a device's; left alone", name)
            s.check(*(self._put_role(name, acls, name in existing) for name, acls in wanted.items()))
            group = s.run({"command": "getGroup", "groupname": UNKNOWN})[0]
            if group.get("error"):
                s.check({"command": "createGroup", "groupname": UNKNOWN, "roles": [{"rolename": UNKNOWN}]})
            elif UNKNOWN not in {r.get("rolename") for r in group.get("data", {}).get("group", {}).get("roles", [])}:
                s.check({"command": "addGroupRole", "groupname": UNKNOWN, "rolename": UNKNOWN})
            s.check({"command": "setAnonymousGroup", "groupname": UNKNOWN},
                    {"command": "setDefaultACLAccess", "acls": DEFAULT_ACCESS})

    @staticmethod
    def _put_role(name: str, acls: list[dict[str, Any]], exists: bool) -> dict[str, Any]:
        return {"command": "modifyRole" if exists else "createRole", "rolename": name,
                "textdescription": "made by homenet from homenet.acl.RULES", "acls": acls}

    # --- accounts -----------------------------------------------------------------------

    def _client(self, s: _Session, name: str) -> dict[str, Any] | None:
        answer = s.run({"command": "getClient", "username": name})[0]
        if answer.get("error"):
            if "not found" in answer["error"].lower():
                return None
            raise DynsecError(f"getClient {name!r}: {answer['error']}")
        return answer.get("data", {}).get("client") or None

    def _homenet_client(self, s: _Session, name: str) -> tuple[dict[str, Any], Role] | None:
        client = self._client(s, name)
        if client is None:
            return None
        role = _role_of(client)
        if role is None:
            raise DynsecError(f"broker client {name!r} was not made by homenet; it is left alone")
        return client, role

    def get(self, name: str) -> Account | None:
        with self._session() as s:
            client = self._client(s, name)
        role = _role_of(client) if client else None
        return Account(name, role, "") if role else None

    def set(self, name: str, role: Role) -> str:
        """Create or replace the client `name` with `role`; a device's is bound to client id
        `name`. Replacing disconnects whoever is logged in with the old password."""
        if role not in SHARED_ROLES and role != Role.DEVICE:
            raise ValueError(f"no broker account has role {role.value}")
        password = new_password()
        with self._lock, self._session() as s:
            old = self._homenet_client(s, name)
            commands: list[dict[str, Any]] = []
            if old is not None:
                s.check({"command": "deleteClient", "username": name})
                if old[1] == Role.DEVICE and role != Role.DEVICE:
                    s.run({"command": "deleteRole", "rolename": device_role(name)})
            create: dict[str, Any] = {"command": "createClient", "username": name, "password": password,
                                      "textdescription": f"homenet {role.value}"}
            if role == Role.DEVICE:
                rolename = device_role(name)
                existing = s.run({"command": "getRole", "rolename": rolename})[0]
                commands.append(self._put_role(rolename, role_acls(role, self.topics, name), not existing.get("error")))
                create["clientid"] = name
            else:
                rolename = SHARED_ROLES[role]
            commands.append({**create, "roles": [{"rolename": rolename}]})
            s.check(*commands)
        return password

    def batch(self) -> AbstractContextManager[None]:
        """Nothing to gather: Mosquitto has applied each change when its command returns."""
        return nullcontext()

    def remove(self, name: str) -> None:
        with self._lock, self._session() as s:
            old = self._homenet_client(s, name)
            if old is None:
                return
            s.check({"command": "deleteClient", "username": name})
            if old[1] == Role.DEVICE:
                s.run({"command": "deleteRole", "rolename": device_role(name)})

    def authenticate(self, name: str, password: str) -> Account | None:
        """Whether a login as `name` with `password` is accepted, tried with a client id of its
        own: a device account, bound to the device's client id, is never confirmed this way
        (trying would take the device's session over)."""
        account = self.get(name)
        if account is None or not password:
            return None
        probe = _Session(self.broker, (name, password), self.cafile, self.timeout)
        try:
            return None if probe.connect().is_failure else account
        finally:
            probe.close()
