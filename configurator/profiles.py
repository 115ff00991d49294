"""Built-in device profiles: what each kind of device needs from the network.

Data, not logic: the policy reads these. Unknown device types get `generic`.
"""

from __future__ import annotations

from dataclasses import dataclass

from homenet.schemas.messages import QosClass


@dataclass(frozen=True)
class PortNeed:
    protocol: str
    port: int
    description: str


@dataclass(frozen=True)
class Profile:
    name: str
    qos: QosClass
    igmp: bool = False
    ports: tuple[PortNeed, ...] = ()


PROFILES: dict[str, Profile] = {p.name: p for p in (
    # IPTV is multicast video: video priority and the IGMP proxy on the WAN side.
    Profile("iptv-stb", QosClass.VIDEO, igmp=True),
    # A NAS is reached from outside (HTTPS remote access) and does bulk backups.
    Profile("nas", QosClass.BULK, ports=(PortNeed("tcp", 443, "NAS remote access"),)),
    Profile("media-player", QosClass.INTERACTIVE, igmp=True),
    # Consoles need a reachable port for peer-to-peer matchmaking (strict NAT otherwise).
    Profile("game-console", QosClass.VOICE, ports=(PortNeed("udp", 3074, "game console NAT"),)),
    Profile("smart-speaker", QosClass.VOICE),
    # Cameras upload video to their cloud service; no inbound port (that would expose them).
    Profile("camera", QosClass.VIDEO),
    Profile("generic", QosClass.BEST_EFFORT),
)}


def profile_for(device_type: str) -> Profile:
    return PROFILES.get(device_type, PROFILES["generic"])
