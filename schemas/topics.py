"""Topic builders and parsers for wire contract v1.

Device ids become one topic level, so they are restricted to a safe alphabet: no `/`, no
wildcards, no leading `$`, nothing a shell or `mosquitto_sub -t` would mangle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_ROOT = "homenet/v1"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)

# channel (path after device/{id}/) -> (kind carried, retained)
DEVICE_CHANNELS: dict[str, tuple[str, bool]] = {
    "register": ("register", False),
    "register/reply": ("register.reply", False),
    "config": ("config", True),
    "config/result": ("config.result", True),
    "info": ("info", True),
    "status": ("status", True),
    "rpc": ("rpc", False),
    "rpc/reply": ("rpc.reply", False),
}


class TopicError(ValueError):
    """A topic or device id that is not part of the contract."""


def check_device_id(device_id: str) -> str:
    """Return the id if it is a safe single topic level, else raise TopicError."""
    # fullmatch, not match: `$` would also match before a trailing newline ("dev\n").
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise TopicError(
            f"device id {device_id!r} is not a safe topic level "
            "(1-63 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
        )
    return device_id


@dataclass(frozen=True)
class DeviceTopic:
    """A parsed `device/{id}/{channel}` topic."""

    device_id: str
    channel: str

    @property
    def kind(self) -> str:
        return DEVICE_CHANNELS[self.channel][0]


@dataclass(frozen=True)
class Topics:
    """Every topic of the contract under one configurable root."""

    root: str = DEFAULT_ROOT
    discovery: str = "homeassistant"
    """Home Assistant's MQTT discovery prefix (outside the root; the broker's ACL follows it)."""

    @property
    def configurator_state(self) -> str:
        return f"{self.root}/configurator/state"

    @property
    def command(self) -> str:
        return f"{self.root}/configurator/command"

    @property
    def command_reply(self) -> str:
        return f"{self.root}/configurator/command/reply"

    @property
    def gateway_state(self) -> str:
        return f"{self.root}/gateway/state"

    def gateway_device(self, device_id: str) -> str:
        """What the gateway has set for one device (retained)."""
        return f"{self.root}/gateway/device/{check_device_id(device_id)}"

    @property
    def gateway_devices(self) -> str:
        """Subscription filter for every device's `gateway_device` topic."""
        return f"{self.root}/gateway/device/+"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def all(self) -> str:
        return f"{self.root}/#"

    def device(self, device_id: str, channel: str) -> str:
        if channel not in DEVICE_CHANNELS:
            raise TopicError(f"unknown device channel {channel!r}")
        return f"{self.root}/device/{check_device_id(device_id)}/{channel}"

    def device_filter(self, channel: str) -> str:
        """Subscription filter for one channel of every device."""
        if channel not in DEVICE_CHANNELS:
            raise TopicError(f"unknown device channel {channel!r}")
        return f"{self.root}/device/+/{channel}"

    def parse_device(self, topic: str) -> DeviceTopic:
        """Split a device topic; raise TopicError for anything outside the contract."""
        prefix = f"{self.root}/device/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not under {prefix}")
        device_id, _, channel = topic[len(prefix):].partition("/")
        check_device_id(device_id)
        if channel not in DEVICE_CHANNELS:
            raise TopicError(f"topic {topic!r} has unknown channel {channel!r}")
        return DeviceTopic(device_id, channel)
