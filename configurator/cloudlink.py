"""The configurator's link to the operator's cloud servers: an extension (design: extensions).

Theory of operation. The home never depends on the cloud. The link listens to what the
configurator commits (its events) and acts from threads of its own, always opening the
connection itself (the home is behind NAT):
- equipment profiles: planning a device of a known maker/model asks `profile()`; a cached
  profile answers at once (an expired one too, refreshed behind); an unknown model is looked up
  for at most `lookup_timeout` seconds, then the built-in profile is used, and while the cloud
  is down (`retry`) no lookup waits at all. A profile that arrives or changes later re-plans.
- inventory: each device's state, when it changes, goes into the durable outbox
  (cloudstate.py), delivered in order and exactly once (report ids) whenever the cloud answers;
  the home's configuration goes up as a backup every `backup_interval` while it changes.
- failure information: a long-poll, always open, brings the operator's outage notices within
  a second or so; they become `events`, and a failure they explain (IGMP during an IPTV outage,
  a quality check during an Internet outage) is not reported upstream nor diagnosed.
- quality check: after a config with port forwards is applied, the quality check server
  connects in; a failure uploads a diagnosis bundle, and a remedy the configurator can take
  (reconciliation re-applies a port forward) it takes, says so, and checks again.
Store reads that need the whole database, and the gateway's listing, run on the configurator's
worker (`submit`): its records and driver belong to that thread.

Why one module of 460 lines: the link's threads (sender, failure long-poll, worker) share one
durable state and one signed client; the pieces the server side splits by role are thin here
(a request and what the home does with its answer), and the durable outbox, the profile cache
and the client are already modules of their own (cloudstate.py, cloudclient.py).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from homenet.schemas import canonical
from homenet.schemas.cloud import (Backup, BackupQuery, DiagnosisBundle, FailurePoll, PortCheck, ProfileQuery,
                                   QualityRequest, Report)
from homenet.schemas.messages import DeviceInfo, Event, ItemStatus, PortMappingItem, Severity, Target
from homenet.schemas.signing import b64, unb64
from homenet.sequence import SequenceCounter
from homenet.settings import CloudSettings

from .bus import Notice
from .cloudclient import CloudClient, CloudError
from .cloudstate import FILE_NAME, CachedProfile, CloudState
from .profiles import PortNeed, Profile
from .reconcile import Drift, GatewayListing, gateway_drift
from .records import DeviceRecord
from .service import Configurator

log = logging.getLogger(__name__)
T = TypeVar("T")

OWN_EVENTS = frozenset({"cloud.failure", "cloud.failure.resolved", "cloud.explained", "quality.passed",
                        "quality.failed", "diagnosis"})
AV_TYPES = frozenset({"iptv-stb", "media-player", "camera"})
EXPLAINS = {"iptv": ("igmp",), "internet": ("quality", "port_mapping")}
"""Which failures of the home an operator's outage of each service accounts for."""
HELLO_TIMEOUT = 10.0
"""Longest a hello may take, whatever the request behind it (a long-poll waits much longer)."""
SETTLE = 2.0
"""Seconds between a config applied and its quality check: the device's service starts after its network."""
RESTORE_SEQ_GAP = 10_000_000
"""A restored configurator's sequence starts this far above the backup's: agents refuse a seq
at or below one they accepted, and the old gateway may have used more since its last backup."""


def to_profile(doc: dict[str, Any] | None) -> Profile | None:
    if not doc:
        return None
    return Profile(doc["name"], doc["qos"], igmp=doc["igmp"],
                   ports=tuple(PortNeed(p["protocol"], p["port"], p.get("description", "")) for p in doc["ports"]))


def inventory(record: DeviceRecord) -> dict[str, Any]:
    """What the service server is told about a device (no keys, no payloads)."""
    return {"state": record.state.value, "online": record.online, "profile": record.profile,
            "address": record.address, "version": record.version, "error": record.error,
            "result": record.result.status.value if record.result else None,
            "device_type": record.info.device_type, "maker": record.info.maker, "model": record.info.model}


def digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(data)).hexdigest()


def make_client(settings: CloudSettings, configurator_key: Any, state: CloudState) -> tuple[CloudClient, SequenceCounter]:
    # From the clock (µs) when that is higher: a replacement gateway, with no state of the old
    # one's, still starts above every seq the old one used (the cloud refuses a seq used before).
    start = max(state.meta("seq_reserved", 0), time.time_ns() // 1000)
    seq = SequenceCounter(start, lambda ceiling: state.set_meta(seq_reserved=ceiling))
    pinned = settings.public_key or state.meta("cloud_key")
    client = CloudClient(settings.url, settings.home_id, configurator_key, seq.next,
                         unb64(pinned) if pinned else None, settings.cafile)
    return client, seq


class CloudLink:
    def __init__(self, configurator: Configurator, settings: CloudSettings, data_dir: Path) -> None:
        self.c = configurator
        self.settings = settings
        self.state = CloudState(Path(data_dir) / FILE_NAME)
        self.client, _ = make_client(settings, configurator.key, self.state)
        self._profiles: dict[tuple[str, str], CachedProfile] = self.state.profiles()
        self._wanted: set[tuple[str, str]] = set()
        self._down_until = 0.0
        self._hello = False
        self._hello_lock = threading.Lock()
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._dirty: set[str] = set()
        self._forgotten: set[str] = set()
        self._backup_due = True
        self._recent: deque[Event] = deque(maxlen=200)
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=t, name=f"cloud-{t.__name__.strip('_')}", daemon=True)
                         for t in (self._send, self._poll_failures, self._work)]

    # --- extension lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.c.bus.subscribe(self._on_notice)
        self.c.profile_source = self.profile
        self.c.submit(self._scan)  # what was committed but not yet queued when we last stopped
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()
        self._jobs.put(None)
        self.c.bus.unsubscribe(self._on_notice)
        for t in self._threads:
            t.join(timeout=2)  # a thread may be inside a request: it is a daemon
        if not any(t.is_alive() for t in self._threads):  # else it may still write: closed at exit
            self.state.close()

    # --- calls ---------------------------------------------------------------------------------

    def _call(self, path: str, kind: str, body: Any, timeout: float) -> dict[str, Any]:
        """One signed request, after this home's hello (once per process, and again when the
        cloud has forgotten the home)."""
        deadline = time.monotonic() + timeout
        if not self._hello:  # another thread's hello may be under way: wait for it within our time only
            if not self._hello_lock.acquire(timeout=timeout):
                raise CloudError(f"{path}: no answer to this home's hello within {timeout:g} s")
            try:
                if not self._hello:
                    self.client.hello(self.settings.region, min(timeout, HELLO_TIMEOUT))
                    self.state.set_meta(cloud_key=b64(self.client.cloud_key or b""))
                    self._hello = True
            finally:
                self._hello_lock.release()
        try:
            return self.client.call(path, kind, body, max(0.1, deadline - time.monotonic()))
        except CloudError as exc:
            if exc.refused and "cloud.hello first" in str(exc):
                self._hello = False
            raise

    def _on_worker(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn` on the configurator's worker and wait for its result."""
        future: Future[T] = Future()

        def task() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # handed back to the caller
                future.set_exception(exc)
        self.c.submit(task)
        return future.result(timeout)

    def _event(self, name: str, severity: Severity = Severity.INFO, **fields: Any) -> None:
        self.c.submit(partial(self.c.event, name, severity, **fields))

    # --- equipment profiles (Sequence 1) -------------------------------------------------------

    def profile(self, info: DeviceInfo) -> Profile | None:
        """The model's own profile, within the bound; None: use the built-in one."""
        if not info.model:
            return None
        key = (info.maker, info.model)
        cached = self._profiles.get(key)
        if cached is not None:
            if cached.expires <= time.time():
                self._want(key)
            return to_profile(cached.doc)
        if time.monotonic() < self._down_until:
            self._want(key)
            return None
        try:
            return to_profile(self._fetch_profile(key, self.settings.lookup_timeout))
        except CloudError as exc:
            self._down_until = time.monotonic() + self.settings.retry
            log.warning("no equipment profile for %s/%s from the cloud (%s): built-in profile used", *key, exc)
            self._want(key)
            return None

    def _want(self, key: tuple[str, str]) -> None:
        if key not in self._wanted:
            self._wanted.add(key)
            self._jobs.put(partial(self._refresh, key))

    def _fetch_profile(self, key: tuple[str, str], timeout: float) -> dict[str, Any] | None:
        doc = self._call("/v1/service/profile", "cloud.profile.get", ProfileQuery(maker=key[0], model=key[1]),
                         timeout)["profile"]
        ttl = doc["ttl"] if doc else 3600
        self._profiles[key] = CachedProfile(doc, time.time() + ttl)
        self.state.put_profile(*key, doc, time.time() + ttl)
        return doc

    def _refresh(self, key: tuple[str, str]) -> None:
        """Behind the planning: fetch again until the cloud answers; re-plan if the profile changed."""
        before = self._profiles.get(key)
        while not self._halt.is_set():
            try:
                doc = self._fetch_profile(key, 10)
                break
            except CloudError:
                if self._halt.wait(2):
                    return
        self._wanted.discard(key)
        if before is None or before.doc != doc:
            log.info("equipment profile for %s/%s changed: re-planning", *key)
            self.c.replan()

    # --- what the configurator commits ---------------------------------------------------------

    def _on_notice(self, notice: Notice) -> None:
        if isinstance(notice, Event):
            self._on_event(notice)

    def _on_event(self, event: Event) -> None:
        """On the worker, after the commit: note what changed; the work is done elsewhere."""
        if event.event in OWN_EVENTS or not event.device_id:
            return
        self._recent.append(event)
        if event.event == "device.forgotten":
            self._forgotten.add(event.device_id)
        self._dirty.add(event.device_id)
        self._backup_due = True
        self._wake.set()
        if event.event == "config.applied":  # give the device's service a moment to start
            timer = threading.Timer(SETTLE, self._jobs.put, [partial(self.check_quality, event.device_id)])
            timer.daemon = True
            timer.start()
        elif event.event in ("config.failed", "device.unplanned"):
            self._jobs.put(partial(self._failed, event.device_id, event.event, event.reason))

    def _scan(self) -> None:
        """On the worker: every device, to be compared with what was last queued."""
        self._dirty.update(r.device_id for r in self.c.store.all())
        self._wake.set()

    def _queue_inventory(self) -> None:
        while self._dirty:
            device_id = self._dirty.pop()
            record = self.c.store.get(device_id)
            if record is None and device_id not in self._forgotten:
                continue
            data = {"forgotten": True} if record is None else inventory(record)
            self._forgotten.discard(device_id)
            d = digest(data)
            if self.state.queued_digest(device_id) != d:
                self.state.enqueue("/v1/service/report", {"kind": "inventory", "device_id": device_id, "data": data},
                                   device_id, d)

    # --- the sender: outbox, backup ------------------------------------------------------------

    def _send(self) -> None:
        delay, last_backup, last_quality = 1.0, 0.0, time.monotonic()
        while not self._halt.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if time.monotonic() - last_quality >= self.settings.quality_interval:
                last_quality = time.monotonic()
                for device_id in self._on_worker(lambda: [r.device_id for r in self.c.store.all()]):
                    self._jobs.put(partial(self.check_quality, device_id))
            try:
                self._queue_inventory()
                while (pending := self.state.next_pending()) is not None and not self._halt.is_set():
                    try:
                        self._call(pending.path, "cloud.report", Report.model_validate(pending.body), 10)
                    except CloudError as exc:
                        if not exc.refused or "cloud.hello first" in str(exc):
                            raise
                        log.error("cloud refused report %s, dropped: %s", pending.report_id, exc)
                    self.state.delivered(pending.n)
                if self._backup_due and time.monotonic() - last_backup >= self.settings.backup_interval:
                    self._backup_due = False
                    last_backup = time.monotonic()
                    self._backup()
                delay = 1.0
            except CloudError as exc:
                log.info("cloud link: %s; %d reports wait in the outbox, retrying in %.0f s", exc,
                         self.state.pending_count(), delay)
                if self._halt.wait(delay):
                    return
                delay = min(delay * 2, 30)
                self._wake.set()

    def _backup(self) -> None:
        devices, meta = self._on_worker(lambda: ([r.to_doc() for r in self.c.store.all()], self.c.store.meta()))
        version = self.state.meta("backup_version", 0) + 1
        try:
            self._call("/v1/service/backup/put", "cloud.backup.put", Backup(version=version, devices=devices, meta={
                k: meta[k] for k in ("epoch", "seq_reserved", "lan", "retired") if k in meta}), 30)
        except CloudError:
            self._backup_due = True
            raise
        self.state.set_meta(backup_version=version)

    # --- failure information -------------------------------------------------------------------

    def _poll_failures(self) -> None:
        delay = 1.0
        while not self._halt.is_set():
            cursor = self.state.meta("failure_cursor", 0)
            try:
                result = self._call("/v1/failure/poll", "cloud.failures.poll",
                                    FailurePoll(after=cursor, wait=self.settings.poll_wait),
                                    self.settings.poll_wait + 10)
            except CloudError as exc:
                log.debug("failure poll: %s", exc)
                if self._halt.wait(delay):
                    return
                delay = min(delay * 2, 30)
                continue
            delay = 1.0
            for notice in result["items"]:
                self.state.put_failure(notice, result["cursor"])
                if notice["active"]:
                    self._event("cloud.failure", Severity.WARNING, reason=f"{notice['service']}: {notice['summary']}",
                                failure_id=notice["failure_id"], service=notice["service"])
                else:
                    self._event("cloud.failure.resolved", reason=f"{notice['service']}: {notice['summary']}",
                                failure_id=notice["failure_id"], service=notice["service"])
            self.state.set_meta(failure_cursor=result["cursor"])

    def _explained(self, what: str) -> dict[str, Any] | None:
        """The active outage that accounts for a failure of `what` (an item kind, or `quality`)."""
        return next((f for f in self.state.active_failures() if what in EXPLAINS.get(f["service"], ())), None)

    # --- quality check and diagnosis -----------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except CloudError as exc:
                log.info("cloud link: %s", exc)
            except Exception:  # a bug must not stop the link
                log.exception("internal error in the cloud link")

    def check_quality(self, device_id: str, remedied: bool = False) -> dict[str, Any] | None:
        """Ask the quality check server about the device's port forwards; its verdict is kept,
        published, and if it failed diagnosed (`remedied`: this check follows a remedy)."""
        record = self.c.store.get(device_id)
        ports = [i.external_port for i in (record.config.items if record and record.config else [])
                 if isinstance(i, PortMappingItem) and i.protocol == "tcp" and i.target == Target.GATEWAY]
        if record is None or not ports:
            return None
        cached = self._profiles.get((record.info.maker, record.info.model))
        av = record.info.device_type in AV_TYPES or bool(cached and cached.doc and cached.doc.get("av"))
        verdict = self._call("/v1/quality/check", "cloud.quality.check", QualityRequest(
            device_id=device_id, ports=[PortCheck(port=p) for p in ports], samples=5 if av else 1), 60)
        self.state.note(device_id, "quality", verdict)
        if verdict["passed"]:
            self._event("quality.passed", device_id=device_id, reason=f"reachable from {verdict['address']}",
                        ports=verdict["ports"])
            return verdict
        outage = self._explained("quality")
        if outage:
            self._event("cloud.explained", device_id=device_id,
                        reason=f"quality check failed ({verdict['reason']}), explained by service failure "
                               f"#{outage['failure_id']}: {outage['summary']}")
            return verdict
        self._event("quality.failed", Severity.WARNING, device_id=device_id, reason=verdict["reason"],
                    ports=verdict["ports"])
        if not remedied:
            self._diagnose(record, "quality.failed", quality=verdict)
        return verdict

    def _failed(self, device_id: str, trigger: str, reason: str) -> None:
        record = self.c.store.get(device_id)
        if record is None:
            return
        failed = [r.item for r in (record.result.items if record.result else [])
                  if r.status not in (ItemStatus.APPLIED, ItemStatus.UNCHANGED)]
        outage = next((o for o in map(self._explained, {f.split(":")[0] for f in failed}) if o), None)
        if failed and outage and all(self._explained(f.split(":")[0]) for f in failed):
            self._event("cloud.explained", device_id=device_id,
                        reason=f"{trigger} ({reason}) explained by service failure #{outage['failure_id']}: "
                               f"{outage['summary']}")
            return
        self.state.enqueue("/v1/failure/report", {"kind": "failure", "device_id": device_id,
                                                  "data": {"trigger": trigger, "reason": reason}})
        self._wake.set()
        self._diagnose(record, trigger)

    def _diagnose(self, record: DeviceRecord, trigger: str, quality: dict[str, Any] | None = None) -> None:
        device_id = record.device_id

        def gateway() -> dict[str, Any]:
            actual = self.c.driver.actual()
            if actual is None or record.config is None:
                return {}
            found = gateway_drift(record, GatewayListing(actual)).findings
            return {"missing": [f.item for f in found if f.drift == Drift.GATEWAY_MISSING]}

        bundle = DiagnosisBundle(
            bundle_id=hashlib.sha256(f"{device_id}:{trigger}:{time.time_ns()}".encode()).hexdigest()[:32],
            device_id=device_id, trigger=trigger,
            device=record.info.model_dump(mode="json", exclude={"public_key"}),
            config=record.config.model_dump(mode="json") if record.config else None,
            result=record.result.model_dump(mode="json") if record.result else None,
            quality=quality, gateway=self._on_worker(gateway),
            events=[e.model_dump(mode="json") for e in self._recent if e.device_id == device_id][-20:],
            failures=[f["failure_id"] for f in self.state.active_failures()])
        diagnosis = self._call("/v1/diagnosis", "cloud.diagnosis", bundle, 30)
        taken = diagnosis.get("action") == "reconcile"
        self.state.note(device_id, "diagnosis", {**diagnosis, "taken": taken})
        self._event("diagnosis", Severity.WARNING, device_id=device_id,
                    reason=f"{diagnosis['cause']}; remedy: {diagnosis['remedy']}"
                           + ("; taking it: reconciling now" if taken else ""),
                    rule=diagnosis.get("rule"), action=diagnosis.get("action"), taken=taken)
        if taken:
            self.c.reconcile_now()
            if quality is not None:
                self._on_worker(lambda: None)  # the reconciliation is queued before this: wait for it
                time.sleep(1.0)  # the correction runs after that batch's commit
                self.check_quality(device_id, remedied=True)


def restore(settings: CloudSettings, key: Any, data_dir: Path, store: Any) -> int:
    """A fresh gateway given this home's identity: its configuration from the backup (bounded).
    Returns the number of devices restored (0: no backup, or the cloud did not answer)."""
    state = CloudState(Path(data_dir) / FILE_NAME)
    try:
        client, _ = make_client(settings, key, state)
        client.hello(settings.region, settings.lookup_timeout * 4)
        backup = client.call("/v1/service/backup/get", "cloud.backup.get", BackupQuery(),
                             settings.lookup_timeout * 4)["backup"]
        state.set_meta(cloud_key=b64(client.cloud_key or b""))
    except CloudError as exc:
        log.warning("no backup restored from the cloud: %s", exc)
        return 0
    finally:
        state.close()
    if not backup:
        return 0
    with store.transaction():
        for doc in backup["devices"]:
            store.put(DeviceRecord.model_validate(doc))
        meta = backup.get("meta", {})
        store.set_meta(**{k: meta[k] for k in ("lan", "epoch", "retired") if k in meta},
                       seq_reserved=int(meta.get("seq_reserved", 0)) + RESTORE_SEQ_GAP)
    log.info("restored %d devices from the cloud backup (version %d)", len(backup["devices"]), backup["version"])
    return len(backup["devices"])


__all__ = ["CloudLink", "restore"]
