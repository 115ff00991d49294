"""How many connections the embedded broker holds, per source address and in total (pure).

Every connection costs a file descriptor and memory before its CONNECT says who it is, so a
flood of idle or half-open connections from the LAN could exhaust the gateway (the soft
RLIMIT_NOFILE of 1,024 went in about 1,030 connections, and every login failed after it).
`ConnectionLimits` counts what is open; the broker closes a connection at once when `admit`
names a reason, and holds a connection that has not sent CONNECT for a short deadline only.
The host's own loopback addresses (where the configurator and the CLI connect from) are not
held to the per-source cap; they count towards the total.
"""

from __future__ import annotations

import resource
from collections import Counter
from dataclasses import dataclass, field

RESERVED_FDS = 256
"""Descriptors kept free for the configurator's database, logs, raw sockets and children."""


def fd_budget(reserve: int = RESERVED_FDS) -> int:
    """Connections the process's soft RLIMIT_NOFILE leaves room for."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, soft - reserve)


@dataclass
class ConnectionLimits:
    per_source: int
    total: int
    exempt: frozenset[str] = frozenset()
    """Sources not held to `per_source` (the host's loopback addresses)."""
    _open: Counter[str] = field(default_factory=Counter)

    @property
    def open(self) -> int:
        return sum(self._open.values())

    def admit(self, source: str) -> str | None:
        """Count a new connection from `source`; or say why it is refused (nothing counted)."""
        if self.open >= self.total:
            return f"{self.total} connections open, the broker's limit"
        if source not in self.exempt and self._open[source] >= self.per_source:
            return f"{self.per_source} connections open from {source}, the limit per source address"
        self._open[source] += 1
        return None

    def release(self, source: str) -> None:
        self._open[source] -= 1
        if self._open[source] <= 0:
            del self._open[source]
