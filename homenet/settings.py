"""Settings of every homenet process: defaults, a TOML file, then command-line flags.

Models refuse unknown keys, so a typo in the file is an error naming the key, not a setting
silently ignored.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from homenet.mqtt import BrokerUrl

from homenet.schemas.topics import DEFAULT_ROOT, check_device_id


class SettingsError(Exception):
    """A settings file or flag that cannot be used; the text says which and why."""


def default_data_dir(role: str) -> Path:
    """$HOMENET_DATA_DIR, else /var/lib/homenet/ROLE for root, else the XDG data dir."""
    if env := os.environ.get("HOMENET_DATA_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/homenet") / role
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "homenet" / role


def _broker_url(url: str) -> str:
    BrokerUrl.parse(url)  # ValueError names what is wrong
    return url


BrokerUrlText = Annotated[str, AfterValidator(_broker_url)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _subnet(text: str) -> str:
    try:
        return str(ipaddress.IPv4Network(text))
    except ipaddress.NetmaskValueError as exc:
        raise ValueError(f"{text!r} is not an IPv4 subnet: {exc} (0-32, e.g. 192.168.1.0/24)") from None
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise ValueError(f"{text!r} has host bits set: the subnet is "
                             f"{ipaddress.IPv4Network(text, strict=False)}") from None
        raise ValueError(f"{text!r} is not an IPv4 subnet (e.g. 192.168.1.0/24)") from None


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address (e.g. 192.168.1.1)") from None


Subnet = Annotated[str, AfterValidator(_subnet)]
Ipv4Text = Annotated[str, AfterValidator(_ipv4)]


class LanSettings(Section):
    subnet: Subnet = "192.168.1.0/24"
    gateway: Ipv4Text = "192.168.1.1"
    pool_start: Ipv4Text = "192.168.1.100"
    pool_end: Ipv4Text = "192.168.1.199"
    dns: list[Ipv4Text] = Field(default_factory=list)

    @model_validator(mode="after")
    def _inside(self) -> LanSettings:
        """The gateway and the DHCP pool are in the subnet (the planner cannot work otherwise)."""
        subnet = ipaddress.IPv4Network(self.subnet)
        for name in ("gateway", "pool_start", "pool_end"):
            if ipaddress.IPv4Address(getattr(self, name)) not in subnet:
                raise ValueError(f"{name} {getattr(self, name)} is outside the subnet {subnet}")
        if ipaddress.IPv4Address(self.pool_start) > ipaddress.IPv4Address(self.pool_end):
            raise ValueError(f"the DHCP pool {self.pool_start}-{self.pool_end} is empty (pool_start above pool_end)")
        return self


def _bind(text: str) -> str:
    """`HOST:PORT` as amqtt binds it; users' `[v6]:PORT` is accepted and written `v6:PORT`
    (amqtt refuses brackets). `:::1883` is every IPv6 address, `0.0.0.0:1883` every IPv4 one."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "[" in host or "]" in host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. \"0.0.0.0:1883\", \":::1883\" or \"[::1]:1883\")")
    return f"{host}:{int(port)}"


Bind = Annotated[str, AfterValidator(_bind)]


class BrokerSettings(Section):
    engine: Literal["auto", "amqtt", "mosquitto"] = "amqtt"
    """What `homenet gateway run` serves MQTT with: the embedded amqtt (pure pip, the default),
    Debian's Mosquitto as its child process (broker/mosquitto.py), or `auto`: Mosquitto when it
    is installed, else amqtt. A gateway image with Mosquitto should say `auto`
    (docs/performance.md, "Broker engine")."""
    listeners: list[Bind] = Field(default_factory=lambda: ["0.0.0.0:1883", ":::1883"])
    """amqtt bind strings. `:::PORT` is IPv6 only (asyncio sets IPV6_V6ONLY), so IPv4 needs
    its own listener; amqtt refuses `[::]:PORT`."""
    max_payload: int = Field(default=256 * 1024, ge=1024)
    accounts_file: Path | None = None
    """Broker accounts written by the configurator; None admits any well-formed client id."""
    tls_listeners: list[Bind] = Field(default_factory=list)
    """TLS binds, e.g. `0.0.0.0:8883`; an empty `listeners` list then means plain TCP is off."""
    certfile: Path | None = None
    keyfile: Path | None = None
    connect_timeout: float = Field(default=10.0, gt=0)
    """Seconds a new connection may take to send its CONNECT; then it is closed."""
    max_connections_per_source: int = Field(default=64, ge=1)
    """Connections open at once from one address (the host's loopback is not held to it)."""
    max_connections: int = Field(default=0, ge=0)
    """Connections open at once in all; 0: as many as the file-descriptor limit leaves room
    for (soft RLIMIT_NOFILE less 256). The gateway unit sets LimitNOFILE=65536."""


IfName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,15}$")]
"""A Linux interface name (IFNAMSIZ); the pattern also keeps it safe to write into nft rules."""


class GatewayDriverSettings(Section):
    """Where the `linux` driver acts on the gateway it runs on (docs/gateway.md)."""

    lan_interface: IfName = "br0"
    wan_interface: IfName = "eth0"
    wan_rate_kbit: int = Field(default=1_000_000, ge=64)
    """Uplink rate shared by the htb priority classes on the WAN."""
    dnsmasq_hosts: Path = Path("/var/lib/homenet/dnsmasq-hosts")
    """Owned by homenet, given to dnsmasq as `dhcp-hostsfile=`; rewritten whole on change."""
    dnsmasq_pidfile: Path = Path("/run/dnsmasq/dnsmasq.pid")
    """Where dnsmasq writes its pid: it is sent SIGHUP to re-read the hosts file."""
    igmpproxy: str = "igmpproxy"
    igmpproxy_conf: Path = Path("/run/homenet/igmpproxy.conf")
    """igmpproxy runs as the configurator's child while a device needs it, with this config."""
    retry_max: float = Field(default=60.0, gt=0)
    """Longest wait, in seconds, between retries of a failed gateway operation (backoff from 1 s)."""
    lan_check_interval: float = Field(default=2.0, gt=0)
    """Seconds between reads of `lan_interface`'s IPv4 address: when it moves to another subnet,
    every device is re-planned in it (docs/renumbering.md)."""


class CloudSettings(Section):
    """The link to the operator's cloud servers (docs/cloud.md); the home works without it."""

    url: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/.*)?$")]
    """Base URL of `homenet cloud run` (https in production; the home always opens the connection)."""
    home_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    """This home's identity at the cloud, with the configurator's key: a replacement gateway
    given both (and the key file) restores the home from its backup."""
    region: str = ""
    """Where the home is, for failures the operator publishes by region."""
    public_key: str | None = None
    """The cloud's signing key (base64); None: pinned from its first reply."""
    cafile: Path | None = None
    """For an https:// URL: the certificate authority to trust instead of the system's."""
    lookup_timeout: float = Field(default=1.5, gt=0, le=10)
    """Longest a registration waits for an equipment profile before the built-in one is used."""
    retry: float = Field(default=10.0, gt=0)
    """Seconds without a lookup once the cloud did not answer (later ones use the built-in at once)."""
    poll_wait: int = Field(default=20, gt=0, le=30)
    """Seconds a failure-information long-poll is held open by the server."""
    backup_interval: float = Field(default=5.0, gt=0)
    """Seconds between configuration backups while something changed."""
    restore: bool = True
    """A configurator starting on an empty database restores the home's backup first."""
    quality_interval: float = Field(default=3600.0, gt=0)
    """Seconds between quality checks of every device with a port forward (also after each config)."""


class ConfiguratorSettings(Section):
    broker: BrokerUrlText = "mqtt://127.0.0.1:1883"
    root: str = DEFAULT_ROOT
    configurator_id: str = "configurator"
    data_dir: Path = Field(default_factory=lambda: default_data_dir("gateway"))
    gateway_driver: Literal["memory", "linux", "upnp"] = "memory"
    """memory: record only; linux: nftables, tc, dnsmasq, igmpproxy on this host; upnp: a
    third-party router, reached by its devices' agents (port mappings go to them)."""
    gateway: GatewayDriverSettings = Field(default_factory=GatewayDriverSettings)
    lan: LanSettings = Field(default_factory=LanSettings)
    broker_cafile: Path | None = None
    """For an mqtts:// broker: the certificate to trust (the gateway's own)."""
    accounts_file: Path | None = None
    """Broker accounts this configurator issues (the embedded broker reads the same file);
    None: the broker authenticates nobody and no credentials are issued."""
    dynsec_admin: str | None = None
    """An external Mosquitto at `broker` instead: the username of its dynamic-security admin,
    through which the configurator issues the accounts, roles and ACLs (docs/security.md).
    Replaces `accounts_file`."""
    dynsec_admin_password_file: Path | None = Field(default=None, validate_default=True)
    """The file (owner-only) holding that admin's password; needed with `dynsec_admin`."""
    enrollment: Literal["auto", "approve", "pairing-code"] = "auto"
    """auto: trust on first use; approve: wait for `homenet devices approve`; pairing-code:
    wait for the code the device shows, entered with `homenet devices pair`."""
    max_new_devices: int = Field(default=0, ge=0)
    """New devices enrolled at once before they confirm their first config (a registration
    flood's budget, configurator/newcomers.py); 0: as many as the LAN has addresses."""
    forget_quarantine: float = Field(default=86400.0, ge=0)
    """Seconds the addresses of a device removed with `homenet devices forget` are not planned
    for another device: switched off rather than gone, it may still hold them."""
    standby_grace: float = Field(default=5.0, ge=0)
    """Seconds a `configurator run --standby`, or a configurator that another one fenced,
    gives a primary to announce itself before taking over when none is online
    (docs/reliability.md)."""
    drift: Literal["correct", "report"] = "correct"
    """What reconciliation does when a device or the gateway no longer has what its config
    says (docs/reliability.md): correct it and report it, or only report it (`events`)."""
    reconcile_interval: float = Field(default=60.0, gt=0)
    """Seconds between reconciliations of every device (also run on every connect to the broker)."""
    cloud: CloudSettings | None = None
    """The operator's cloud servers; None: none (the home works exactly the same)."""

    @field_validator("dynsec_admin_password_file")
    @classmethod
    def _dynsec_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (info.data.get("dynsec_admin") is None) != (value is None):
            raise ValueError("dynsec_admin and dynsec_admin_password_file go together")
        if value is not None and info.data.get("accounts_file") is not None:
            raise ValueError("accounts_file is for the embedded broker; with dynsec_admin Mosquitto keeps the accounts")
        return value


class BeaconSettings(Section):
    interfaces: list[str] = Field(default_factory=list)
    """LAN interfaces to send the Layer-2 beacon on (none: no beacon)."""
    ethertype: int = Field(default=0x88B5, ge=0x0600, le=0xFFFF)


class HttpSettings(Section):
    """The gateway's HTTP server, for the `web` page and the `metrics` (docs/extensions.md)."""

    listen: list[str] = Field(default_factory=lambda: ["lan"])
    """`lan`: every address, but only on the LAN interface (`configurator.gateway.lan_interface`,
    bound with SO_BINDTODEVICE, so a renumbered LAN is still served); else IP addresses."""
    port: int = Field(default=8080, ge=1, le=65535)


class Switch(Section):
    enabled: bool = True


class HomeAssistantSettings(Switch):
    prefix: str = Field(default="homeassistant", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    """Home Assistant's MQTT discovery prefix (its MQTT integration's setting of that name)."""


class GatewaySettings(Section):
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    beacon: BeaconSettings = Field(default_factory=BeaconSettings)
    configurator: ConfiguratorSettings = Field(default_factory=ConfiguratorSettings)
    # the extensions beside the core, each off by `enabled = false` (docs/extensions.md)
    http: HttpSettings = Field(default_factory=HttpSettings)
    web: Switch = Field(default_factory=Switch)
    metrics: Switch = Field(default_factory=Switch)
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)


class AgentSettings(Section):
    broker: BrokerUrlText | None = None
    """None: find the broker from the gateway's Layer-2 beacon."""
    broker_fingerprint: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    """For an mqtts:// broker: SHA-256 of its certificate (the beacon carries it otherwise)."""
    broker_cafile: Path | None = None
    """For an mqtts:// broker: a certificate to trust instead of a fingerprint."""
    beacon_ethertype: int = Field(default=0x88B5, ge=0x0600, le=0xFFFF)
    configurator_key_file: Path | None = None
    """A provisioned configurator public key (base64); without it the first valid beacon's key is pinned."""
    root: str = DEFAULT_ROOT
    device_id: str | None = None
    device_type: str = "generic"
    model: str = ""
    maker: str = ""
    data_dir: Path = Field(default_factory=lambda: default_data_dir("agent"))
    executor: Literal["auto", "simulated", "iproute2", "networkmanager"] = "auto"
    """How config items are carried out. `auto` picks `iproute2` (changes the system over
    netlink) when the agent runs on Linux with CAP_NET_ADMIN in effect (root, or a unit with
    `AmbientCapabilities=CAP_NET_ADMIN`) and reports the real interfaces (collector `linux`);
    otherwise `simulated`, which only records the settings: an agent that cannot change the
    network, or pretends to be another device, must not try. The simulated executor always
    reports what it recorded on a simulated interface (the simulated collector): the real
    interfaces never get those settings, and reporting them would be drift forever."""
    collector: Literal["linux", "simulated"] = "linux"
    resolv_conf: Path | None = None
    """A file the `iproute2` executor writes the DNS servers of an `ipv4` item to. None: the
    host's way, systemd-resolved, resolvconf, or /etc/resolv.conf where it may be written
    (agent/dns.py); never the host's file from inside another network namespace."""
    apply_deadline: float = Field(default=15.0, gt=0, le=30)
    """Seconds the broker has to answer on changed IPv4 settings before they are rolled back.
    The check holds up the MQTT loop, so it stays under the 30 s keepalive."""
    info_interval: float = Field(default=10.0, gt=0)
    """Seconds between checks of the device's addresses (an `info` goes out on change)."""
    register_retry: float = Field(default=30.0, gt=0)
    """Seconds without an answer before a register is sent again (checked every info_interval)."""
    upnp_lease: int = Field(default=3600, ge=2, le=604800)
    """Seconds a port mapping made on the router by UPnP is leased for (renewed at half): how
    long the router keeps the mapping of a device whose agent is gone."""

    @field_validator("device_id")
    @classmethod
    def _safe_id(cls, value: str | None) -> str | None:
        return value if value is None else check_device_id(value)

    @field_validator("collector")
    @classmethod
    def _simulated_pair(cls, value: str, info: ValidationInfo) -> str:
        """The simulated collector reports the simulated executor's address: a real one would lie."""
        if value == "simulated" and info.data.get("executor") in ("iproute2", "networkmanager"):
            raise ValueError("the simulated collector needs executor 'simulated' (or 'auto')")
        return value


def load(model: type[Section], path: Path | None, overrides: dict[str, Any]) -> Any:
    """Build settings from a TOML file (optional) and flag overrides (None values ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"settings file {path} is not valid TOML: {exc}") from None
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        target = data
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where = f"settings file {path}" if path else "settings"
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise SettingsError(f"{where}: {problems}") from None


def _problem(error: Any) -> str:
    """`key.path: what is wrong`, without pydantic's "Value error, " prefix."""
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"
