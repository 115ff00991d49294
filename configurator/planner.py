"""Writing a device's record and what follows from it: its plan (policy.py), the config sent
after the commit, the gateway's part applied and published. Every handler writes through here,
so the holdings, the bus and the gateway stay in step with the store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from homenet.accounts import AccountStore
from homenet.settings import ConfiguratorSettings
from homenet.schemas.messages import Config, ConfigItem, DeviceInfo, ItemResult, ItemStatus, Severity

from .bus import Bus, DeviceChanged
from .engine import Engine
from .gateway import GatewayDriver
from .gatewaystate import Published
from .holdings import Holdings
from .ipam import quarantined
from .lifecycle import PLANNABLE, Event, State, advance
from .policy import NetworkView, PlanError, evaluate
from .profiles import Profile
from .publisher import Publisher
from .records import DeviceRecord, now
from .store import Store



class Planner:
    def __init__(self, store: Store, driver: GatewayDriver, engine: Engine, publisher: Publisher, bus: Bus) -> None:
        self.store = store
        self.driver = driver
        self.engine = engine
        self.out = publisher
        self.bus = bus
        self.profile_source: Callable[[DeviceInfo], Profile | None] = lambda _info: None
        """A model's own profile, asked for when planning (an extension's, e.g. cloudlink.py)."""
        self.holdings = self.load_holdings()
        self.gateway_published = Published()
        self._gateway_lock = threading.Lock()

    def load_holdings(self) -> Holdings:
        """Who holds what, from the records and the quarantined addresses of forgotten devices."""
        holdings = Holdings(self.store.all())
        for device_id, addresses in quarantined(self.store.meta(), time.time()).items():
            if self.store.get(device_id) is None:
                holdings.hold(device_id, addresses)
        return holdings

    def release(self, device_id: str) -> None:
        """End the quarantine of a forgotten device's addresses."""
        entries = dict(self.store.meta().get("quarantine", {}))
        if entries.pop(device_id, None) is None:
            return
        if self.store.get(device_id) is None:  # back since, its record holds what it uses
            self.holdings.remove(device_id)
        self.store.set_meta(quarantine=entries)

    def reload(self) -> None:
        """The store is back as it was (a failed commit): so are the holdings."""
        self.holdings = self.load_holdings()

    def put(self, record: DeviceRecord) -> None:
        self.store.put(record)
        self.holdings.update(record)
        self.engine.later(self.bus.emit, DeviceChanged(record))

    def _view(self, device_id: str) -> NetworkView:
        return self.holdings.view(self.driver.lan(), device_id, self.driver.name)

    def plan(self, record: DeviceRecord, again: bool = False,
             previous: list[ConfigItem] | None = None) -> tuple[DeviceRecord, bool]:
        """Evaluate the device; return the updated record and whether a new config version was made
        (`again`: even when nothing changed, so that the agent applies it once more; `previous`:
        the items to keep stable, by default its own config's)."""
        if previous is None:
            previous = record.config.items if record.config else []
        try:
            plan = evaluate(record.info, self._view(record.device_id), previous, self.profile_source(record.info))
        except PlanError as exc:
            self.out.event("device.unplanned", Severity.ERROR, device_id=record.device_id, reason=str(exc))
            return record.model_copy(update={"state": advance(record.state, Event.PLAN_FAILED),
                                             "error": str(exc)}), False
        if record.config and plan.items == record.config.items and record.state != State.UNPLANNED and not again:
            return record, False
        # Above what the device reports applied too: after `forget` the record starts afresh,
        # and an agent ignores any version at or below the one it applied.
        version = max(record.version, record.info.applied_version) + 1
        config = Config(device_id=record.device_id, version=version, epoch=self.out.epoch,
                        profile=plan.profile.name, items=plan.items)
        _, payload = self.out.sign("config", config)
        return record.model_copy(update={
            "config": config, "config_payload": payload.decode(), "profile": plan.profile.name,
            "error": "", "state": advance(record.state, Event.CONFIG_SENT)}), True

    def replan(self, record: DeviceRecord, again: bool = False, previous: list[ConfigItem] | None = None) -> DeviceRecord:
        """Plan, put, and (after the commit) send what was planned: the usual three steps."""
        record, planned = self.plan(record, again, previous)
        self.put(record)
        self.after_commit(record, planned)
        return record

    def replan_all(self) -> set[str]:
        """Plan every enrolled device again; the ids of those given a new config version."""
        sent = set()
        for record in self.store.all():
            if record.state not in PLANNABLE:
                continue
            record, planned = self.plan(record)
            if planned:
                self.put(record)
                self.after_commit(record, planned)
                sent.add(record.device_id)
        return sent

    def after_commit(self, record: DeviceRecord, planned: bool) -> None:
        if not planned or record.config is None:
            return
        self.out.publish_raw(self.out.topics.device(record.device_id, "config"), record.config_payload.encode(),
                             retain=True)
        self.out.event("config.sent", device_id=record.device_id, version=record.version, profile=record.profile)
        self.engine.later(self.apply_on_gateway, record)

    # --- the gateway's part ------------------------------------------------------------------

    def apply_on_gateway(self, record: DeviceRecord) -> None:
        assert record.config is not None
        results = self.driver.apply(record.config)
        for failure in (r for r in results if r.status == ItemStatus.FAILED):
            self.out.event("gateway.failed", Severity.ERROR, device_id=record.device_id,
                           reason=f"{failure.item}: {failure.detail}")
        for refused in (r for r in results if r.status == ItemStatus.UNSUPPORTED):  # e.g. a third-party router
            self.out.event("gateway.unsupported", device_id=record.device_id,
                           reason=f"{refused.item}: {refused.detail}")
        self.gateway_reported(record.device_id, results)
        self.publish_gateway_state()

    def gateway_reported(self, device_id: str, results: list[ItemResult]) -> None:
        """Keep in the device's record what holds of its gateway items (from any thread: the
        driver's retries report here too); written by a task of its own, as every write is."""
        self.engine.put(partial(self._keep_gateway_items, device_id, results))

    def _keep_gateway_items(self, device_id: str, results: list[ItemResult]) -> None:
        record = self.store.get(device_id)
        if record is not None and record.config is not None and record.gateway != results:
            self.put(record.model_copy(update={"gateway": results, "updated": now()}))

    def publish_gateway_state(self) -> None:
        """What the driver has set, retained on `gateway/state` and `gateway/device/{id}` (also
        called by the driver's retries); a batch sends it once, after all its gateway changes."""
        self.engine.once_after(self._send_gateway_state)

    def _send_gateway_state(self) -> None:
        """Only what changed since the last time: the summary, and each device whose part did."""
        with self._gateway_lock:  # in order, whichever thread the driver reports from
            summary, devices = self.gateway_published.changes(self.driver.state())
            for device_id, part in devices.items():
                topic = self.out.topics.gateway_device(device_id)
                if part is None:
                    self.out.publish_raw(topic, b"", retain=True)
                else:
                    self.out.publish(topic, "gateway.device", part, retain=True)
            if summary is not None:
                self.out.publish(self.out.topics.gateway_state, "gateway.state", summary, retain=True)


@dataclass(frozen=True)
class Parts:
    """What the handlers (devices.py, commands.py, tasks.py) work with; service.py wires one set."""
    settings: ConfiguratorSettings
    store: Store
    driver: GatewayDriver
    accounts: AccountStore | None
    engine: Engine
    out: Publisher
    planner: Planner


class Handler:
    """A handler's view of the parts, as attributes."""

    def __init__(self, parts: Parts) -> None:
        self.settings = parts.settings
        self.store = parts.store
        self.driver = parts.driver
        self.accounts = parts.accounts
        self.engine = parts.engine
        self.out = parts.out
        self.planner = parts.planner
