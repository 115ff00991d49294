"""Home Assistant MQTT device-based discovery payloads for homenet devices (pure).

One retained message per device on `{prefix}/device/{object_id}/config` (HA's device-based
discovery, 2024.11 and later): the mandatory `dev` (device: identifiers, the MACs as
`connections` so HA merges it with the same device seen by another integration, model,
software) and `o` (origin: what published it) blocks, and `cmps`, the components, each with
its platform `p` and a `unique_id`. The components read one retained JSON state per device,
published beside it (`state_payload`); their availability is the device's own `status`, so
HA shows them unavailable while the device is offline. The `online` sensor is the exception:
it says whether the device is online, so it is available while the configurator is.

A component that goes away (the approve button, once the device is no longer pending) is
sent once more with only its `p`, which is how HA is told to remove it; an empty retained
payload removes the whole device.
"""

from __future__ import annotations

import json
import re
from typing import Any

from homenet import __version__
from homenet.schemas import Topics

from ..lifecycle import State
from ..records import DeviceRecord

ORIGIN = {"name": "homenet", "sw": __version__}
STATES = [s.value for s in State]
BUTTONS = ("refresh", "approve")


def object_id(device_id: str) -> str:
    """HA's object ids are `[a-zA-Z0-9_-]`; device ids may also hold dots."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", device_id)


def config_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/device/{object_id(device_id)}/config"


def state_topic(topics: Topics, device_id: str) -> str:
    """The per-device state the components read (retained, under the homenet root)."""
    return f"{topics.root}/ha/{device_id}/state"


def press_topic(topics: Topics, device_id: str) -> str:
    """Where HA publishes a button press (`refresh`, `approve`); operator accounts may."""
    return f"{topics.root}/ha/{device_id}/press"


def press_target(topics: Topics, topic: str) -> str | None:
    """The device id of a press topic, else None."""
    head, tail = f"{topics.root}/ha/", "/press"
    if topic.startswith(head) and topic.endswith(tail):
        return topic[len(head):-len(tail)] or None
    return None


def _device_name(record: DeviceRecord) -> str:
    return record.info.model or record.info.hostname or record.device_id


def discovery_payload(record: DeviceRecord, topics: Topics, *, was_pending: bool = False) -> dict[str, Any]:
    """The discovery config of one device. `was_pending`: HA was shown an approve button that
    must now be removed."""
    d, oid = record.device_id, object_id(record.device_id)
    status = {"topic": topics.device(d, "status"), "value_template": "{{ value_json.state }}"}
    configurator = {"topic": topics.configurator_state, "value_template": "{{ value_json.body.state }}"}

    def sensor(key: str, name: str, template: str, **more: Any) -> dict[str, Any]:
        return {"p": "sensor", "name": name, "value_template": template, "unique_id": f"homenet_{oid}_{key}", **more}

    cmps: dict[str, Any] = {
        f"{oid}_address": sensor("address", "IPv4 address", "{{ value_json.address }}", icon="mdi:ip-network"),
        f"{oid}_state": sensor("state", "Configuration state", "{{ value_json.state }}",
                               device_class="enum", options=STATES),
        f"{oid}_result": sensor("result", "Last result", "{{ value_json.result }}", entity_category="diagnostic"),
        f"{oid}_online": {"p": "binary_sensor", "name": "Online", "device_class": "connectivity",
                          "value_template": "{{ 'ON' if value_json.online else 'OFF' }}",
                          "unique_id": f"homenet_{oid}_online", "availability": [configurator]},
        f"{oid}_refresh": {"p": "button", "name": "Refresh", "command_topic": press_topic(topics, d),
                           "payload_press": "refresh", "unique_id": f"homenet_{oid}_refresh",
                           "entity_category": "diagnostic"},
    }
    if record.state == State.PENDING:
        cmps[f"{oid}_approve"] = {"p": "button", "name": "Approve", "command_topic": press_topic(topics, d),
                                  "payload_press": "approve", "unique_id": f"homenet_{oid}_approve",
                                  "icon": "mdi:check-decagram"}
    elif was_pending:
        cmps[f"{oid}_approve"] = {"p": "button"}
    macs = sorted({i.mac.lower() for i in record.info.interfaces if i.mac})
    dev: dict[str, Any] = {"ids": [f"homenet_{oid}"], "name": _device_name(record),
                           "mdl": record.info.model or record.info.device_type}
    if macs:
        dev["cns"] = [["mac", m] for m in macs]
    if record.info.agent_version:
        dev["sw"] = record.info.agent_version
    return {"dev": dev, "o": ORIGIN, "cmps": cmps, "state_topic": state_topic(topics, d),
            "availability": [status], "qos": 1}


def state_payload(record: DeviceRecord) -> dict[str, Any]:
    result = record.result.status.value if record.result else ""
    return {"address": record.address or "", "state": record.state.value, "online": record.online,
            "type": record.info.device_type, "result": result or "none", "version": record.version}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
