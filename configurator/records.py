"""What the configuration database keeps per device (the store's schema)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from homenet.schemas.messages import Config, ConfigResult, DeviceInfo, Ipv4Item, ItemResult

from .lifecycle import State


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class DeviceRecord(BaseModel):
    """One device, written as one document so that every update is all-or-nothing."""

    model_config = ConfigDict(extra="forbid")

    device_id: str
    state: State = State.NEW
    online: bool = False
    info: DeviceInfo
    profile: str = ""
    config: Config | None = None
    config_payload: str | None = None
    """The exact retained `config` payload, republished byte for byte after a broker restart."""
    result: ConfigResult | None = None
    gateway: list[ItemResult] = Field(default_factory=list)
    """What the gateway driver last reported of this device's gateway items (the agent's own
    items are in `result`): an item the gateway failed to put in force shows here, with why."""
    error: str = ""
    public_key: str | None = None
    """The Ed25519 key bound to this device id at its first registration (base64)."""
    register_id: str = ""
    """Id of the last `register`, so an approval later can answer it."""
    last_seq: int = 0
    first_seen: str = Field(default_factory=now)
    updated: str = Field(default_factory=now)

    @property
    def version(self) -> int:
        return self.config.version if self.config else 0

    @property
    def address(self) -> str:
        if self.config:
            for item in self.config.items:
                if isinstance(item, Ipv4Item):
                    return str(item.address)
        return ""

    def to_doc(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
