"""Home Assistant's documented rules for MQTT device-based discovery payloads, as a checker.

From HA's MQTT integration docs (device discovery, 2024.11+): the root holds the mandatory
`dev` (device) and `o` (origin) blocks and the components under `cmps`; a device needs
identifiers or connections; the origin needs a name; every component has its platform `p`
and a `unique_id` (a component with only `p` is a removal); a sensor and a binary sensor need
a state topic (their own or the shared one at the root), a button a command topic;
availability is a list of {topic, value_template, payload_available, payload_not_available}.
Keys are full option names or their documented abbreviations.
"""

from __future__ import annotations

from typing import Any

ABBREVIATIONS = {"dev": "device", "o": "origin", "cmps": "components", "p": "platform", "ids": "identifiers",
                 "cns": "connections", "mf": "manufacturer", "mdl": "model", "sw": "sw_version",
                 "hw": "hw_version", "sn": "serial_number", "cu": "configuration_url", "sa": "suggested_area",
                 "uniq_id": "unique_id", "stat_t": "state_topic", "cmd_t": "command_topic",
                 "val_tpl": "value_template", "avty": "availability", "t": "topic", "pl_prs": "payload_press",
                 "dev_cla": "device_class", "ent_cat": "entity_category", "ic": "icon", "ops": "options"}
DEVICE_KEYS = {"identifiers", "connections", "name", "manufacturer", "model", "sw_version", "hw_version",
               "serial_number", "configuration_url", "suggested_area", "via_device"}
ORIGIN_KEYS = {"name", "sw_version", "support_url", "sw", "url"}
ROOT_KEYS = {"device", "origin", "components", "state_topic", "availability", "availability_mode", "qos",
             "encoding", "command_topic"}
COMPONENT_KEYS = {"platform", "name", "unique_id", "value_template", "state_topic", "command_topic",
                  "payload_press", "device_class", "entity_category", "icon", "options", "availability",
                  "payload_on", "payload_off", "unit_of_measurement", "enabled_by_default"}
AVAILABILITY_KEYS = {"topic", "value_template", "payload_available", "payload_not_available"}
PLATFORMS = {"sensor", "binary_sensor", "button", "switch", "text", "select", "number", "update", "device_tracker"}


def full(key: str) -> str:
    return ABBREVIATIONS.get(key, key)


def expanded(block: dict[str, Any]) -> dict[str, Any]:
    return {full(k): v for k, v in block.items()}


def check_availability(entries: Any) -> list[str]:
    problems = []
    if not isinstance(entries, list) or not entries:
        return ["availability must be a non-empty list"]
    for entry in entries:
        keys = {full(k) for k in entry}
        if "topic" not in keys:
            problems.append(f"availability entry without a topic: {entry}")
        problems += [f"availability key {k!r} is not documented" for k in keys - AVAILABILITY_KEYS]
    return problems


def problems(payload: dict[str, Any]) -> list[str]:
    """Everything that HA's documented schema refuses in one device discovery payload."""
    root = expanded(payload)
    found = [f"root key {k!r} is not documented" for k in set(root) - ROOT_KEYS]
    device, origin, components = root.get("device"), root.get("origin"), root.get("components")
    if not isinstance(device, dict):
        return found + ["the mandatory device block (dev) is missing"]
    if not isinstance(origin, dict):
        return found + ["the mandatory origin block (o) is missing"]
    if not isinstance(components, dict) or not components:
        return found + ["no components (cmps)"]
    dev = expanded(device)
    found += [f"device key {k!r} is not documented" for k in set(dev) - DEVICE_KEYS]
    if not dev.get("identifiers") and not dev.get("connections"):
        found.append("the device has neither identifiers nor connections")
    for conn in dev.get("connections", []):
        if not (isinstance(conn, list) and len(conn) == 2 and all(isinstance(x, str) for x in conn)):
            found.append(f"connection {conn!r} is not a [type, value] pair")
    org = expanded(origin)
    found += [f"origin key {k!r} is not documented" for k in set(org) - ORIGIN_KEYS]
    if not org.get("name"):
        found.append("the origin has no name")
    if "availability" in root:
        found += check_availability(root["availability"])
    for cid, component in components.items():
        comp = expanded(component)
        platform = comp.get("platform")
        if platform not in PLATFORMS:
            found.append(f"{cid}: platform {platform!r} unknown or missing")
            continue
        if set(comp) == {"platform"}:
            continue  # a removal
        found += [f"{cid}: key {k!r} is not documented" for k in set(comp) - COMPONENT_KEYS]
        if not comp.get("unique_id"):
            found.append(f"{cid}: no unique_id")
        if platform in ("sensor", "binary_sensor") and not (comp.get("state_topic") or root.get("state_topic")):
            found.append(f"{cid}: a {platform} needs a state topic")
        if platform == "button" and not comp.get("command_topic"):
            found.append(f"{cid}: a button needs a command topic")
        if "availability" in comp:
            found += check_availability(comp["availability"])
    return found


def unique_ids(payload: dict[str, Any]) -> list[str]:
    return [expanded(c)["unique_id"] for c in expanded(payload)["components"].values() if "unique_id" in expanded(c)]
