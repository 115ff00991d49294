"""Executors carry out the agent's items of a config (IEC 62608-2 step 5), item by item.

This module holds the interface and the `simulated` executor, which keeps the settings it was
asked for in the agent's state directory instead of touching the system: for demos, tests of
the protocol, and devices whose settings are managed elsewhere. An executor can also snapshot
what it may change and restore the snapshot, so the agent can undo settings that cut the
device off from the broker (`safeapply.py`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

from homenet.durable import read_json, write_json_atomic
from homenet.schemas.messages import (ConfigItem, Interface, Ipv4Item, ItemResult, ItemStatus, QosItem,
                                      item_key)


class ExecutorError(Exception):
    """The system's settings could not be read for a checkpoint or restored from one."""


class Executor(Protocol):
    name: str

    def apply(self, item: ConfigItem) -> ItemResult:
        """Apply one item; never raise for a failure of the item itself, report it."""

    def in_force(self) -> dict[str, Any]:
        """The settings now in force, as reported in `config.result`."""

    def checkpoint(self) -> object:
        """A snapshot of everything `apply` may change, opaque to all but `rollback`.

        Raises ExecutorError when the settings cannot be read (then nothing should be applied).
        """

    def rollback(self, checkpoint: Any) -> None:
        """Put back what `checkpoint` saw; raises ExecutorError naming what could not be restored."""


def _settings_of(item: ConfigItem) -> dict[str, Any]:
    return item.model_dump(mode="json", exclude={"kind", "target"})


class SimulatedExecutor:
    """Keeps applied settings in `simulated.json`; every write is atomic."""

    name = "simulated"
    SUPPORTED = (Ipv4Item, QosItem)

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "simulated.json"
        self._settings: dict[str, Any] = read_json(self.path, {})

    def apply(self, item: ConfigItem) -> ItemResult:
        key = item_key(item)
        if not isinstance(item, self.SUPPORTED):
            return ItemResult(item=key, status=ItemStatus.UNSUPPORTED,
                              detail=f"the simulated executor does not apply {item.kind}")
        wanted = _settings_of(item)
        if self._settings.get(key) == wanted:
            return ItemResult(item=key, status=ItemStatus.UNCHANGED)
        settings = {**self._settings, key: wanted}
        try:
            write_json_atomic(self.path, settings)
        except OSError as exc:
            return ItemResult(item=key, status=ItemStatus.FAILED, detail=f"cannot save: {exc}")
        self._settings = settings
        return ItemResult(item=key, status=ItemStatus.APPLIED)

    def in_force(self) -> dict[str, Any]:
        return dict(self._settings)

    def checkpoint(self) -> dict[str, Any]:
        return dict(self._settings)  # values are replaced on apply, never changed in place

    def rollback(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint == self._settings:
            return
        try:
            write_json_atomic(self.path, checkpoint)
        except OSError as exc:
            raise ExecutorError(f"cannot save: {exc}") from exc
        self._settings = dict(checkpoint)


class SimulatedCollector:
    """A virtual NIC for a simulated device: a MAC derived from the device id, the applied address.

    Lets many simulated devices run on one host (the demo, the load generator) without all of
    them reporting the host's MACs.
    """

    def __init__(self, device_id: str, executor: SimulatedExecutor, hostname: str = "") -> None:
        digest = hashlib.sha256(device_id.encode()).digest()
        self.mac = ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))  # locally administered
        self._executor = executor
        self._hostname = hostname or device_id

    def hostname(self) -> str:
        return self._hostname

    def interfaces(self) -> list[Interface]:
        ipv4 = self._executor.in_force().get("ipv4")
        addresses = [f"{ipv4['address']}/{ipv4['prefix_len']}"] if ipv4 else []
        return [Interface(name="sim0", mac=self.mac, up=True, addresses=addresses)]
