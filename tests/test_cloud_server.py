"""The cloud servers as real processes, on a real PostgreSQL and on SQLite: the four roles,
two processes on one database, and bad input refused with nothing stored."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from homenet.keys import KeyPair
from homenet.schemas import encode
from homenet.schemas.cloud import (CLOUD_BODIES, Backup, BackupQuery, DiagnosisBundle, FailurePoll, Hello,
                                   PortCheck, ProfileQuery, QualityRequest, Report, ReportKind)
from homenet.schemas.signing import b64
from homenet.configurator.cloudclient import CloudClient, CloudError
from homenet.netutil import free_port

from homenet.postgres import Postgres, postgres_bin

from .cloudlab import CloudServer, homenet_bin
from .conftest import IN_CI

NAS = {"maker": "Acme", "model": "NAS 4000", "name": "acme-nas", "qos": "bulk",
       "ports": [{"protocol": "tcp", "port": 443, "description": "web"}, {"protocol": "tcp", "port": 22}]}


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    if postgres_bin() is None:
        message = "PostgreSQL is not installed (Debian package postgresql)"
        if IN_CI:
            pytest.fail(message + ": CI must install it (.ci/run)")
        pytest.skip(message)
    pg = Postgres()
    pg.start()
    yield pg
    pg.stop()


_databases = count()


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """A fresh database per test: a new PostgreSQL database on the module's server, or SQLite."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").create_database(f"t{next(_databases)}")


@pytest.fixture
def server(tmp_path: Path, database: str | None) -> Iterator[CloudServer]:
    srv = CloudServer(tmp_path, database)
    srv.start()
    yield srv
    srv.kill()


class Home:
    """A home's signing side, as its configurator's cloud link has it."""

    def __init__(self, url: str, home_id: str = "home-1", region: str = "north") -> None:
        self.key = KeyPair.generate()
        self.seq = count(1)
        self.client = CloudClient(url, home_id, self.key, lambda: next(self.seq))
        self.client.hello(region, timeout=10)

    def call(self, path: str, kind: str, body: object) -> dict:
        return self.client.call(path, kind, body, timeout=30)


def test_service_profiles_reports_and_backup(server: CloudServer) -> None:
    server.request("PUT", "/v1/operator/profiles/Acme/NAS%204000", NAS)
    home = Home(server.url)
    got = home.call("/v1/service/profile", "cloud.profile.get", ProfileQuery(maker="Acme", model="NAS 4000"))
    assert got["profile"]["name"] == "acme-nas" and [p["port"] for p in got["profile"]["ports"]] == [443, 22]
    assert home.call("/v1/service/profile", "cloud.profile.get",
                     ProfileQuery(maker="Acme", model="other"))["profile"] is None
    report = Report(report_id="r" * 12, kind=ReportKind.INVENTORY, device_id="nas", data={"state": "configured"})
    assert home.call("/v1/service/report", "cloud.report", report)["stored"] is True
    assert home.call("/v1/service/report", "cloud.report", report)["duplicate"] is True  # exactly once
    assert [r["report_id"] for r in server.get("/v1/operator/homes/home-1/inventory")] == ["r" * 12]
    home.call("/v1/service/backup/put", "cloud.backup.put", Backup(version=2, devices=[{"device_id": "nas"}]))
    home.call("/v1/service/backup/put", "cloud.backup.put", Backup(version=1, devices=[]))  # older: ignored
    assert home.call("/v1/service/backup/get", "cloud.backup.get", BackupQuery())["backup"]["devices"] == \
        [{"device_id": "nas"}]
    assert "/v1/service/profile" in server.get("/openapi.json", auth=False)["paths"]


def test_failure_published_reaches_a_waiting_home_and_only_the_homes_concerned(server: CloudServer) -> None:
    north, south = Home(server.url, "home-n", "north"), Home(server.url, "home-s", "south")
    answers: dict[str, tuple[float, dict]] = {}

    def wait(home: Home, name: str) -> None:
        answers[name] = (time.monotonic(), home.call("/v1/failure/poll", "cloud.failures.poll",
                                                     FailurePoll(after=0, wait=3)))

    threads = [threading.Thread(target=wait, args=(h, n)) for h, n in ((north, "n"), (south, "s"))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    published = time.monotonic()
    server.request("POST", "/v1/operator/failures", {"service": "iptv", "summary": "multicast down", "region": "north"})
    for t in threads:
        t.join()
    at, result = answers["n"]
    assert [f["summary"] for f in result["items"]] == ["multicast down"] and at - published < 2
    assert answers["s"][1]["items"] == []  # waited its 3 s: not its region
    report = Report(report_id="f" * 12, kind=ReportKind.FAILURE, device_id="stb", data={"reason": "no address"})
    assert north.call("/v1/failure/report", "cloud.report", report)["stored"]
    with pytest.raises(CloudError, match="takes failure reports"):
        north.call("/v1/failure/report", "cloud.report", report.model_copy(update={"kind": ReportKind.INVENTORY}))


def test_quality_check_connects_in_and_diagnosis_follows_the_rules(server: CloudServer) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    open_port, closed_port = listener.getsockname()[1], free_port()
    home = Home(server.url)
    ok = home.call("/v1/quality/check", "cloud.quality.check",
                   QualityRequest(device_id="nas", ports=[PortCheck(port=open_port)], samples=3))
    assert ok["passed"] and ok["ports"][0]["loss_permille"] == 0 and "p50" in ok["ports"][0]["latency_us"]
    bad = home.call("/v1/quality/check", "cloud.quality.check",
                    QualityRequest(device_id="nas", ports=[PortCheck(port=closed_port)]))
    assert not bad["passed"] and f"tcp/{closed_port}" in bad["reason"]
    listener.close()
    bundle = DiagnosisBundle(bundle_id="b" * 12, device_id="nas", trigger="quality.failed", quality=bad,
                             gateway={"missing": [f"port_mapping:tcp/{closed_port}"]})
    diagnosis = home.call("/v1/diagnosis", "cloud.diagnosis", bundle)
    assert diagnosis["rule"] == "port-forward-missing" and diagnosis["action"] == "reconcile"
    server.request("PUT", "/v1/operator/rules/isp-blocks-smb", {
        "name": "isp-blocks-smb", "priority": 5, "trigger": ["quality.failed"],
        "cause": "the ISP blocks this port", "remedy": "use another port"})
    again = home.call("/v1/diagnosis", "cloud.diagnosis", bundle.model_copy(update={"bundle_id": "c" * 12}))
    assert again["rule"] == "isp-blocks-smb"
    assert len(server.get("/v1/operator/homes/home-1/diagnoses")) == 2


def _signed(key: KeyPair, kind: str, body: object, sender: str = "home-1", seq: int = 1) -> bytes:
    return encode(kind, body, sender=sender, seq=seq, sign=key.sign, bodies=CLOUD_BODIES)[1]


def test_bad_input_is_refused_with_a_reason_and_nothing_stored(server: CloudServer) -> None:
    home = Home(server.url)  # seq 1 used by its hello
    query = ProfileQuery(maker="Acme", model="x")
    report = Report(report_id="z" * 12, kind=ReportKind.INVENTORY, device_id="nas")
    unsigned = encode("cloud.report", report, sender="home-1", seq=5, bodies=CLOUD_BODIES)[1]
    forged = _signed(KeyPair.generate(), "cloud.report", report, seq=6)
    cases = {
        "unsigned": ("/v1/service/report", unsigned, 401, "bad or missing signature"),
        "forged": ("/v1/service/report", forged, 401, "bad or missing signature"),
        "replayed": ("/v1/service/report", _signed(home.key, "cloud.report", report, seq=1), 409, "replayed"),
        "another home's id": ("/v1/service/report", _signed(home.key, "cloud.report", report, sender="home-2", seq=7),
                              403, "unknown home 'home-2'"),
        "oversized": ("/v1/service/report", b"{" + b" " * 70000 + b"}", 413, "over the 65536-byte limit"),
        "malformed JSON": ("/v1/service/report", b'{"v": 1, "kind": ', 400, "not JSON"),
        "wrong kind": ("/v1/service/report", _signed(home.key, "cloud.profile.get", query, seq=8), 400,
                       "on a topic that carries 'cloud.report'"),
        "another key for the home": ("/v1/hello", _signed(KeyPair.generate(), "cloud.hello",
                                                          Hello(public_key=b64(KeyPair.generate().public)), seq=9),
                                     401, "not signed by the key it carries"),
    }
    for name, (path, payload, status, reason) in cases.items():
        got_status, reply = server.raw(path, payload)
        assert (got_status, reason in reply["error"]) == (status, True), (name, got_status, reply)
    other = KeyPair.generate()
    status, reply = server.raw("/v1/hello", _signed(other, "cloud.hello", Hello(public_key=b64(other.public)), seq=10))
    assert status == 403 and "another key" in reply["error"]
    assert server.get("/v1/operator/homes/home-1/inventory") == []  # nothing stored
    assert [h["home_id"] for h in server.get("/v1/operator/homes")] == ["home-1"]
    status, reply = server.raw("/v1/operator/failures", json.dumps({"service": "dns", "summary": "x"}).encode())
    assert status == 401 and "operator token" in reply["error"]  # no token
    assert server.get("/v1/operator/failures") == []


def test_two_processes_on_one_postgresql_serve_any_request(tmp_path: Path, postgres: Postgres) -> None:
    first, second = CloudServer(tmp_path, postgres.url, "cloud-a"), CloudServer(tmp_path, postgres.url, "cloud-b")
    for s in (first, second):
        s.start()
    try:
        first.request("PUT", "/v1/operator/profiles/Acme/NAS%204000", NAS)
        home = Home(first.url, "home-two")
        home.client.url = second.url  # the same home, now through the other process
        assert home.call("/v1/service/profile", "cloud.profile.get",
                         ProfileQuery(maker="Acme", model="NAS 4000"))["profile"]["name"] == "acme-nas"
        for i in range(10):  # spread over both; each report once
            home.client.url = (first, second)[i % 2].url
            home.call("/v1/service/report", "cloud.report",
                      Report(report_id=f"report-{i:04d}", kind=ReportKind.INVENTORY, device_id="nas"))
        assert len(second.get("/v1/operator/homes/home-two/inventory")) == 10
        assert first.get("/health", auth=False)["public_key"] == second.get("/health", auth=False)["public_key"]
    finally:
        first.kill()
        second.kill()


def test_the_replay_window_takes_each_seq_once_and_late_ones_only_within_it() -> None:
    from homenet.cloud.homes import REPLAY_WINDOW, accept_seq
    high, mask = accept_seq(0, 0, 10)
    assert high == 10
    assert accept_seq(high, mask, 10) is None  # the same seq again
    high, mask = accept_seq(high, mask, 8)  # late, inside the window
    assert accept_seq(high, mask, 8) is None and high == 10
    high, mask = accept_seq(high, mask, 12)
    assert accept_seq(high, mask, 11) is not None and accept_seq(high, mask, 8) is None  # 8 still remembered
    assert accept_seq(high, mask, 12 - REPLAY_WINDOW - 1) is None  # too old to tell
    far, far_mask = accept_seq(high, mask, 12 + REPLAY_WINDOW + 5)
    assert far_mask == 0 and accept_seq(far, far_mask, far - 1) is not None


def test_the_operator_cli_manages_profiles_and_says_what_was_refused(tmp_path: Path) -> None:
    server = CloudServer(tmp_path, None)
    server.start()
    try:
        def cloud(*args: str, token: Path = server.token_file) -> subprocess.CompletedProcess[str]:
            return subprocess.run([homenet_bin(), "cloud", *args, "--url", server.url, "--token-file", str(token)],
                                  capture_output=True, text=True, timeout=30)
        assert cloud("profiles", "set", "Acme", "NAS 4000", "--name", "acme-nas", "--qos", "bulk",
                     "--port", "tcp/443:web").returncode == 0
        assert cloud("profiles", "list").stdout.split("\t")[:4] == ["Acme", "NAS 4000", "acme-nas", "bulk"]
        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-the-operator-token\n")
        refused = cloud("profiles", "list", token=wrong)
        assert refused.returncode == 1 and refused.stderr.strip() == \
            "Error: GET /v1/operator/profiles: 401 operator token missing or wrong (Authorization: Bearer …)"
        bad = cloud("profiles", "set", "Acme", "X", "--name", "n", "--port", "ftp/21")
        assert bad.returncode == 1 and "expected tcp/PORT or udp/PORT" in bad.stderr and "Traceback" not in bad.stderr
        assert cloud("profiles", "remove", "Acme", "NAS 4000").returncode == 0
        assert server.get("/v1/operator/profiles") == []
    finally:
        server.kill()
