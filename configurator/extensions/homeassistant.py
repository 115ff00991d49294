"""Home Assistant: device-based MQTT discovery of every homenet device (payloads: ha_discovery.py).

Its own broker connection, logged in as the configurator (whose ACL allows the discovery
tree, homenet/acl.py). On every committed change of a device it publishes the device's
retained state, and its discovery config when that changed; on `device.forgotten` (and for a
rejected device) an empty retained config, which removes it from HA. When HA announces
itself (`{prefix}/status` = `online`, its birth message) everything is sent again after a
random delay of up to `BIRTH_DELAY` seconds, as HA advises, so that HA restarting with many
publishers does not get them all at once. A button press comes back on
`{root}/ha/{device}/press` and is sent to the configurator's command channel as the
gateway's local operator, as `homenet devices approve` would be.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as paho

from homenet.mqtt import BrokerUrl, make_client, set_nodelay
from homenet.schemas import Topics
from homenet.schemas.messages import Command, Event

from ..bus import DeviceChanged, Notice
from ..lifecycle import State
from ..records import DeviceRecord
from . import Extension
from . import ha_discovery as ha

log = logging.getLogger(__name__)

BIRTH_DELAY = 3.0
"""Seconds, at most, of the random wait before re-sending discovery on HA's birth message."""


class HomeAssistant(Extension):
    name = "homeassistant"

    def start(self) -> None:
        conf = self.host.settings.configurator
        self.prefix = self.host.settings.homeassistant.prefix
        self.topics = Topics(conf.root)
        self._sent: dict[str, bytes] = {}  # device id -> the discovery config HA has
        self._states: dict[str, bytes] = {}
        self._pending: set[str] = set()  # devices shown with an approve button
        self._lock = threading.Lock()
        self._commands = ThreadPoolExecutor(max_workers=1, thread_name_prefix="homeassistant")
        self._birth: threading.Timer | None = None
        login = self.host.login("configurator")
        self.broker = BrokerUrl.parse(conf.broker)
        self.client = make_client(f"homenet-{conf.configurator_id}-homeassistant", clean_session=True,
                                  username=login[0] if login else None, password=login[1] if login else None,
                                  cafile=conf.broker_cafile if self.broker.tls else None)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        self.host.bus.subscribe(self._on_notice)

    def stop(self) -> None:
        self.host.bus.unsubscribe(self._on_notice)
        if self._birth is not None:
            self._birth.cancel()
        self._commands.shutdown(wait=True, cancel_futures=True)
        self.client.disconnect()
        self.client.loop_stop()

    # --- broker --------------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("homeassistant: broker %s refused the connection: %s", self.broker, reason)
            return
        set_nodelay(client)
        client.subscribe([(f"{self.prefix}/status", 1), (ha.press_topic(self.topics, "+"), 1)])
        self._send_all()  # (re)connected: the broker may have lost what was retained

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == f"{self.prefix}/status":
            if msg.payload.strip() == b"online":
                self._schedule_resend()
            return
        device_id = ha.press_target(self.topics, msg.topic)
        button = msg.payload.decode(errors="replace").strip()
        if device_id and button in ha.BUTTONS:
            self._commands.submit(self._press, device_id, button)
        else:
            log.warning("homeassistant: ignored %r on %s", button[:32], msg.topic)

    def _press(self, device_id: str, button: str) -> None:
        from ..app import ADMIN

        try:
            reply = self.host.command(Command(op=button, device_id=device_id), self.host.login(ADMIN))
        except (ConnectionError, TimeoutError, ValueError) as exc:
            log.error("homeassistant: %s %s: %s", button, device_id, exc)
            return
        if not reply.ok:
            log.warning("homeassistant: %s %s refused: %s", button, device_id, reply.error)

    def _schedule_resend(self) -> None:
        with self._lock:
            if self._birth is not None:
                self._birth.cancel()
            self._birth = threading.Timer(random.uniform(0.1, BIRTH_DELAY), self._send_all, kwargs={"force": True})
            self._birth.daemon = True
            self._birth.start()

    # --- what is published ---------------------------------------------------------------

    def _on_notice(self, notice: Notice) -> None:
        if isinstance(notice, DeviceChanged):
            self._send(notice.record)
        elif isinstance(notice, Event) and notice.event == "device.forgotten" and notice.device_id:
            self._remove(notice.device_id)  # HA removes the device

    def _send_all(self, force: bool = False) -> None:
        if not self.host.health().primary:  # stood down: the new primary speaks for the devices
            return
        for record in self.host.devices():
            self._send(record, force)

    def _send(self, record: DeviceRecord, force: bool = False) -> None:
        d = record.device_id
        if record.state == State.REJECTED:
            self._remove(d, force)
            return
        with self._lock:
            was_pending = d in self._pending and record.state != State.PENDING
            config = ha.encode(ha.discovery_payload(record, self.topics, was_pending=was_pending))
            state = ha.encode(ha.state_payload(record))
            if record.state == State.PENDING:
                self._pending.add(d)
            else:
                self._pending.discard(d)
            new_config = force or self._sent.get(d) != config
            new_state = force or self._states.get(d) != state
            self._sent[d], self._states[d] = config, state
        if new_config:
            self.client.publish(ha.config_topic(self.prefix, d), config, qos=1, retain=True)
        if new_state:
            self.client.publish(ha.state_topic(self.topics, d), state, qos=1, retain=True)

    def _remove(self, device_id: str, force: bool = True) -> None:
        with self._lock:
            known = self._sent.pop(device_id, None) is not None
            self._states.pop(device_id, None)
            self._pending.discard(device_id)
        if not (known or force):
            return
        self.client.publish(ha.config_topic(self.prefix, device_id), b"", qos=1, retain=True)
        self.client.publish(ha.state_topic(self.topics, device_id), b"", qos=1, retain=True)
