"""Commands for scripts: `--json` output parsed, `users list`, `homenet-agent status` (reads
only), and `homenet watch` against a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from homenet.brokers import BrokerHandle, Embedded
from homenet.schemas.signing import fingerprint

from .harness import Gateway, wait_until

BIN = Path(sys.executable).parent
HOMENET, AGENT = str(BIN / "homenet"), str(BIN / "homenet-agent")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out


def test_devices_list_and_show_as_json(embedded: Embedded, tmp_path: Path) -> None:
    gateway = Gateway(embedded, tmp_path)
    gateway.start()
    try:
        gateway.agent("nas")
        record = gateway.wait_configured("test-nas")
        listed = json.loads(run(HOMENET, "devices", "list", "--json", "--data-dir", str(gateway.data_dir)).stdout)
        shown = json.loads(run(HOMENET, "devices", "show", "test-nas", "--json",
                               "--data-dir", str(gateway.data_dir)).stdout)
    finally:
        gateway.close()
    assert [d["device_id"] for d in listed] == ["test-nas"] and listed[0] == shown
    assert shown["state"] == "configured" and shown["address"] == record.address and shown["version"] == 1
    assert shown["config"]["items"] and "config_payload" not in shown


def test_users_list_shows_operator_accounts_by_role(tmp_path: Path) -> None:
    accounts = tmp_path / "gateway" / "broker-accounts.json"
    broker = Embedded(accounts_file=accounts)
    broker.start()
    gateway = Gateway(broker, tmp_path, accounts_file=accounts)
    try:
        gateway.start()
        data = ["--data-dir", str(gateway.data_dir)]
        run(HOMENET, "users", "add", "alice", "--broker", broker.url, *data)
        run(HOMENET, "users", "add", "bob", "--read-only", "--broker", broker.url, *data)
        listed = json.loads(run(HOMENET, "users", "list", "--json", *data).stdout)
        table = run(HOMENET, "users", "list", *data).stdout
    finally:
        gateway.close()
        broker.stop()
    assert [u for u in listed if u["name"] in ("alice", "bob")] == [
        {"name": "alice", "role": "operator", "read_only": False}, {"name": "bob", "role": "reader", "read_only": True}]
    assert "configurator" not in {u["name"] for u in listed}
    assert table.splitlines()[0].split() == ["NAME", "ROLE", "READ-ONLY"]


def _files(d: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in d.rglob("*")}


def test_agent_status_tells_applied_broker_key_and_connection_and_writes_nothing(
        embedded: Embedded, tmp_path: Path) -> None:
    gateway = Gateway(embedded, tmp_path)
    gateway.start()
    try:
        agent = gateway.agent("nas")
        gateway.wait_configured("test-nas")
        data = tmp_path / "agents" / "test-nas"
        before = _files(data)
        status = json.loads(run(AGENT, "status", "--json", "--data-dir", str(data)).stdout)
        assert _files(data) == before
        assert status["connected"] and status["running"] and status["pid"] == os.getpid()
        assert status["broker"] == embedded.url and status["device_id"] == "test-nas"
        assert status["applied"]["version"] == 1 and status["applied"]["result"] == "ok"
        assert status["configurator_key"]["fingerprint"] == fingerprint(gateway.configurator.key.public)
        text = run(AGENT, "status", "--data-dir", str(data)).stdout
        assert "agent       connected since" in text and "applied     version 1: ok" in text
        gateway.stop_agent(agent)
        stopped = json.loads(run(AGENT, "status", "--json", "--data-dir", str(data)).stdout)
        assert not stopped["connected"]
    finally:
        gateway.close()


def test_agent_status_without_state_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run([AGENT, "status", "--data-dir", str(tmp_path / "none")], capture_output=True, text=True)
    assert out.returncode == 1 and "no agent state in" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "none").exists()


def test_watch_shows_the_tree_readable_and_raw(broker: BrokerHandle, tmp_path: Path) -> None:
    gateway = Gateway(broker, tmp_path)
    gateway.start()
    try:
        common = ["--broker", broker.url, "--data-dir", str(gateway.data_dir)]
        raw = subprocess.Popen([HOMENET, "watch", "--raw", *common], stdout=subprocess.PIPE, text=True)
        readable = subprocess.Popen([HOMENET, "watch", "--color", "--device", "test-nas", "--count", "3", *common],
                                    stdout=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: len(gateway.watcher.messages) and True, what="watchers up")
            raw_lines: list[dict] = []
            first = raw.stdout.readline()  # the retained configurator/state: the watcher is subscribed
            raw_lines.append(json.loads(first))
            gateway.agent("nas")
            gateway.wait_configured("test-nas")
            while not any(m["topic"].endswith("/config/result") for m in raw_lines):
                raw_lines.append(json.loads(raw.stdout.readline()))
            text = readable.communicate(timeout=15)[0].splitlines()
            assert readable.returncode == 0 and len(text) == 3
        finally:
            for proc in (raw, readable):
                proc.terminate()
                proc.wait(10)
    finally:
        gateway.close()
    kinds = [m["payload"]["kind"] for m in raw_lines if isinstance(m["payload"], dict) and "kind" in m["payload"]]
    assert {"configurator.state", "register", "config", "config.result"} <= set(kinds)
    assert raw_lines[0]["topic"] == "homenet/v1/configurator/state" and raw_lines[0]["retained"] is True
    assert all("\x1b[" in line for line in text) and any("device/test-nas/" in line for line in text)
    assert not any('"sig"' in line or '"seq"' in line for line in text)
