"""Assembling an agent from settings: identity, state, collector, executor.

The real executors (iproute2, networkmanager, upnp) and the TLS pinning are imported only when
the settings choose them, and they import their own heavy libraries (pyroute2, asyncio) only
when they act: every megabyte here is in every device's agent (docs/performance.md, Footprint).
"""

from __future__ import annotations

import logging
import re

from homenet.keys import KeyPair
from homenet.mqtt import BrokerUrl
from homenet.settings import AgentSettings

from .collector import Collector, LinuxCollector
from .device import Device
from .executor import Executor, SimulatedCollector, SimulatedExecutor
from .service import Agent
from .state import StateFile
from .trust import PinnedKey

log = logging.getLogger(__name__)


def derive_device_id(collector: Collector) -> str:
    """`hn-<mac>` of the first real interface, stable across reinstalls; else the hostname."""
    for iface in collector.interfaces():
        if iface.mac and iface.mac != "00:00:00:00:00:00":
            return "hn-" + iface.mac.replace(":", "")
    return re.sub(r"[^A-Za-z0-9._-]", "-", collector.hostname())[:63].strip("-._") or "device"


def open_device(settings: AgentSettings, *, read_only: bool = False) -> Device:
    """The executor follows AgentSettings.executor; `auto` is `iproute2` where it can work.
    `read_only` (a command that only prints): nothing is created or written, and a device
    that has never run has no key yet."""
    if not read_only:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    state = StateFile(settings.data_dir)
    device_id = settings.device_id or state.state.device_id or derive_device_id(LinuxCollector())
    if state.state.device_id != device_id and not read_only:
        state.update(device_id=device_id)
    executor: Executor
    collector: Collector
    choice = "simulated" if settings.collector == "simulated" else _executor_choice(settings)
    if choice == "simulated":  # the settings refuse the simulated collector with a real executor
        # Settings only recorded never show on the real interfaces: reported by the real
        # collector they would look like drift forever (a new config version every interval).
        simulated = SimulatedExecutor(settings.data_dir)
        executor, collector = simulated, SimulatedCollector(device_id, simulated)
        log.info("executor simulated: settings are recorded in %s, not applied, and reported on a simulated "
                 "interface (sim0, MAC %s)", simulated.path, collector.mac)
    else:
        from . import upnp

        collector = LinuxCollector()
        # a port mapping given to the agent is for the router's IGD (a third-party gateway)
        executor = upnp.UpnpExecutor(_real_executor(choice, settings), settings.data_dir, settings.upnp_lease)
    key_file = settings.data_dir / "agent.key"
    key = KeyPair.load_or_create(key_file) if not read_only or key_file.exists() else None
    pinned = PinnedKey(settings.data_dir / "configurator.pub", settings.configurator_key_file)
    return Device(settings, device_id, state, collector, executor, key, pinned)


def _executor_choice(settings: AgentSettings) -> str:
    """`auto`: NetworkManager when it runs (it would undo changes made behind its back), else
    iproute2 with CAP_NET_ADMIN, else simulated (said, with the reason: the device's network
    is then left as it is)."""
    from . import iproute2, networkmanager

    if settings.executor != "auto":
        return settings.executor
    if networkmanager.detect():
        return "networkmanager"
    if iproute2.usable():
        return "iproute2"
    log.warning("executor auto: no NetworkManager and no CAP_NET_ADMIN here, so settings are only recorded "
                "(executor simulated, reported on a simulated interface); give the agent CAP_NET_ADMIN to apply them")
    return "simulated"


def _real_executor(choice: str, settings: AgentSettings) -> Executor:
    from . import dns, iproute2, networkmanager

    if choice == "networkmanager":
        return networkmanager.NetworkManagerExecutor()
    return iproute2.Iproute2Executor(dns.detect(settings.resolv_conf))


def build(settings: AgentSettings, broker: BrokerUrl | None = None, device: Device | None = None,
          verify: list[tuple[str, int]] | None = None, fingerprint: str | None = None) -> Agent:
    """An agent for `broker` (found by discovery, with the beacon's IPv4 endpoints to `verify`
    an address change against and its certificate `fingerprint`), else for the broker named in
    the settings. For TLS the certificate is pinned first: a mismatch raises CertificateMismatch."""
    device = device or open_device(settings)
    if broker is None:
        if settings.broker is None:
            raise ValueError("no broker: give --broker or let the agent discover one")
        broker = BrokerUrl.parse(settings.broker)
    cafile = None
    if broker.tls:
        fingerprint = fingerprint or settings.broker_fingerprint
        if settings.broker_cafile is not None:
            cafile = settings.broker_cafile
        elif fingerprint is not None:
            from homenet.tls import pin_certificate

            cafile = pin_certificate(broker.host, broker.port, fingerprint, settings.data_dir / "broker-cert.pem")
        else:
            raise ValueError(f"{broker} is TLS: give --broker-fingerprint (SHA-256 of its certificate) or --cafile")
    return Agent(device, broker, verify=verify, cafile=cafile)
