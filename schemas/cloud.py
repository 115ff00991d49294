"""Bodies of the messages between a home's configurator and the operator's cloud servers.

They travel in the home contract's envelope, signed the same way (`encode`/`decode` with
`bodies=CLOUD_BODIES`), as HTTP request and reply bodies instead of MQTT payloads: the home is
known by its configurator's key, the cloud by its own (docs/cloud.md).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field

from .messages import DeviceId, Model, Port, QosClass

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._+-]*$")]
"""A maker, model, region or rule name: printable, no slashes (they appear in URLs)."""
ReportId = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class Hello(Model):
    """First words of a home: binds its id to the key that signs this request (trust on first use)."""

    public_key: Annotated[str, Field(min_length=40, max_length=64)]
    region: Annotated[str, Field(max_length=64)] = ""


class PortNeed(Model):
    protocol: Literal["tcp", "udp"]
    port: Port
    description: Annotated[str, Field(max_length=64)] = ""


class EquipmentProfile(Model):
    """What one maker's model needs from the network: richer than the built-in device types."""

    maker: Name
    model: Name
    name: Annotated[str, Field(min_length=1, max_length=32)]
    """Profile name the configurator records (shown in `devices show`)."""
    qos: QosClass = QosClass.BEST_EFFORT
    igmp: bool = False
    ports: list[PortNeed] = Field(default_factory=list, max_length=16)
    stable_address: bool = True
    """The model must keep its address (homenet reserves every address, so it always does)."""
    av: bool = False
    """Audio/video: the quality check also measures the path's latency and loss."""
    ttl: Annotated[int, Field(ge=60, le=30 * 86400)] = 86400
    """Seconds a home may keep this profile before asking again."""


class ProfileQuery(Model):
    maker: Annotated[str, Field(max_length=64)]
    model: Annotated[str, Field(max_length=64)]


class ReportKind(StrEnum):
    INVENTORY = "inventory"
    FAILURE = "failure"


class Report(Model):
    """One entry of the home's outbox; `report_id` makes its delivery exactly once."""

    report_id: ReportId
    kind: ReportKind
    device_id: DeviceId | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Backup(Model):
    """The home's configuration: device records and the configurator's meta, never secrets."""

    version: Annotated[int, Field(ge=1)]
    devices: list[dict[str, Any]] = Field(default_factory=list, max_length=5000)
    meta: dict[str, Any] = Field(default_factory=dict)


class BackupQuery(Model):
    pass


class FailurePoll(Model):
    """Long-poll: failures that concern this home and changed after `after`, waiting up to `wait` s."""

    after: Annotated[int, Field(ge=0)] = 0
    wait: Annotated[int, Field(ge=0, le=30)] = 20


class Service(StrEnum):
    IPTV = "iptv"
    DNS = "dns"
    INTERNET = "internet"
    VOICE = "voice"


class FailureNotice(Model):
    """A service failure published by the operator, for a region or a list of homes."""

    failure_id: Annotated[int, Field(ge=1)]
    rev: Annotated[int, Field(ge=1)]
    service: Service
    summary: Annotated[str, Field(max_length=256)]
    active: bool = True


class PortCheck(Model):
    protocol: Literal["tcp"] = "tcp"
    port: Port


class QualityRequest(Model):
    """Ask the quality check server to connect in to this home's WAN address."""

    device_id: DeviceId
    ports: list[PortCheck] = Field(min_length=1, max_length=8)
    samples: Annotated[int, Field(ge=1, le=20)] = 1
    """Connections per port; above 1 the verdict carries latency and loss (AV devices)."""


class DiagnosisBundle(Model):
    """What the configurator knows about one failure; never a secret (no keys, no passwords)."""

    bundle_id: ReportId
    device_id: DeviceId
    trigger: Literal["config.failed", "config.rolled_back", "quality.failed", "device.unplanned"]
    device: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    gateway: dict[str, Any] = Field(default_factory=dict)
    """The gateway's state for this device: `missing` lists the desired items it lacks."""
    events: list[dict[str, Any]] = Field(default_factory=list, max_length=100)
    failures: list[int] = Field(default_factory=list, max_length=100)
    """Service failures active at the home when the bundle was made."""


class CloudReply(Model):
    re: str
    ok: bool = True
    error: str = ""
    result: dict[str, Any] = Field(default_factory=dict)


CLOUD_BODIES: dict[str, type[Model]] = {
    "cloud.hello": Hello,
    "cloud.profile.get": ProfileQuery,
    "cloud.report": Report,
    "cloud.backup.put": Backup,
    "cloud.backup.get": BackupQuery,
    "cloud.failures.poll": FailurePoll,
    "cloud.quality.check": QualityRequest,
    "cloud.diagnosis": DiagnosisBundle,
    "cloud.reply": CloudReply,
}
