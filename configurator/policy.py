"""Evaluation (IEC 62608-2 step 3): device info + the network's state -> configuration items.

Pure: the caller gathers what is in use; this module decides. The same inputs always give the
same items, so "did anything change?" is a plain comparison and versions only move on change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from homenet.schemas.messages import (DSCP, ConfigItem, DeviceInfo, IgmpItem, Interface, Ipv4Item,
                                      PortMappingItem, QosItem, Target)

from .ipam import AddressExhausted, LanPlan, addresses_of, plan_address
from .ports import PortKey, PortsExhausted, allocate
from .profiles import Profile, profile_for


class PlanError(Exception):
    """The device cannot be configured (no usable interface, no free address or port)."""


@dataclass(frozen=True)
class NetworkView:
    """What the rest of the home holds, as seen when planning one device."""

    lan: LanPlan
    addresses: Mapping[IPv4Address, str] = field(default_factory=dict)
    ports: Mapping[PortKey, str] = field(default_factory=dict)
    gateway: str = "memory"
    """The gateway driver's name: it decides which side carries some items (`AGENT_SIDE`)."""
    free_from: IPv4Address | None = None
    """Every static address below this one is held by someone (a search hint, see `plan_address`)."""


AGENT_SIDE: Mapping[str, frozenset[str]] = {"upnp": frozenset({"port_mapping"})}
"""Item kinds the agent carries out instead of the gateway driver, per gateway kind. A
third-party router is reached by UPnP IGD, and one in secure mode maps a port only to the
address that asks for it: the device itself must ask (IEC 62608 foresees the delegation)."""


def target(gateway: str, kind: str) -> Target:
    """Who carries out items of `kind` with this gateway; the agent always sets its own `ipv4`."""
    return Target.AGENT if kind == "ipv4" or kind in AGENT_SIDE.get(gateway, ()) else Target.GATEWAY


@dataclass(frozen=True)
class Plan:
    profile: Profile
    items: list[ConfigItem]


def primary_interface(info: DeviceInfo, lan: LanPlan, previous: str | None = None) -> Interface:
    """The interface to configure: up, not loopback, with a MAC; one already on the LAN first,
    then the one configured before (`previous`: after a renumbering none is on the LAN)."""
    usable = [i for i in info.interfaces if i.up and i.mac and i.mac != "00:00:00:00:00:00"]
    if not usable:
        raise PlanError(f"device {info.device_id} reports no interface that is up and has a MAC")
    on_lan = [i for i in usable if any(a in lan.subnet for a in addresses_of(i.addresses))]
    before = [i for i in usable if i.name == previous]
    return (on_lan or before or usable)[0]


def _previous(items: list[ConfigItem]) -> tuple[Ipv4Item | None, dict[tuple[str, int], int]]:
    ipv4 = next((i for i in items if isinstance(i, Ipv4Item)), None)
    ports = {(i.protocol, i.internal_port): i.external_port
             for i in items if isinstance(i, PortMappingItem)}
    return ipv4, ports


def evaluate(info: DeviceInfo, view: NetworkView, previous: list[ConfigItem] = (),
             profile: Profile | None = None) -> Plan:
    """Plan the device's configuration; raise PlanError (with the reason) when it cannot be done.
    `profile`: the model's own (the service server's, docs/cloud.md), else the built-in for its type."""
    profile = profile or profile_for(info.device_type)
    lan = view.lan
    prev_ipv4, prev_ports = _previous(list(previous))
    iface = primary_interface(info, lan, prev_ipv4.interface if prev_ipv4 else None)
    try:
        address = plan_address(lan, info.device_id, previous=prev_ipv4.address if prev_ipv4 else None,
                               reported=addresses_of(iface.addresses), in_use=view.addresses,
                               search_from=view.free_from)
        mappings = [
            PortMappingItem(protocol=need.protocol, internal_port=need.port, description=need.description,
                            target=target(view.gateway, "port_mapping"),
                            external_port=allocate(info.device_id, need.protocol, need.port,
                                                   previous=prev_ports.get((need.protocol, need.port)),
                                                   in_use=view.ports))
            for need in profile.ports
        ]
    except (AddressExhausted, PortsExhausted) as exc:
        raise PlanError(str(exc)) from exc
    items: list[ConfigItem] = [
        Ipv4Item(interface=iface.name, mac=iface.mac, address=address,
                 prefix_len=lan.subnet.prefixlen, gateway=lan.gateway, dns=list(lan.dns)),
        QosItem(qos_class=profile.qos, dscp=DSCP[profile.qos], target=target(view.gateway, "qos")),
        *mappings,
    ]
    if profile.igmp:
        items.append(IgmpItem(enabled=True, target=target(view.gateway, "igmp")))
    return Plan(profile, items)
