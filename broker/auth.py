"""Our amqtt plugin: who may connect (accounts), and what each client may publish and read (ACL).

amqtt's AnonymousAuthPlugin marks every session anonymous, and anonymous sessions lose their
persistent state and queued QoS 1 messages; sessions admitted here are never anonymous.

Without an accounts file (development, the protocol tests) any well-formed client id is let in
and topics are not filtered. With one (`homenet gateway run`): a client with a username must
hold that account (a device account only under its own client id); a client without one is an
unknown device whose client id is its device id, and only while no account exists for that id
(an enrolled device must log in, so nobody can take over its session anonymously).

Client ids are identities too: `homenet-*` (the configurator's, its standby's) belongs to the
configurator account, `operator-*` (the CLI's) to operator accounts, and no privileged account
may use an enrolled device's id. A will must be a topic the client may publish, never an
operator command; it is checked at CONNECT (refused) and again when it would fire.

The plugin only answers: the broker (broker/connect.py) asks before it touches any session,
so a refused client changes nothing. Refusals become `auth.failed` events (broker/reports.py);
a source that keeps failing waits before each refusal; other clients are not slowed.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from homenet.accounts import Accounts
from homenet.acl import Role, may_publish, may_receive, may_subscribe
from homenet.schemas import Topics, TopicError, check_device_id

from .reports import BrokerReports

# amqtt names clients that send an empty id (mosquitto_sub does) "amqtt/<random>".
CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
PENALTY_AFTER = 5
PENALTY = 0.5
RESERVED = {"homenet-": (Role.CONFIGURATOR,), "operator-": (Role.CONFIGURATOR, Role.OPERATOR, Role.READER)}
"""Client id prefixes and the only roles that may use them."""


@dataclass
class _Failures:
    recent: list[float] = field(default_factory=list)


class HomenetAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):
    @dataclass
    class Config:
        accounts_file: str | None = None
        root: str = "homenet/v1"
        discovery: str = "homeassistant"

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        self.accounts = Accounts(self.config.accounts_file) if self.config.accounts_file else None
        self.topics = Topics(self.config.root, self.config.discovery)
        self._roles: dict[str, tuple[Role, str]] = {}
        self._failures: dict[str, _Failures] = {}
        self.reports = BrokerReports(lambda payload: self.context.broadcast_message(self.topics.events, payload, qos=1))

    async def authenticate(self, *, session: Session) -> bool:
        verdict = self.verdict(session)
        if isinstance(verdict, str):
            return await self._refuse(session, verdict)
        session.is_anonymous = False
        if verdict is not None:
            self._roles[session.client_id] = verdict
        return True

    def verdict(self, session: Session) -> tuple[Role, str] | str | None:
        """(role, account) for an admitted client, the reason for a refused one, None when
        accounts are off (every well-formed id is let in)."""
        client_id = session.client_id or ""
        if not CLIENT_ID.match(client_id):
            return f"client id {client_id[:80]!r} is not well-formed"
        if self.accounts is None:
            return None
        if session.username:
            account = self.accounts.authenticate(session.username, session.password or "")
            if account is None:
                return f"bad password for {session.username[:80]!r}"
            if account.role == Role.DEVICE and client_id != account.name:
                return f"device account {account.name!r} used by client {client_id!r}"
            if account.role != Role.DEVICE and (other := self.accounts.get(client_id)) and other.role == Role.DEVICE:
                return f"account {account.name!r} may not use the client id of enrolled device {client_id!r}"
            role, name = account.role, account.name
        else:
            try:
                check_device_id(client_id)
            except TopicError:
                return f"anonymous client {client_id!r} is not a device id"
            if self.accounts.get(client_id) is not None:
                return f"device {client_id} is enrolled and must log in"
            role, name = Role.UNKNOWN, client_id
        for prefix, roles in RESERVED.items():
            if client_id.startswith(prefix) and role not in roles:
                return f"client id {client_id!r} is reserved for {' and '.join(r.value for r in roles)} accounts"
        if session.will_flag and (reason := self._will_refused(role, name, session.will_topic or "")):
            return reason
        return role, name

    def _will_refused(self, role: Role, name: str, topic: str) -> str | None:
        if topic == self.topics.command:
            return f"a will on {topic}: operator commands never come from a will"
        if not may_publish(role, name, self.topics, topic):
            return f"a will on {topic[:120]}, which {name} may not publish"
        return None

    def will_allowed(self, session: Session) -> bool:
        """Checked again when the will would fire: the rights may have changed since CONNECT
        (an account removed, a device forgotten)."""
        if self.accounts is None:
            return True
        entry = self._roles.get(session.client_id or "")
        return entry is not None and self._will_refused(*entry, session.will_topic or "") is None

    def role_of(self, client_id: str) -> Role | None:
        entry = self._roles.get(client_id)
        return entry[0] if entry else None

    def forget(self, client_id: str) -> None:
        """The session is gone: its rights go with it (memory an unknown client controls)."""
        self._roles.pop(client_id, None)

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        return self.allowed(session, topic, action)

    def allowed(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        """Synchronous on purpose: see HomenetBroker._topic_filtering. A refused publish is
        reported (`auth.denied`); a refused subscription is not (an agent subscribes to its
        config before it is enrolled, and a refusal gives nothing away), nor what a
        subscriber's filter matches but it may not read (a reader's `#` matches secrets)."""
        if self.accounts is None:
            return True
        entry = self._roles.get(session.client_id) if session and session.client_id else None
        if entry is None or topic is None:
            return False
        role, name = entry
        if action == Action.SUBSCRIBE:
            return may_subscribe(role, name, self.topics, topic)
        if action != Action.PUBLISH:
            return may_receive(role, name, self.topics, topic)
        allowed = may_publish(role, name, self.topics, topic)
        if not allowed:
            assert session is not None
            self.reports.note("auth.denied", session.client_id, f"publish on {topic[:160]} refused to {role.value} {name}",
                              sender=session.client_id, topic=topic[:160])
        return allowed

    async def _refuse(self, session: Session, reason: str) -> bool:
        source = session.remote_address or "?"
        now = time.monotonic()
        if source not in self._failures and len(self._failures) > 10_000:
            self._failures = {s: f for s, f in self._failures.items() if f.recent and now - f.recent[-1] < 60}
        failures = self._failures.setdefault(source, _Failures())
        failures.recent = [t for t in failures.recent if now - t < 60] + [now]
        self.context.logger.warning("refused %s from %s: %s", (session.client_id or "")[:80], source, reason)
        self.reports.note("auth.failed", source, f"refused login: {reason}", sender=(session.client_id or "")[:128])
        if len(failures.recent) > PENALTY_AFTER:  # only this connection waits
            await asyncio.sleep(PENALTY)
        return False
