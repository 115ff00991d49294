"""Standby: a configurator process waits while another one is online, and takes over.

Theory of operation. Configurator processes sharing one data directory (docs/reliability.md)
take turns: one primary, the others standing by. A waiting process never connects with the
primary's client id (`homenet-{configurator_id}`, a persistent session: connecting with it
would throw the primary off). It watches the retained `configurator/state` with a client of
its own (clean session, the same broker account) and believes only states signed by the
shared configurator key. `Watch` decides from what it heard since it (re)subscribed:

  heard                          the waiting process
  `online` (any epoch)           keeps waiting
  `offline` after an `online`    takes over at once (the primary stopped, or died: its will)
  `offline`, or nothing          takes over once `patience` has run out

`patience` is about a second (time for the retained message to arrive) for a plain start, and
`standby_grace` for `--standby` and after being fenced, so that a primary starting or
reconnecting has time to announce itself. After the watcher itself reconnected it is at least
the longest reconnect backoff: a restarted broker may have lost the retained state (amqtt
keeps none), and a live primary may need that long to come back and say `online` again.

Taking over is building a Configurator (it claims the next epoch, fencing every older one)
and starting it. When a newer primary fences it in turn, it has already stopped sending; it is
stopped and the process goes back to waiting.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from homenet.mqtt import RECONNECT_MAX_DELAY, BrokerUrl, make_client, set_nodelay
from homenet.schemas import ContractError, Topics, decode, encode, signed_by
from homenet.schemas.messages import ConfiguratorState
from homenet.schemas.signing import b64, fingerprint
from homenet.settings import ConfiguratorSettings

from .app import Identity, build, identity
from .service import Configurator
from .store import Fenced

log = logging.getLogger(__name__)

SETTLE = 1.0
"""Seconds a configurator starting listens for the retained state before it concludes that no
other configurator is online."""
POLL = 0.1


@dataclass
class Watch:
    """What a waiting configurator heard, and whether it is time to take over (pure)."""

    patience: float
    floor: int = 0
    """States of this epoch and older are not believed: this process's own, fenced since."""
    since: float | None = None
    """When the watcher last (re)connected or heard a state; None before it first connected."""
    reconnected: bool = False
    state: str | None = None
    """`online` or `offline` as last heard since it (re)connected; None: nothing, or cleared."""
    epoch: int = 0
    seen_online: bool = False
    primary_left: bool = False
    """An `offline` came after an `online`: the primary stopped or died."""

    def connected(self, now: float) -> None:
        """What was heard before may be stale: the broker may have restarted without it."""
        self.reconnected = self.reconnected or self.since is not None
        self.since, self.state = now, None

    def heard(self, state: str | None, epoch: int, now: float) -> None:
        if state is not None and (epoch < self.epoch or epoch <= self.floor):
            return  # one fenced since, saying it stood down: the newer one speaks for itself
        self.since, self.state, self.epoch = now, state, epoch
        self.seen_online = self.seen_online or state == "online"
        self.primary_left = self.primary_left or (state == "offline" and self.seen_online)

    def take_over(self, now: float) -> bool:
        if self.since is None or self.state == "online":
            return False
        patience = max(self.patience, RECONNECT_MAX_DELAY) if self.reconnected else self.patience
        return self.primary_left or now - self.since >= patience


class Standby:
    """One configurator process's turns: standing by while another is online, primary otherwise."""

    def __init__(self, settings: ConfiguratorSettings, *, standby: bool = False, ident: Identity | None = None,
                 on_primary: Callable[[Configurator], None] | None = None,
                 on_retire: Callable[[Configurator], None] | None = None) -> None:
        """`standby`: at start, give a primary `standby_grace` seconds to appear, not `SETTLE`;
        `ident`: the configurator's identity (default: from the data directory);
        `on_primary(configurator)`: each time this process becomes the primary, before its
        configurator starts (so nothing it commits is missed); `on_retire(configurator)`: after
        that configurator stopped (the turn ended: stopped, or fenced by a newer one)."""
        self.on_primary, self.on_retire = on_primary, on_retire
        self.settings = settings
        self.ident = ident or identity(settings)
        self.topic = Topics(settings.root).configurator_state
        self.broker = BrokerUrl.parse(settings.broker)
        self.patience = settings.standby_grace if standby else SETTLE
        self.primary: Configurator | None = None
        """The configurator this process runs while it is the primary."""
        self.fenced_epoch = 0
        """The epoch this process had when it was last fenced."""

    def run(self, stop: threading.Event, *, wait_first: bool = True) -> None:
        """Take turns until `stop` is set; without `wait_first`, be the primary at once (the
        gateway, whose broker has just started: nobody else can be online on it yet)."""
        waited = not wait_first or self._wait(stop)
        while waited and not self._serve(stop):
            self.patience = self.settings.standby_grace
            waited = self._wait(stop)

    def _serve(self, stop: threading.Event) -> bool:
        """Be the primary until `stop` is set (True) or a newer configurator fences this one (False)."""
        try:
            service = build(self.settings, self.ident)
        except Fenced as exc:  # another one claimed an epoch while this one was starting
            log.warning("%s: standing by", exc)
            return False
        self.primary = service
        try:
            if self.on_primary is not None:
                self.on_primary(service)
            service.start()
        except BaseException:
            self._retire(service)
            raise
        while not (stop.wait(POLL) or service.fenced.is_set()):
            pass
        self._retire(service)
        if service.fenced.is_set():
            self.fenced_epoch = service.epoch
            log.warning("configurator epoch %d was fenced by a newer one: standing by", service.epoch)
            return False
        return True

    def _retire(self, service: Configurator) -> None:
        self.primary = None
        service.stop()
        if self.on_retire is not None:
            self.on_retire(service)
        service.store.close()

    def _wait(self, stop: threading.Event) -> bool:
        """Block until this process should take over (True) or `stop` is set (False)."""
        # Fenced, it may have thrown the new primary off for a while (the same client id) and put
        # that one into its reconnect backoff: it gives it that long, as after a reconnect.
        watch = Watch(self.patience, self.fenced_epoch, reconnected=self.fenced_epoch > 0)
        lock = threading.Lock()
        login = self.ident.login
        client = make_client(f"homenet-{self.settings.configurator_id}-standby-{secrets.token_hex(4)}",
                             clean_session=True, username=login[0] if login else None,
                             password=login[1] if login else None,
                             cafile=self.settings.broker_cafile if self.broker.tls else None)

        def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                log.error("broker %s refused the standby watcher: %s", self.broker, reason)
                return
            set_nodelay(c)
            with lock:
                watch.connected(time.monotonic())
            c.subscribe(self.topic, qos=1)

        def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            heard = self._read(msg.payload)
            if heard is None:
                return
            if heard == ("online", self.fenced_epoch):  # its own, left by the configurator it stopped
                log.warning("configurator epoch %d stood down: saying so on %s", self.fenced_epoch, self.broker)
                c.publish(self.topic, self._offline(self.fenced_epoch), qos=1, retain=True)
            with lock:
                if heard[0] == "online" and (watch.state, watch.epoch) != heard:
                    log.info("configurator epoch %d is online at %s: standing by", heard[1], self.broker)
                watch.heard(*heard, time.monotonic())

        client.on_connect, client.on_message = on_connect, on_message
        client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        client.loop_start()
        try:
            while not stop.wait(POLL):
                with lock:
                    if watch.take_over(time.monotonic()):
                        log.info("%s: taking over", f"configurator epoch {watch.epoch} went offline"
                                 if watch.primary_left else "no configurator is online")
                        return True
            return False
        finally:
            client.disconnect()
            client.loop_stop()

    def _offline(self, epoch: int) -> bytes:
        """`offline` for `epoch`, signed with the shared key. Its `seq` is a millisecond clock:
        the configurator's counter stopped with it, and agents never judge a retained state by it."""
        body = ConfiguratorState(state="offline", configurator_id=self.settings.configurator_id, epoch=epoch,
                                 public_key=b64(self.ident.key.public))
        return encode("configurator.state", body, sender=self.settings.configurator_id,
                      seq=time.time_ns() // 1_000_000, sign=self.ident.key.sign)[1]

    def _read(self, payload: bytes) -> tuple[str | None, int] | None:
        """(state, epoch) of a retained state; (None, 0) when it was cleared; None when it is
        not to be believed (malformed, or not signed by this configurator's key)."""
        if not payload:
            return None, 0
        try:
            envelope, body = decode(payload, expected_kind="configurator.state")
        except ContractError as exc:
            log.warning("ignored a malformed configurator/state: %s", exc)
            return None
        if not signed_by(envelope, self.ident.key.public):
            log.warning("ignored configurator/state from %r: not signed by this configurator's key %s",
                        envelope.sender, fingerprint(self.ident.key.public))
            return None
        return body.state, body.epoch
