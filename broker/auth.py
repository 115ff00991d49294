"""Our amqtt plugin: who may connect (accounts), and what each client may publish and read (ACL).

amqtt's AnonymousAuthPlugin marks every session anonymous, and anonymous sessions lose their
persistent state and queued QoS 1 messages; sessions admitted here are never anonymous.

Without an accounts file (development, the protocol tests) any well-formed client id is let in
and topics are not filtered. With one (`homenet gateway run`): a client with a username must
hold that account (a device account only under its own client id); a client without one is an
unknown device whose client id is its device id, and only while no account exists for that id
(an enrolled device must log in, so nobody can take over its session anonymously). Failed
logins become `auth.failed` events, at most one per source every few seconds, and a source
that keeps failing waits before each refusal; other clients are not slowed.
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
from homenet.schemas import Topics, TopicError, check_device_id, encode
from homenet.schemas.messages import Event, Severity

# amqtt names clients that send an empty id (mosquitto_sub does) "amqtt/<random>".
CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
EVENT_GAP = 5.0
PENALTY_AFTER = 5
PENALTY = 0.5


@dataclass
class _Failures:
    count: int = 0
    reported: int = 0
    last_event: float = 0.0
    recent: list[float] = field(default_factory=list)


class HomenetAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):
    @dataclass
    class Config:
        accounts_file: str | None = None
        root: str = "homenet/v1"

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        self.accounts = Accounts(self.config.accounts_file) if self.config.accounts_file else None
        self.topics = Topics(self.config.root)
        self._roles: dict[str, tuple[Role, str]] = {}
        self._failures: dict[str, _Failures] = {}

    async def authenticate(self, *, session: Session) -> bool:
        client_id = session.client_id or ""
        if not CLIENT_ID.match(client_id):
            return await self._refuse(session, f"client id {client_id!r} is not well-formed")
        session.is_anonymous = False
        if self.accounts is None:
            return True
        if session.username:
            account = self.accounts.authenticate(session.username, session.password or "")
            if account is None:
                return await self._refuse(session, f"bad password for {session.username!r}")
            if account.role == Role.DEVICE and client_id != account.name:
                return await self._refuse(session, f"device account {account.name!r} used by client {client_id!r}")
            role, name = account.role, account.name
        else:
            try:
                check_device_id(client_id)
            except TopicError:
                return await self._refuse(session, f"anonymous client {client_id!r} is not a device id")
            if self.accounts.get(client_id) is not None:
                return await self._refuse(session, f"device {client_id} is enrolled and must log in")
            role, name = Role.UNKNOWN, client_id
        if session.will_flag and not may_publish(role, name, self.topics, session.will_topic or ""):
            return await self._refuse(session, f"will on {session.will_topic}, which {name} may not publish")
        self._roles[client_id] = (role, name)
        return True

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        return self.allowed(session, topic, action)

    def allowed(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        """Synchronous on purpose: see HomenetBroker._topic_filtering."""
        if self.accounts is None:
            return True
        entry = self._roles.get(session.client_id) if session and session.client_id else None
        if entry is None or topic is None:
            return False
        role, name = entry
        if action == Action.PUBLISH:
            return may_publish(role, name, self.topics, topic)
        if action == Action.SUBSCRIBE:
            return may_subscribe(role, name, self.topics, topic)
        return may_receive(role, name, self.topics, topic)

    async def _refuse(self, session: Session, reason: str) -> bool:
        source = session.remote_address or "?"
        now = time.monotonic()
        failures = self._failures.setdefault(source, _Failures())
        failures.count += 1
        failures.recent = [t for t in failures.recent if now - t < 60] + [now]
        self.context.logger.warning("refused %s from %s: %s", session.client_id, source, reason)
        if now - failures.last_event >= EVENT_GAP:
            new = failures.count - failures.reported
            failures.reported, failures.last_event = failures.count, now
            body = Event(event="auth.failed", severity=Severity.WARNING, sender=session.client_id,
                         reason=f"{new} refused login(s) from {source} (last: {reason})",
                         detail={"source": source, "total": failures.count})
            _, payload = encode("event", body, sender="broker", seq=time.time_ns() // 1_000_000)
            await self.context.broadcast_message(self.topics.events, payload, qos=1)
        if len(failures.recent) > PENALTY_AFTER:  # only this connection waits
            await asyncio.sleep(PENALTY)
        return False
