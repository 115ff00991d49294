"""The `upnp` gateway driver: a third-party router the configurator cannot configure itself.

Such a router offers UPnP IGD at most, and in secure mode (miniupnpd's default) it maps a port
only to the address that asks for it. So the policy hands port mappings to the devices' agents
(`policy.AGENT_SIDE`), whose `upnp` executor maps them and keeps their leases alive. What IGD
cannot do at all (DHCP reservations, QoS, the IGMP proxy) is reported `unsupported` here, with
the reason, rather than pretended. `gateway/state` lists the port mappings the agents were asked
to make on the router.
"""

from __future__ import annotations

from homenet.schemas.messages import Config, GatewayState, ItemResult, ItemStatus, PortMapping, Target

from ..gateway import port_mappings, wants_of
from ..ipam import LanPlan

WHY = {
    "reservation": "a third-party router's DHCP server is out of UPnP IGD's reach; the device keeps "
                   "its static address, planned outside the router's pool",
    "qos": "UPnP IGD has no traffic priority control",
    "igmp": "UPnP IGD has no IGMP proxy control; the router's own setting applies",
}


class UpnpGatewayDriver:
    name = "upnp"

    def __init__(self, lan: LanPlan) -> None:
        self._lan = lan
        self._delegated: dict[str, tuple[PortMapping, ...]] = {}

    def lan(self) -> LanPlan:
        return self._lan

    def observe(self) -> None:
        """UPnP IGD does not tell the router's LAN address; the `[lan]` settings say it."""

    def set_lan(self, lan: LanPlan) -> None:
        self._lan = lan

    def apply(self, config: Config) -> list[ItemResult]:
        self._delegated[config.device_id] = port_mappings(config, Target.AGENT)
        return [ItemResult(item=key, status=ItemStatus.UNSUPPORTED, detail=WHY.get(key, "not over UPnP IGD"))
                for key in wants_of(config).items]

    def remove(self, device_id: str) -> None:
        self._delegated.pop(device_id, None)

    def state(self) -> GatewayState:
        return GatewayState(driver=self.name, lan=str(self._lan.subnet),
                            port_mappings=sorted((m for ms in self._delegated.values() for m in ms),
                                                 key=lambda m: (m.protocol, m.external_port)))

    def actual(self) -> None:
        """IGD lists only port mappings, and those belong to the agents that keep them (their
        `config.result` says whether they are in force): nothing here to check."""
        return None

    def close(self) -> None:
        """Nothing runs here: the agents keep their own leases."""
