"""The cloud servers in the WAN namespace, a home behind a Linux gateway (tests/gatewaylab.py):
the quality check server connects in through the NAS's port forward; with the DNAT rule
deleted the check fails, the diagnosis names the port forward, and the remedy it names
(reconciliation) is taken, after which the check passes again."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .gatewaylab import WAN_GW, WAN_HOST, start_linux_home
from .harness import wait_until
from .netns import Lab
from .test_day0 import HOMENET
from .test_gateway_linux import serving_nas

CLOUD_PORT = 8620  # the WAN namespace is new: nothing else listens there
HEALTH = f"import urllib.request; urllib.request.urlopen('http://{WAN_HOST}:{CLOUD_PORT}/health', timeout=2)"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def test_quality_check_through_the_nas_forward_and_diagnosis_repairs_a_deleted_dnat(lab: Lab, tmp_path: Path) -> None:
    home = start_linux_home(lab, tmp_path, reconcile_interval=600)  # only the diagnosis' remedy repairs
    assert home.wan is not None
    home.wan.popen(HOMENET, "cloud", "run", "--listen", f"{WAN_HOST}:{CLOUD_PORT}", "--data-dir", str(tmp_path / "cloud"),
                   stdout=(tmp_path / "cloud.log").open("a"), stderr=subprocess.STDOUT)
    wait_until(lambda: home.wan.run("python3", "-c", HEALTH, check=False).returncode == 0, 20, "the cloud up")
    with home.conf.open("a") as conf:
        conf.write(f'\n[configurator.cloud]\nurl = "http://{WAN_HOST}:{CLOUD_PORT}"\nhome_id = "home-ns"\n'
                   f'quality_interval = 2\n')
    home.start_dnsmasq()
    home.start_gateway()
    _nas, _proc, _log, record, mapping = serving_nas(home)
    passed = home.wait_log(f"quality.passed device={record.device_id}", 20)
    assert f"reachable from {WAN_GW}" in passed  # the cloud saw the gateway's WAN address and connected in

    listing = json.loads(home.gw.run("nft", "-j", "-a", "list", "chain", "inet", "homenet", "port_forward").stdout)
    dnat = next(e["rule"] for e in listing["nftables"] if "rule" in e
                and f"port_mapping:tcp/{mapping.external_port}" in e["rule"].get("comment", ""))
    home.gw.run("nft", "delete", "rule", "inet", "homenet", "port_forward", "handle", str(dnat["handle"]))

    failed = home.wait_log("quality.failed", 20)
    assert f"tcp/{mapping.external_port} on {WAN_GW} not reachable from outside" in failed
    diagnosis = home.wait_log("the port forward is missing on the gateway", 20)
    assert "taking it: reconciling now" in diagnosis
    wait_until(lambda: home.log().count(f"quality.passed device={record.device_id}") >= 2, 30,
               "the check passing after the repair")
    assert f"drift.detected device={record.device_id}: gateway_missing port_mapping:tcp/{mapping.external_port}" \
        in home.log()  # reconciliation saw it and, as `drift = "correct"`, put it back
    db = sqlite3.connect(tmp_path / "cloud" / "cloud.db")
    try:
        rules = [json.loads(d)["rule"] for (d,) in db.execute("SELECT diagnosis FROM diagnosis_bundles")]
        bundle = json.loads(db.execute("SELECT bundle FROM diagnosis_bundles").fetchone()[0])
    finally:
        db.close()
    assert rules[0] == "port-forward-missing"
    assert bundle["gateway"]["missing"] == [f"port_mapping:tcp/{mapping.external_port}"]
    assert "public_key" not in bundle["device"]
