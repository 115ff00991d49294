"""The home side of the cloud link against a real `homenet cloud run`: Sequence 1 with the
service server's profile, offline first (the cloud killed), the durable outbox across a
configurator kill -9, and the operator's failure notices reaching the home."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homenet.brokers import Embedded
from homenet.configurator.app import KEY_NAME
from homenet.configurator.lifecycle import State
from homenet.configurator.cloudlink import CloudLink
from homenet.configurator.cloudstate import FILE_NAME, CloudState, cloud_detail
from homenet.schemas.messages import PortMappingItem
from homenet.settings import CloudSettings

from .cloudlab import CloudServer, homenet_bin
from .harness import Gateway, wait_until
from .processes import Process

NAS = {"maker": "Acme", "model": "Test nas", "name": "acme-nas", "qos": "bulk",
       "ports": [{"protocol": "tcp", "port": 8443, "description": "web"}]}


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CloudServer]:
    srv = CloudServer(tmp_path, None)
    srv.start()
    srv.request("PUT", "/v1/operator/profiles/Acme/Test%20nas", NAS)
    yield srv
    srv.kill()


def link_settings(cloud: CloudServer, **more: object) -> CloudSettings:
    return CloudSettings(url=cloud.url, home_id="home-1", region="north", backup_interval=0.5, **more)


@pytest.fixture
def home(embedded: Embedded, tmp_path: Path, cloud: CloudServer) -> Iterator[Gateway]:
    gw = Gateway(embedded, tmp_path, cloud=link_settings(cloud))
    gw.start()
    yield gw
    gw.close()


def link(gw: Gateway) -> CloudLink:
    assert gw.configurator is not None
    return next(e for e in gw.configurator.extensions if isinstance(e, CloudLink))


def inventory(cloud: CloudServer, device_id: str) -> list[dict]:
    return [r["data"] for r in cloud.get("/v1/operator/homes/home-1/inventory") if r["device_id"] == device_id]


def test_sequence_1_gives_a_known_model_its_service_profile_and_reports_it(home: Gateway, cloud: CloudServer) -> None:
    home.agent("nas", "nas-1", maker="Acme")
    record = home.wait_configured("nas-1")
    assert record.profile == "acme-nas"
    assert [i.internal_port for i in record.config.items if isinstance(i, PortMappingItem)] == [8443]
    home.agent("nas", "nas-2", maker="Other")  # no profile for its model: the built-in one
    assert home.wait_configured("nas-2").profile == "nas"
    wait_until(lambda: any(r["state"] == "configured" and r["profile"] == "acme-nas"
                           for r in inventory(cloud, "nas-1")), 10, "nas-1's inventory report")
    backup = wait_until(lambda: cloud_backup(cloud), 10, "a backup")
    assert {"nas-1", "nas-2"} <= backup


def cloud_backup(cloud: CloudServer) -> set[str]:
    """The device ids in the home's latest backup, read from the cloud's database."""
    db = sqlite3.connect(cloud.tmp / "cloud-data" / "cloud.db")
    try:
        row = db.execute("SELECT doc FROM service_backups WHERE home_id = 'home-1'").fetchone()
    finally:
        db.close()
    return {d["device_id"] for d in json.loads(row[0])["devices"]} if row else set()


def test_cloud_down_onboards_with_the_built_in_profile_within_the_bound(home: Gateway, cloud: CloudServer) -> None:
    home.agent("generic", "warmup")
    home.wait_configured("warmup")
    cloud.kill()
    started = time.monotonic()
    home.agent("nas", "nas-1", maker="Acme")
    record = home.wait_configured("nas-1", timeout=20)
    took = time.monotonic() - started
    assert record.profile == "nas" and took < 1.5 + 3, took  # the bound, plus an onboarding
    state = CloudState(home.data_dir / FILE_NAME, read_only=True)
    assert wait_until(state.pending_count, 10, "reports waiting in the outbox")
    state.close()
    cloud.start()  # the same database
    wait_until(lambda: inventory(cloud, "nas-1"), 40, "the inventory delivered once the cloud is back")
    # the profile arrives behind the planning: the device is re-planned with it
    wait_until(lambda: (r := home.record("nas-1")) and r.profile == "acme-nas", 40, "re-planned with the profile")


def test_a_published_failure_reaches_the_home_within_5_s(home: Gateway, cloud: CloudServer) -> None:
    wait_until(lambda: link(home)._hello, 10, "the link's hello")
    time.sleep(0.5)  # the long-poll is open
    published = time.monotonic()
    cloud.request("POST", "/v1/operator/failures", {"service": "iptv", "summary": "multicast down in north",
                                                    "region": "north"})
    assert home.watcher is not None
    event = home.watcher.wait_event("cloud.failure", timeout=5, reason="multicast down")
    assert time.monotonic() - published < 5 and event["detail"]["service"] == "iptv"
    home.agent("generic", "pc")
    home.wait_configured("pc")
    assert "service failure #1 (iptv): multicast down in north" in cloud_detail(home.data_dir, "pc")


def test_configurator_killed_with_reports_pending_loses_and_duplicates_none(
        embedded: Embedded, tmp_path: Path, cloud: CloudServer) -> None:
    cloud.kill()  # reports pile up in the outbox
    settings = tmp_path / "gateway.toml"
    data = tmp_path / "gw"
    settings.write_text(f'''
[configurator]
broker = "{embedded.url}"
data_dir = "{data}"
[configurator.cloud]
url = "{cloud.url}"
home_id = "home-1"
lookup_timeout = 0.5
''')
    proc = Process(tmp_path / "configurator.log", homenet_bin(), "configurator", "run", "--config", str(settings))
    gw = Gateway(embedded, tmp_path)
    try:
        wait_until(lambda: (data / FILE_NAME).exists(), 20, "the configurator's cloud state")
        for i in range(5):
            gw.agent("generic", f"dev-{i}")

        def pending() -> int:
            state = CloudState(data / FILE_NAME, read_only=True)
            try:
                return state.pending_count()
            finally:
                state.close()
        wait_until(lambda: pending() >= 5, 30, "5 reports pending")
        proc.kill()  # kill -9
        waiting = pending()
        cloud.start()
        proc = Process(tmp_path / "configurator.log", homenet_bin(), "configurator", "run", "--config", str(settings))
        wait_until(lambda: pending() == 0, 40, "the outbox delivered")
        reports = cloud.get("/v1/operator/homes/home-1/inventory")
        ids = [r["report_id"] for r in reports]
        assert len(ids) == len(set(ids)) >= waiting  # none duplicated
        latest = {r["device_id"]: r["data"] for r in reports}
        assert {f"dev-{i}" for i in range(5)} <= set(latest)  # none lost
    finally:
        proc.kill()
        gw.close()


def test_a_replacement_gateway_restores_the_home_from_its_backup(
        embedded: Embedded, tmp_path: Path, cloud: CloudServer) -> None:
    old = Gateway(embedded, tmp_path, cloud=link_settings(cloud))
    old.start()
    for device_type in ("nas", "iptv-stb"):
        old.agent(device_type, f"{device_type}-1")
    before = {d: old.wait_configured(d) for d in ("nas-1", "iptv-stb-1")}
    wait_until(lambda: cloud_backup(cloud) == set(before), 10, "both devices in the backup")
    agents = old.agents
    old.agents = []  # the devices stay up; only the gateway is replaced
    old.stop()

    new_tmp = tmp_path / "replacement"
    (new_tmp / "gateway").mkdir(parents=True)
    shutil.copy(old.data_dir / KEY_NAME, new_tmp / "gateway" / KEY_NAME)  # the home's identity
    new = Gateway(embedded, new_tmp, cloud=link_settings(cloud))
    new.agents = agents
    new.start()
    try:
        for device_id, was in before.items():
            now = new.record(device_id)
            assert now is not None and now.state == State.CONFIGURED and now.address == was.address
            assert now.version == was.version  # nothing re-sent: the devices already have it
        assert new.configurator is not None
        state = new.configurator.driver.state()
        assert {r.device_id: str(r.address) for r in state.reservations} == \
            {d: r.address for d, r in before.items()}
        assert [m.device_id for m in state.port_mappings] == ["nas-1"]
        # the devices come back to the new gateway (same key, same broker) without a person
        assert new.watcher is not None
        new.watcher.messages.clear()
        for agent in agents:
            agent.stop()
            agent.start()
        for device_id in before:
            new.watcher.wait_event("device.online", timeout=15, device_id=device_id)
    finally:
        new.close()


def test_what_an_outage_explains_is_neither_reported_nor_diagnosed(home: Gateway, cloud: CloudServer) -> None:
    from homenet.schemas.messages import ItemResult, ItemStatus, ResultStatus

    home.agent("iptv-stb", "stb")
    record = home.wait_configured("stb")
    assert home.configurator is not None and record.result is not None
    igmp_failed = record.model_copy(update={"result": record.result.model_copy(update={
        "status": ResultStatus.FAILED,
        "items": [ItemResult(item="igmp", status=ItemStatus.FAILED, detail="no multicast")]})})
    home.configurator.submit(lambda: home.configurator.store.put(igmp_failed))
    wait_until(lambda: (r := home.record("stb")) and r.result.status == ResultStatus.FAILED, 5, "the failed result")

    cloud.request("POST", "/v1/operator/failures", {"service": "iptv", "summary": "multicast down", "region": "north"})
    wait_until(lambda: link(home).state.active_failures(), 5, "the outage known at home")
    link(home)._failed("stb", "config.failed", "igmp: no multicast")
    assert home.watcher is not None
    home.watcher.wait_event("cloud.explained", reason="explained by service failure #1")
    assert cloud.get("/v1/operator/homes/home-1/diagnoses") == []

    cloud.request("POST", "/v1/operator/failures/1/resolve")
    wait_until(lambda: not link(home).state.active_failures(), 5, "the outage over")
    link(home)._failed("stb", "config.failed", "igmp: no multicast")
    wait_until(lambda: cloud.get("/v1/operator/failure-reports"), 10, "the failure reported upstream")
    assert [d["device_id"] for d in cloud.get("/v1/operator/homes/home-1/diagnoses")] == ["stb"]
