"""What the configurator sends, signed and numbered, through the engine's outbox: every handler
publishes here, so none of them can send ahead of the commit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from homenet.keys import KeyPair
from homenet.schemas import Topics, encode
from homenet.schemas.messages import ConfiguratorState, Event as EventBody, Model, Severity
from homenet.schemas.signing import b64
from homenet.sequence import SequenceCounter

from .bus import Bus

log = logging.getLogger(f"{__package__}.service")  # one name in the journal for the whole service

_LEVEL = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING, Severity.ERROR: logging.ERROR}
Send = Callable[..., Any]
"""`send(topic, payload, qos=1, retain=...)`: the MQTT client's publish."""
Later = Callable[..., None]
"""`later(action, *args, **kwargs)`: the engine's outbox."""


@dataclass(frozen=True)
class Publisher:
    """`epoch`: this configurator's, in its state and its configs."""
    topics: Topics
    sender: str
    key: KeyPair
    seq: SequenceCounter
    epoch: int
    send: Send
    later: Later
    bus: Bus

    def state_payload(self, state: str) -> bytes:
        body = ConfiguratorState(state=state, configurator_id=self.sender, epoch=self.epoch,
                                 public_key=b64(self.key.public))
        return encode("configurator.state", body, sender=self.sender, seq=self.seq.next(), sign=self.key.sign)[1]

    def online(self) -> None:
        """This primary's retained `online`."""
        self.publish_raw(self.topics.configurator_state, self.state_payload("online"), retain=True)

    def sign(self, kind: str, body: Model) -> tuple[str, bytes]:
        return encode(kind, body, sender=self.sender, seq=self.seq.next(), sign=self.key.sign)

    def publish(self, topic: str, kind: str, body: Model, *, retain: bool = False) -> str:
        msg_id, payload = self.sign(kind, body)
        self.publish_raw(topic, payload, retain=retain)
        return msg_id

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.later(self.send, topic, payload, qos=1, retain=retain)

    def event(self, name: str, severity: Severity = Severity.INFO, *, device_id: str | None = None,
              reason: str = "", topic: str | None = None, sender: str | None = None, **detail: Any) -> None:
        """Log and publish an audit entry on `events`."""
        log.log(_LEVEL[severity], "%s%s%s%s", name, f" device={device_id}" if device_id else "",
                f" topic={topic} sender={sender}" if topic else "", f": {reason}" if reason else "")
        body = EventBody(event=name, severity=severity, device_id=device_id, topic=topic,
                         sender=sender, reason=reason, detail=detail)
        self.publish(self.topics.events, "event", body)
        self.later(self.bus.emit, body)
