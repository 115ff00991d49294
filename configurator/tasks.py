"""The configurator's own work, queued onto the worker like a message: renumbering when the
gateway's LAN moved (renumber.py), reconciliation every `reconcile_interval` and after a device's
reports (reconcile.py), and the end of forgotten devices' quarantines."""

from __future__ import annotations

import logging
import threading
import time
from functools import partial

from homenet.schemas.messages import Severity

from .ipam import LanPlan, quarantined
from .planner import Handler, Parts
from .reconcile import Check, DriftTracker, GatewayListing, Side, device_drift, gateway_drift
from .records import DeviceRecord
from .renumber import lan_plan, saved, saved_plan

log = logging.getLogger(f"{__package__}.service")  # one name in the journal for the whole service


class Tasks(Handler):
    def __init__(self, parts: Parts, connected: threading.Event) -> None:
        super().__init__(parts)
        self._connected = connected
        self._drift = DriftTracker(self.settings.drift == "correct", self.settings.reconcile_interval)
        self._halt = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="reconcile", daemon=True)

    def start(self) -> None:
        self.ticker.start()

    def stop(self) -> None:
        self._halt.set()

    # --- renumbering (renumber.py) ------------------------------------------------------------

    def renumber(self, lan: LanPlan, timeout: float = 60.0) -> None:
        """The gateway's LAN moved to `lan` (docs/renumbering.md): keep it, then re-plan every
        device in it. Called from the LAN watch's thread; done by the worker in a batch of its
        own, and returns once that batch has committed."""
        done = threading.Event()

        def task() -> None:
            self._renumber(lan)
            self.engine.later(done.set)

        self.engine.put(task)
        done.wait(timeout)

    def _renumber(self, lan: LanPlan) -> None:
        # the committed plan, not the driver's: a batch that failed to commit is tried again
        old = saved_plan(self.settings.lan, self.store.meta()) or lan_plan(self.settings.lan)
        if old == lan:  # the watch saw the move twice before the first one was done
            return
        self.store.set_meta(lan=saved(lan, self.settings.lan))
        self.driver.set_lan(lan)
        self.out.event("lan.renumbered", reason=f"{old.subnet} (gateway {old.gateway}) -> {lan.subnet} "
                                                f"(gateway {lan.gateway})", old=str(old.subnet), new=str(lan.subnet))
        self.planner.replan_all()
        self.planner.publish_gateway_state()

    # --- reconciliation (reconcile.py) ------------------------------------------------------

    def _tick(self) -> None:
        while not self._halt.wait(self.settings.reconcile_interval):
            if self._connected.is_set():
                self.engine.put(self.reconcile_all)

    def reconcile_all(self) -> None:
        """Every device, once this batch commits. The records are those at this point of the batch,
        as is the gateway then: the batch's gateway changes run in order after the commit."""
        self._end_quarantines()
        # again, in case a wrong one is retained that this configurator never received (amqtt
        # hands nothing to a connection that took a session over: docs/amqtt-notes.md)
        self.out.online()
        records = self.store.all()
        self.engine.later(self._drift.retain, [r.device_id for r in records])
        self.engine.later(self.reconcile, records, gateway=True)

    def _end_quarantines(self) -> None:
        """Addresses of forgotten devices whose quarantine has run out are free again."""
        meta = self.store.meta()
        for device_id in meta.get("quarantine", {}).keys() - quarantined(meta, time.time()).keys():
            self.planner.release(device_id)
            log.info("addresses of forgotten device %s are free again", device_id)

    def reconcile(self, records: list[DeviceRecord], gateway: bool) -> None:
        """Each device's own reports, and with `gateway` the driver's listing. The driver is given
        nothing for a device without a config, so there is nothing to compare."""
        try:
            state = self.driver.actual() if gateway else None
            actual = GatewayListing(state) if state is not None else None
            for record in records:
                self._settle(record, device_drift(record))
                if actual is not None and record.config:
                    self._settle(record, gateway_drift(record, actual))
        except Exception:  # after the commit: a bug must not stop the worker
            log.exception("internal error in reconciliation")

    def _settle(self, record: DeviceRecord, check: Check) -> None:
        """Report what changed; correct the gateway at once, a device by a task (it writes a version)."""
        step = self._drift.observe(record.device_id, check, time.monotonic())
        for f in step.detected:
            self.out.event("drift.detected", Severity.WARNING, device_id=record.device_id,
                           reason=f"{f.drift.value} {f.item}: desired {f.desired}, actual {f.actual}",
                           what=f.drift.value, item=f.item, desired=f.desired, actual=f.actual, attempt=step.attempt)
        for f in step.corrected:
            self.out.event("drift.corrected", device_id=record.device_id,
                           reason=f"{f.drift.value} {f.item}: as desired again ({f.desired})",
                           what=f.drift.value, item=f.item, desired=f.desired, was=f.actual, attempt=step.attempt)
        if step.correct and check.side == Side.GATEWAY:
            self.planner.apply_on_gateway(record)
        elif step.correct:
            self.engine.put(partial(self._resend, record.device_id, record.version))

    def _resend(self, device_id: str, version: int) -> None:
        """Device drift, corrected: the config again as a new version, unless it changed meanwhile."""
        record = self.store.get(device_id)
        if (record is None or record.version != version
                or not any(f.correctable for f in device_drift(record).findings)):
            return
        self.planner.replan(record, again=True)
