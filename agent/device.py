"""This device as the agent knows it, before any broker is involved."""

from __future__ import annotations

from dataclasses import dataclass

from homenet import __version__
from homenet.keys import KeyPair, b64
from homenet.schemas.messages import DeviceInfo
from homenet.settings import AgentSettings

from .collector import Collector
from .executor import Executor
from .state import StateFile
from .trust import PinnedKey


@dataclass(frozen=True)
class Device:
    settings: AgentSettings
    device_id: str
    state: StateFile
    collector: Collector
    executor: Executor
    key: KeyPair | None
    """This device's identity: bound to its id at first registration. None only when opened
    read-only before the agent first ran (`homenet-agent info`)."""
    pinned: PinnedKey
    """The configurator key it trusts."""

    def info(self) -> DeviceInfo:
        """The device info the agent registers, and re-sends when it changes."""
        return DeviceInfo(
            device_id=self.device_id, device_type=self.settings.device_type, model=self.settings.model,
            maker=self.settings.maker, hostname=self.collector.hostname(), agent_version=__version__,
            capabilities=[f"executor:{self.executor.name}"], interfaces=self.collector.interfaces(),
            applied_version=self.state.state.applied_version, public_key=b64(self.key.public) if self.key else None,
            needs_credentials=self.state.state.username is None)
