"""Assembling an agent from settings: identity, state, collector, executor."""

from __future__ import annotations

import re

from homenet.settings import AgentSettings

from .collector import Collector, LinuxCollector
from .executor import SimulatedCollector, SimulatedExecutor
from .service import Agent
from .state import StateFile


def derive_device_id(collector: Collector) -> str:
    """`hn-<mac>` of the first real interface, stable across reinstalls; else the hostname."""
    for iface in collector.interfaces():
        if iface.mac and iface.mac != "00:00:00:00:00:00":
            return "hn-" + iface.mac.replace(":", "")
    return re.sub(r"[^A-Za-z0-9._-]", "-", collector.hostname())[:63].strip("-._") or "device"


def build(settings: AgentSettings) -> Agent:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    state = StateFile(settings.data_dir)
    executor = SimulatedExecutor(settings.data_dir)
    device_id = settings.device_id or state.state.device_id or derive_device_id(LinuxCollector())
    if state.state.device_id != device_id:
        state.update(device_id=device_id)
    collector: Collector = (SimulatedCollector(device_id, executor) if settings.collector == "simulated"
                            else LinuxCollector())
    return Agent(settings, device_id, state, collector, executor)
