"""Prometheus metrics and the health check, read over HTTP and parsed by Prometheus' own parser."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from homenet.brokers import Embedded
from homenet.configurator.app import build
from homenet.configurator.extensions.metrics import reason_class
from homenet.mqtt import make_client
from homenet.netutil import free_port
from homenet.schemas.messages import Event, Severity
from homenet.settings import GatewaySettings, HomeAssistantSettings, HttpSettings, Switch

from .harness import Gateway, wait_until


@pytest.fixture
def gateway(embedded: Embedded, tmp_path: Path) -> Iterator[Gateway]:
    port = free_port()
    settings = GatewaySettings(http=HttpSettings(listen=["127.0.0.1"], port=port), web=Switch(enabled=False),
                               homeassistant=HomeAssistantSettings(enabled=False))
    gw = Gateway(embedded, tmp_path, extensions=settings)
    gw.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    gw.start()
    yield gw
    gw.close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(gateway: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(gateway.url + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def publish(gateway: Gateway, topic: str, payload: bytes) -> None:
    client = make_client("test-stranger", clean_session=True)
    client.connect("127.0.0.1", gateway.broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_metrics_count_devices_onboarding_rejections_commits_and_gateway_failures(gateway: Any) -> None:
    gateway.agent("nas")
    gateway.wait_configured("test-nas")
    publish(gateway, "homenet/v1/device/test-nas/info", b"not json")
    gateway.watcher.wait_event("message.rejected")
    gateway.configurator.bus.emit(Event(event="gateway.failed", severity=Severity.ERROR, reason="qos: tc failed"))

    found = wait_until(lambda: (s := samples(gateway)).get(
        ("homenet_messages_rejected_total", (("reason", "malformed"),))) == 1 and s, what="the rejection counted")
    assert found[("homenet_devices", (("state", "configured"),))] == 1
    assert found[("homenet_devices", (("state", "pending"),))] == 0
    assert found[("homenet_onboarding_seconds_count", ())] == 1
    assert 0 < found[("homenet_onboarding_seconds_sum", ())] < 15
    assert found[("homenet_store_commit_seconds_count", ())] >= 2
    assert found[("homenet_gateway_failures_total", (("driver", "memory"),))] == 1
    assert found[("homenet_configurator_serving", ())] == 1


def test_health_says_serving_and_a_stood_down_configurator_is_not_healthy(gateway: Any) -> None:
    status, body = get(gateway.url + "/healthz")
    assert status == 200 and json.loads(body)["serving"] is True

    newer = build(gateway.configurator.settings)  # claims the next epoch: the running one is fenced
    try:
        gateway.agent("nas")  # its next commit finds the newer epoch and stands down
        wait_until(gateway.configurator.fenced.is_set, what="the configurator stood down")
        status, body = get(gateway.url + "/healthz")
        assert status == 503
        assert json.loads(body) | {"epoch": 0} == {"serving": False, "primary": False, "connected": False,
                                                   "configurator_id": "configurator", "epoch": 0}
        assert samples(gateway)[("homenet_configurator_serving", ())] == 0
    finally:
        newer.driver.close()
        newer.store.close()


@pytest.mark.parametrize("reason, label", [
    ("bad or missing signature: info not signed by the key bound to nas-1 (ab12)", "signature"),
    ("replayed or out of order: seq 4 is not above 9, the last accepted from nas-1", "replay"),
    ("payload of 300000 bytes is over the 262144-byte limit", "too_large"),
    ("stale config.result for version 2; current is 3", "stale"),
    ("bad envelope: seq: field required", "malformed"),
    ("info from x, which has not registered", "unknown_device"),
    ("something new", "other"),
])
def test_rejection_reasons_fold_into_few_labels(reason: str, label: str) -> None:
    assert reason_class(reason) == label


def test_gateway_run_serves_health_and_the_page(tmp_path: Path, started: list) -> None:
    import sys

    from .processes import Process

    mqtt, http = free_port(), free_port()
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'[http]\nlisten = ["127.0.0.1"]\nport = {http}\n')
    proc = Process(tmp_path / "gateway.log", str(Path(sys.executable).parent / "homenet"), "gateway", "run",
                   "--config", str(conf), "--listen", f"127.0.0.1:{mqtt}", "--data-dir", str(tmp_path / "gw"))
    started.append(proc)

    def healthy() -> bool:
        try:
            return get(f"http://127.0.0.1:{http}/healthz")[0] == 200
        except OSError:
            return False

    wait_until(healthy, timeout=20, what="gateway run healthy")
    status, page = get(f"http://127.0.0.1:{http}/")
    assert status == 200 and b"<title>homenet</title>" in page
    assert proc.terminate() == 0


def test_the_lan_listener_serves_only_its_interface_and_a_missing_one_is_said(caplog: Any) -> None:
    from homenet.configurator.extensions.http import open_sockets

    port = free_port()
    sockets = open_sockets(HttpSettings(listen=["lan"], port=port), "lo")
    try:
        assert len(sockets) == 1 and sockets[0].getsockopt(1, 25, 16).rstrip(b"\0") == b"lo"  # SO_BINDTODEVICE
    finally:
        for s in sockets:
            s.close()
    assert open_sockets(HttpSettings(listen=["lan"], port=port), "nosuch0") == []
    assert "no LAN interface nosuch0 here" in caplog.text
