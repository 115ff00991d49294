"""The gateway's state on the wire: a summary on `gateway/state` and one retained message per
device on `gateway/device/{id}` (docs/protocol.md, gateway.state and gateway.device).

One message listing every device grew with the home (307 KB at 5,000 devices, over both
brokers' 256 KiB limit, so it was dropped); split, no message grows with the number of devices,
and a change publishes only the devices it touched. `Published` remembers what went out and
gives the changes; `merge` puts the parts together again for a reader.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from homenet.schemas.messages import GatewayDevice, GatewayState, GatewaySummary


def split(state: GatewayState) -> tuple[GatewaySummary, dict[str, GatewayDevice]]:
    parts: dict[str, dict] = {}

    def part(device_id: str) -> dict:
        return parts.setdefault(device_id, {"device_id": device_id, "port_mappings": [], "qos": []})

    for r in state.reservations:
        part(r.device_id)["reservation"] = r
    for m in state.port_mappings:
        part(m.device_id)["port_mappings"].append(m)
    for q in state.qos:
        part(q.device_id)["qos"].append(q)
    for device_id in state.igmp_devices:
        part(device_id)["igmp"] = True
    devices = {d: GatewayDevice(**p) for d, p in sorted(parts.items())}
    return GatewaySummary(driver=state.driver, lan=state.lan, igmp_proxy=state.igmp_proxy,
                          devices=len(devices)), devices


def merge(summary: GatewaySummary, devices: Iterable[GatewayDevice]) -> GatewayState:
    """The whole state from its parts, in `gateway_state`'s order."""
    devices = list(devices)
    return GatewayState(
        driver=summary.driver, lan=summary.lan, igmp_proxy=summary.igmp_proxy,
        reservations=sorted((d.reservation for d in devices if d.reservation), key=lambda r: r.address),
        port_mappings=sorted((m for d in devices for m in d.port_mappings), key=lambda m: (m.protocol, m.external_port)),
        qos=sorted((q for d in devices for q in d.qos), key=lambda q: q.address),
        igmp_devices=sorted(d.device_id for d in devices if d.igmp))


class Published:
    """What was last published, to send only what changed (thread-safe: drivers report from
    their own threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._summary: GatewaySummary | None = None
        self._devices: dict[str, GatewayDevice] = {}

    def forget(self) -> None:
        """The broker may have lost every retained message (a reconnect): send everything again."""
        with self._lock:
            self._summary, self._devices = None, {}

    def changes(self, state: GatewayState) -> tuple[GatewaySummary | None, dict[str, GatewayDevice | None]]:
        """The summary if it changed, and each device whose part changed (None: it has none any more)."""
        summary, devices = split(state)
        with self._lock:
            changed: dict[str, GatewayDevice | None] = {d: None for d in self._devices.keys() - devices.keys()}
            changed.update({d: p for d, p in devices.items() if self._devices.get(d) != p})
            new_summary = summary if summary != self._summary else None
            self._summary, self._devices = summary, devices
        return new_summary, changed
