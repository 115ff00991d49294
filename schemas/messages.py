"""Bodies of every message kind in wire contract v1 (pydantic v2 models).

Extra fields are refused (`extra="forbid"`): a typo in a field name is an error that names the
field, not a silently ignored setting.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from ipaddress import IPv4Address

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress

from .topics import DEVICE_ID_PATTERN

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
MacAddress = Annotated[str, Field(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QosClass(StrEnum):
    """Traffic classes and the DSCP code point the gateway marks them with."""

    VOICE = "voice"  # EF
    VIDEO = "video"  # CS4
    INTERACTIVE = "interactive"  # AF41
    BEST_EFFORT = "best-effort"  # CS0
    BULK = "bulk"  # CS1


DSCP: dict[QosClass, int] = {
    QosClass.VOICE: 46,
    QosClass.VIDEO: 32,
    QosClass.INTERACTIVE: 34,
    QosClass.BEST_EFFORT: 0,
    QosClass.BULK: 8,
}


# --- device info (register, info) -----------------------------------------------------------

class Interface(Model):
    name: Annotated[str, Field(min_length=1, max_length=32)]
    mac: MacAddress | None = None
    up: bool = True
    addresses: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=64)
    """Addresses in CIDR notation, e.g. `192.168.1.20/24`, `fe80::1/64`."""


class DeviceInfo(Model):
    """What a device is and has: body of `register` and `info`."""

    device_id: DeviceId
    device_type: Annotated[str, Field(min_length=1, max_length=32)]
    model: Annotated[str, Field(max_length=128)] = ""
    maker: Annotated[str, Field(max_length=64)] = ""
    """Who made the device: with `model`, the key of its equipment profile on the service server."""
    hostname: Annotated[str, Field(max_length=253)] = ""
    agent_version: Annotated[str, Field(max_length=32)] = ""
    capabilities: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=64)
    interfaces: list[Interface] = Field(default_factory=list, max_length=64)
    applied_version: Annotated[int, Field(ge=0)] = 0
    public_key: str | None = None
    needs_credentials: bool = False
    """The agent holds no broker account yet (or lost it): the accepting reply carries one."""


# --- registration ---------------------------------------------------------------------------

class RegisterStatus(StrEnum):
    ACCEPTED = "accepted"
    PENDING = "pending"
    REJECTED = "rejected"


class RegisterReply(Model):
    re: str
    status: RegisterStatus
    reason: str = ""
    config_version: Annotated[int, Field(ge=0)] = 0
    credentials: dict[str, str] | None = None


# --- configuration --------------------------------------------------------------------------

class Target(StrEnum):
    """Who carries out an item: the device's agent or the configurator's gateway driver."""

    AGENT = "agent"
    GATEWAY = "gateway"


class Ipv4Item(Model):
    kind: Literal["ipv4"] = "ipv4"
    target: Target = Target.AGENT
    interface: str
    mac: MacAddress | None = None
    address: IPv4Address
    prefix_len: Annotated[int, Field(ge=0, le=32)]
    gateway: IPv4Address
    dns: list[IPvAnyAddress] = Field(default_factory=list, max_length=8)


class QosItem(Model):
    kind: Literal["qos"] = "qos"
    target: Target = Target.GATEWAY
    qos_class: QosClass
    dscp: Annotated[int, Field(ge=0, le=63)]


class PortMappingItem(Model):
    kind: Literal["port_mapping"] = "port_mapping"
    target: Target = Target.GATEWAY
    protocol: Literal["tcp", "udp"]
    external_port: Port
    internal_port: Port
    description: Annotated[str, Field(max_length=64)] = ""


class IgmpItem(Model):
    kind: Literal["igmp"] = "igmp"
    target: Target = Target.GATEWAY
    enabled: bool


ConfigItem = Annotated[Ipv4Item | QosItem | PortMappingItem | IgmpItem, Field(discriminator="kind")]


def item_key(item: Ipv4Item | QosItem | PortMappingItem | IgmpItem) -> str:
    """Stable name of an item, used to match results to requests."""
    if isinstance(item, PortMappingItem):
        return f"port_mapping:{item.protocol}/{item.external_port}"
    return item.kind


class Config(Model):
    """The configuration request: everything the device should have, and who applies each item."""

    device_id: DeviceId
    version: Annotated[int, Field(ge=1)]
    epoch: Annotated[int, Field(ge=0)] = 0
    profile: str
    items: list[ConfigItem] = Field(max_length=256)


class ItemStatus(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    FAILED = "failed"
    UNSUPPORTED = "unsupported"
    ROLLED_BACK = "rolled_back"


class ItemResult(Model):
    item: str
    status: ItemStatus
    detail: Annotated[str, Field(max_length=1024)] = ""


class ResultStatus(StrEnum):
    OK = "ok"
    PARTIAL = "partial"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class ConfigResult(Model):
    re: str
    version: Annotated[int, Field(ge=1)]
    status: ResultStatus
    items: list[ItemResult] = Field(max_length=256)
    in_force: dict[str, Any] = Field(default_factory=dict)


# --- presence, state, rpc, events -----------------------------------------------------------

class ConfiguratorState(Model):
    state: Literal["online", "offline"]
    configurator_id: str
    epoch: Annotated[int, Field(ge=0)]
    public_key: str | None = None


class DeviceStatus(Model):
    """Payload of `device/{id}/status`: a bare object (not an envelope) so it can be a will."""

    state: Literal["online", "offline"]


class Rpc(Model):
    method: Literal["ping", "refresh", "state"]
    params: dict[str, Any] = Field(default_factory=dict)


class RpcReply(Model):
    re: str
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: str = ""


class Command(Model):
    """An operator's request to the configurator (the `homenet devices ...` commands)."""

    op: Literal["forget", "approve", "reject", "pair", "reset", "user.add", "user.remove"]
    device_id: DeviceId | None = None
    code: Annotated[str, Field(max_length=16)] = ""
    """The pairing code, for `pair`."""
    user: DeviceId | None = None
    """The operator account, for `user.add` and `user.remove`."""
    read_only: bool = True


class CommandReply(Model):
    re: str
    ok: bool
    error: str = ""
    result: dict[str, Any] = Field(default_factory=dict)


class Reservation(Model):
    device_id: DeviceId
    mac: MacAddress | None
    address: IPv4Address


class PortMapping(Model):
    device_id: DeviceId
    protocol: Literal["tcp", "udp"]
    external_port: Port
    internal_address: IPv4Address
    internal_port: Port
    description: str = ""


class QosRule(Model):
    device_id: DeviceId
    address: IPv4Address
    qos_class: QosClass
    dscp: int


class GatewayState(Model):
    driver: str
    lan: str
    reservations: list[Reservation] = Field(default_factory=list)
    port_mappings: list[PortMapping] = Field(default_factory=list)
    qos: list[QosRule] = Field(default_factory=list)
    igmp_proxy: bool = False
    igmp_devices: list[DeviceId] = Field(default_factory=list)


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Event(Model):
    event: str
    severity: Severity = Severity.INFO
    device_id: str | None = None
    topic: str | None = None
    sender: str | None = None
    reason: str = ""
    detail: dict[str, Any] = Field(default_factory=dict)


BODIES: dict[str, type[Model]] = {
    "configurator.state": ConfiguratorState,
    "register": DeviceInfo,
    "register.reply": RegisterReply,
    "config": Config,
    "config.result": ConfigResult,
    "info": DeviceInfo,
    "rpc": Rpc,
    "rpc.reply": RpcReply,
    "gateway.state": GatewayState,
    "command": Command,
    "command.reply": CommandReply,
    "event": Event,
}
