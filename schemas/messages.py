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
PUBLIC_KEY_PATTERN = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
"""Standard padded base64 (RFC 4648 section 4) of a raw 32-byte Ed25519 public key: 44 characters."""
ITEM_KEY_PATTERN = r"^(ipv4|qos|igmp|port_mapping:(tcp|udp)/[1-9][0-9]{0,4})$"
"""`item_key`: the item's kind, and for a port mapping its protocol and external port."""


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
    name: Annotated[str, Field(min_length=1, max_length=32, description="The OS name of the interface (`eth0`).")]
    mac: MacAddress | None = Field(None, description="Its MAC address, lower-case hex with colons; null if it has none.")
    up: bool = Field(True, description="Whether the link is up.")
    addresses: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=64,
        description="Addresses now on the interface in CIDR notation, e.g. `192.168.1.20/24`, `fe80::1/64`.")


class DeviceInfo(Model):
    """What a device is and has: body of `register` and `info`."""

    device_id: DeviceId = Field(description="The device id: also the MQTT client id and the `{id}` of its topics.")
    device_type: Annotated[str, Field(min_length=1, max_length=32, description=(
        "What the device is: iptv-stb, nas, media-player, game-console, smart-speaker, camera, generic, "
        "...; picks the policy profile."))]
    model: Annotated[str, Field(max_length=128, description="The maker's model name, for people.")] = ""
    maker: Annotated[str, Field(max_length=64, description=(
        "Who made the device: with `model`, the key of its equipment profile on the cloud's service server."))] = ""
    hostname: Annotated[str, Field(max_length=253, description="The device's host name.")] = ""
    agent_version: Annotated[str, Field(max_length=32, description="The agent's software version.")] = ""
    capabilities: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=64,
        description="Free-form capability tags (e.g. `executor:iproute2`), for people and policy.")
    interfaces: list[Interface] = Field(default_factory=list, max_length=64,
                                        description="Every network interface of the device and its addresses.")
    applied_version: Annotated[int, Field(ge=0, description=(
        "The version of the last config the agent applied (0: none). The configurator numbers the next "
        "config above it."))] = 0
    public_key: str | None = Field(None, description=(
        "The device's Ed25519 public key: standard padded base64 of the raw 32 bytes. Required in `register`."),
        json_schema_extra={"pattern": PUBLIC_KEY_PATTERN})
    needs_credentials: bool = Field(False, description=(
        "True when the agent holds no working broker account (first start, or its login was refused): "
        "the accepting `register.reply` then carries `credentials`."))


# --- registration ---------------------------------------------------------------------------

class RegisterStatus(StrEnum):
    ACCEPTED = "accepted"
    PENDING = "pending"
    REJECTED = "rejected"


class Credentials(Model):
    """A broker account for the device: it logs in again with it under the same client id."""

    username: str = Field(description="The MQTT username: the device id.")
    password: str = Field(description="The MQTT password. Keep it secret; it is shown once.")


class RegisterReply(Model):
    re: str = Field(description="The `id` of the `register` this answers.")
    status: RegisterStatus = Field(description=(
        "accepted: enrolled, its config follows; pending: waiting for the owner (approval or pairing "
        "code); rejected: refused, `reason` says why."))
    reason: str = Field("", description="Why, for pending and rejected (and a planning error when accepted).")
    config_version: Annotated[int, Field(ge=0, description="The device's current config version (0: none yet).")] = 0
    credentials: Credentials | None = Field(None, description=(
        "A broker account, when the device needs one: only in an accepted reply."))


# --- configuration --------------------------------------------------------------------------

class Target(StrEnum):
    """Who carries out an item: the device's agent or the configurator's gateway driver."""

    AGENT = "agent"
    GATEWAY = "gateway"


_KIND = "The item's kind; its key in results is `item_key`."
_TARGET = "Who carries it out: the agent applies `agent` items and reports them; `gateway` items are the gateway's."


class Ipv4Item(Model):
    kind: Literal["ipv4"] = Field("ipv4", description=_KIND)
    target: Target = Field(Target.AGENT, description=_TARGET)
    interface: str = Field(description="The interface to configure, as the device reported it.")
    mac: MacAddress | None = Field(None, description="That interface's MAC, when the device reported one.")
    address: IPv4Address = Field(description="The static IPv4 address to set (reserved for the device).")
    prefix_len: Annotated[int, Field(ge=0, le=32, description="The prefix length of the LAN, e.g. 24.")]
    gateway: IPv4Address = Field(description="The default gateway.")
    dns: list[IPvAnyAddress] = Field(default_factory=list, max_length=8, description="DNS servers, in order.")


class QosItem(Model):
    kind: Literal["qos"] = Field("qos", description=_KIND)
    target: Target = Field(Target.GATEWAY, description=_TARGET)
    qos_class: QosClass = Field(description="The device's traffic class.")
    dscp: Annotated[int, Field(ge=0, le=63, description="The DSCP code point the gateway marks its traffic with.")]


class PortMappingItem(Model):
    kind: Literal["port_mapping"] = Field("port_mapping", description=_KIND)
    target: Target = Field(Target.GATEWAY, description=_TARGET)
    protocol: Literal["tcp", "udp"] = Field(description="The transport protocol.")
    external_port: Port = Field(description="The port opened on the WAN side.")
    internal_port: Port = Field(description="The device's port it leads to.")
    description: Annotated[str, Field(max_length=64, description="What the mapping is for, for people.")] = ""


class IgmpItem(Model):
    kind: Literal["igmp"] = Field("igmp", description=_KIND)
    target: Target = Field(Target.GATEWAY, description=_TARGET)
    enabled: bool = Field(description="Whether the gateway's IGMP proxy serves the device (IPTV multicast).")


ConfigItem = Annotated[Ipv4Item | QosItem | PortMappingItem | IgmpItem, Field(discriminator="kind")]


def item_key(item: Ipv4Item | QosItem | PortMappingItem | IgmpItem) -> str:
    """Stable name of an item, used to match results to requests."""
    if isinstance(item, PortMappingItem):
        return f"port_mapping:{item.protocol}/{item.external_port}"
    return item.kind


class Config(Model):
    """The configuration request: everything the device should have, and who applies each item."""

    device_id: DeviceId = Field(description="The device this config is for: the `{id}` of its topic.")
    version: Annotated[int, Field(ge=1, description=(
        "Strictly increasing per device; an agent ignores a version at or below the one it applied."))]
    epoch: Annotated[int, Field(ge=0, description=(
        "The epoch of the configurator that made it; an agent ignores a config of an epoch older than "
        "the one of the config it applied."))] = 0
    profile: str = Field(description="The policy profile that made it (e.g. `iptv-stb`), for people.")
    items: list[ConfigItem] = Field(max_length=256, description="Every setting the device should have.")


class ItemStatus(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    FAILED = "failed"
    UNSUPPORTED = "unsupported"
    ROLLED_BACK = "rolled_back"


class ItemResult(Model):
    item: str = Field(description="The item's key (`item_key`): ipv4, qos, igmp or port_mapping:{proto}/{port}.",
                      json_schema_extra={"pattern": ITEM_KEY_PATTERN})
    status: ItemStatus = Field(description=(
        "applied: changed now; unchanged: already so; failed; unsupported: this agent cannot do it; "
        "rolled_back: applied, then undone because it lost the broker."))
    detail: Annotated[str, Field(max_length=1024, description="What happened, for people (required when not fine).")] = ""


class ResultStatus(StrEnum):
    OK = "ok"
    PARTIAL = "partial"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class ConfigResult(Model):
    re: str = Field(description="The `id` of the `config` message this answers.")
    version: Annotated[int, Field(ge=1, description="That config's version.")]
    status: ResultStatus = Field(description=(
        "Follows from the items: any rolled_back -> rolled_back; all applied or unchanged (or no agent "
        "item) -> ok; none -> failed; else partial."))
    items: list[ItemResult] = Field(max_length=256, description=(
        "Exactly one result per agent item of that config, none for gateway items."))
    in_force: dict[str, Any] = Field(default_factory=dict, description=(
        "The settings now in force on the device, by item key (e.g. `ipv4`: its address, prefix_len, "
        "gateway, dns): what reconciliation compares with the config."))


# --- presence, state, rpc, events -----------------------------------------------------------

class ConfiguratorState(Model):
    state: Literal["online", "offline"] = Field(description="online, or offline (also its will).")
    configurator_id: str = Field(description="The configurator's id: the `from` of its messages.")
    epoch: Annotated[int, Field(ge=0, description=(
        "Raised each time a configurator takes charge; an agent registers again on every new epoch."))]
    public_key: str | None = Field(None, description=(
        "The configurator's Ed25519 key, standard padded base64 of the raw 32 bytes; an agent pinned "
        "to another key ignores this message."), json_schema_extra={"pattern": PUBLIC_KEY_PATTERN})


class DeviceStatus(Model):
    """Payload of `device/{id}/status`: a bare object (not an envelope) so it can be a will."""

    state: Literal["online", "offline"] = Field(description="online when connected; offline as its will and before a clean stop.")


class Rpc(Model):
    method: Literal["ping", "refresh", "state"] = Field(description=(
        "ping: answer; refresh: send `info` now; state: answer with what the agent holds."))
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of the method (none in v1).")


class RpcReply(Model):
    re: str = Field(description="The `id` of the `rpc` this answers.")
    ok: bool = Field(description="Whether the method succeeded.")
    result: dict[str, Any] = Field(default_factory=dict, description=(
        "What the method returns: {} for ping and refresh; for state at least applied_version and in_force."))
    error: str = Field("", description="Why it failed, when ok is false.")


class Command(Model):
    """An operator's request to the configurator (the `homenet devices ...` commands)."""

    op: Literal["forget", "approve", "reject", "pair", "reset", "refresh", "replace", "user.add",
                "user.remove"] = Field(
        description="The operation (the `homenet devices ...` and `homenet users ...` commands).")
    device_id: DeviceId | None = Field(
        None, description="The device, for forget, approve, reject, reset, refresh and replace.")
    predecessor: DeviceId | None = Field(
        None, description="For `replace`: the forgotten device of the same model whose settings `device_id` takes.")
    code: Annotated[str, Field(max_length=16, description="The pairing code the device shows, for `pair`.")] = ""
    user: DeviceId | None = Field(None, description="The operator account, for `user.add` and `user.remove`.")
    read_only: bool = Field(True, description="For `user.add`: a read-only account (else an operator).")


class CommandReply(Model):
    re: str = Field(description="The `id` of the `command` this answers.")
    ok: bool = Field(description="Whether it was done.")
    error: str = Field("", description="Why not, when ok is false.")
    result: dict[str, Any] = Field(default_factory=dict, description="What was done (e.g. a new account's password).")


_DEVICE = "The device it is for."


class Reservation(Model):
    device_id: DeviceId = Field(description=_DEVICE)
    mac: MacAddress | None = Field(description="The MAC the DHCP reservation is bound to, if known.")
    address: IPv4Address = Field(description="The reserved address.")


class PortMapping(Model):
    device_id: DeviceId = Field(description=_DEVICE)
    protocol: Literal["tcp", "udp"] = Field(description="The transport protocol.")
    external_port: Port = Field(description="The port opened on the WAN side.")
    internal_address: IPv4Address = Field(description="The device address it forwards to.")
    internal_port: Port = Field(description="The device port it forwards to.")
    description: str = Field("", description="What it is for, for people.")


class QosRule(Model):
    device_id: DeviceId = Field(description=_DEVICE)
    address: IPv4Address = Field(description="The device address whose traffic is marked.")
    qos_class: QosClass = Field(description="The traffic class.")
    dscp: int = Field(description="The DSCP code point set.")


class GatewayState(Model):
    """What a gateway driver has set, all devices together (in the configurator; on the wire it is
    split into `gateway.state` and one `gateway.device` per device: configurator/gatewaystate.py)."""

    driver: str = Field(description="The gateway driver: memory, linux or upnp.")
    lan: str = Field(description="The LAN subnet in CIDR notation.")
    reservations: list[Reservation] = Field(default_factory=list, description="DHCP reservations set.")
    port_mappings: list[PortMapping] = Field(default_factory=list, description="Port forwards set.")
    qos: list[QosRule] = Field(default_factory=list, description="Traffic marking rules set.")
    igmp_proxy: bool = Field(False, description="Whether the IGMP proxy runs.")
    igmp_devices: list[DeviceId] = Field(default_factory=list, description="Devices the IGMP proxy serves.")


class GatewaySummary(Model):
    """Body of `gateway/state`: the gateway as a whole; each device's part is on `gateway/device/{id}`."""

    driver: str = Field(description="The gateway driver: memory, linux or upnp.")
    lan: str = Field(description="The LAN subnet in CIDR notation.")
    igmp_proxy: bool = Field(False, description="Whether the IGMP proxy runs.")
    devices: Annotated[int, Field(ge=0, description="How many devices have something set on the gateway (each "
                                                    "on its own `gateway/device/{id}`).")] = 0


class GatewayDevice(Model):
    """Body of `gateway/device/{id}`: what the gateway has set for one device."""

    device_id: DeviceId = Field(description=_DEVICE)
    reservation: Reservation | None = Field(None, description="Its DHCP reservation, if any.")
    port_mappings: list[PortMapping] = Field(default_factory=list, description="Port forwards to it.")
    qos: list[QosRule] = Field(default_factory=list, description="Marking rules for its traffic.")
    igmp: bool = Field(False, description="Whether the IGMP proxy serves it.")


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Event(Model):
    event: str = Field(description="What happened, dotted: device.registered, config.applied, message.rejected, ...")
    severity: Severity = Field(Severity.INFO, description="info, warning or error.")
    device_id: str | None = Field(None, description="The device concerned, if any.")
    topic: str | None = Field(None, description="For a refused message: the topic it came on.")
    sender: str | None = Field(None, description="For a refused message: who sent it.")
    reason: str = Field("", description="Why, in words: a refused message's reason names what was wrong.")
    detail: dict[str, Any] = Field(default_factory=dict, description="More, by event (integers and strings only).")


BODIES: dict[str, type[Model]] = {
    "configurator.state": ConfiguratorState,
    "register": DeviceInfo,
    "register.reply": RegisterReply,
    "config": Config,
    "config.result": ConfigResult,
    "info": DeviceInfo,
    "rpc": Rpc,
    "rpc.reply": RpcReply,
    "gateway.state": GatewaySummary,
    "gateway.device": GatewayDevice,
    "command": Command,
    "command.reply": CommandReply,
    "event": Event,
}
