"""How many new devices may be enrolled at once before one has confirmed its configuration.

Under `auto` enrollment every register from an unknown id became a record, an address and a
broker account: 3,000 fake devices registered in 14 s, each got an account, the database grew
0.7 -> 6.9 MB, and only the address pool stopped it. `Newcomers` is the budget: a device
accepted for the first time takes a place until it confirms its first configuration (or is
forgotten); past `limit` places a new device's register is dropped (nothing stored, no
account, a `registration.limited` event) and the device registers again later. A place not
confirmed within `expire` seconds is given up, so fakes that never confirm cannot hold the
budget for ever. The default limit is the number of addresses in the LAN: no more devices
than that can ever be configured, so a real storm never waits on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Newcomers:
    limit: int
    expire: float = 120.0
    _since: dict[str, float] = field(default_factory=dict)

    def admit(self, device_id: str, now: float) -> bool:
        """Take a place for `device_id` (kept if it has one); False when none is free."""
        if device_id in self._since:
            return True
        if len(self._since) >= self.limit:
            self._since = {d: t for d, t in self._since.items() if now - t < self.expire}
            if len(self._since) >= self.limit:
                return False
        self._since[device_id] = now
        return True

    def settled(self, device_id: str) -> None:
        """The device confirmed its configuration, or was forgotten: its place is free."""
        self._since.pop(device_id, None)

    def __len__(self) -> int:
        return len(self._since)
