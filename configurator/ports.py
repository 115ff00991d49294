"""External port allocation for port mappings (pure).

Two NAS boxes both want TCP 443 from the WAN; only one can have it. The second gets a port
from the overflow range, and keeps it on every later re-plan.
"""

from __future__ import annotations

from collections.abc import Mapping

OVERFLOW = range(40000, 50000)

PortKey = tuple[str, int]  # (protocol, external port)


class PortsExhausted(Exception):
    """No external port is left for a mapping."""


def allocate(device_id: str, protocol: str, wanted: int, *, previous: int | None,
             in_use: Mapping[PortKey, str]) -> int:
    """Pick the external port: the one held before, else the wanted one, else an overflow one."""

    def free(port: int) -> bool:
        return in_use.get((protocol, port), device_id) == device_id

    for candidate in (previous, wanted):
        if candidate is not None and free(candidate):
            return candidate
    for candidate in OVERFLOW:
        if free(candidate):
            return candidate
    raise PortsExhausted(f"no external {protocol} port free for {device_id} (wanted {wanted})")
