"""Assembling an agent from settings: identity, state, collector, executor.

The real executors (iproute2, networkmanager, upnp) and the TLS pinning are imported only when
the settings choose them, and they import their own heavy libraries (pyroute2, asyncio) only
when they act: every megabyte here is in every device's agent (docs/performance.md, Footprint).
"""

from __future__ import annotations

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


def derive_device_id(collector: Collector) -> str:
    """`hn-<mac>` of the first real interface, stable across reinstalls; else the hostname."""
    for iface in collector.interfaces():
        if iface.mac and iface.mac != "00:00:00:00:00:00":
            return "hn-" + iface.mac.replace(":", "")
    return re.sub(r"[^A-Za-z0-9._-]", "-", collector.hostname())[:63].strip("-._") or "device"


def open_device(settings: AgentSettings) -> Device:
    """The executor follows AgentSettings.executor; `auto` is `iproute2` where it can work."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    state = StateFile(settings.data_dir)
    device_id = settings.device_id or state.state.device_id or derive_device_id(LinuxCollector())
    if state.state.device_id != device_id:
        state.update(device_id=device_id)
    executor: Executor
    collector: Collector
    if settings.collector == "simulated":  # the settings refuse it with any other executor
        simulated = SimulatedExecutor(settings.data_dir)
        executor, collector = simulated, SimulatedCollector(device_id, simulated)
    else:
        from . import upnp

        collector = LinuxCollector()
        # a port mapping given to the agent is for the router's IGD (a third-party gateway)
        executor = upnp.UpnpExecutor(_real_executor(settings), settings.data_dir, settings.upnp_lease)
    key = KeyPair.load_or_create(settings.data_dir / "agent.key")
    pinned = PinnedKey(settings.data_dir / "configurator.pub", settings.configurator_key_file)
    return Device(settings, device_id, state, collector, executor, key, pinned)


def _real_executor(settings: AgentSettings) -> Executor:
    """`auto`: NetworkManager when it runs (it would undo changes made behind its back), else
    iproute2 with CAP_NET_ADMIN, else simulated."""
    from . import dns, iproute2, networkmanager

    choice = settings.executor
    if choice == "auto":
        choice = ("networkmanager" if networkmanager.detect() else
                  "iproute2" if iproute2.usable() else "simulated")
    if choice == "networkmanager":
        return networkmanager.NetworkManagerExecutor()
    if choice == "iproute2":
        return iproute2.Iproute2Executor(dns.detect(settings.resolv_conf))
    return SimulatedExecutor(settings.data_dir)


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
