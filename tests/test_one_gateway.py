"""One gateway per data directory, and a configurator that stands down says so.

Real `homenet gateway run` processes on loopback. A second one on the same data directory is
refused at once. When another configurator claims a newer epoch in the shared database (as a
`homenet configurator run` taking over would), the gateway's configurator stands down: it
publishes that it is `offline` instead of leaving its `online` retained with nobody answering,
stands by, and takes over again when no one else comes online.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from homenet.brokers import wait_listening
from homenet.configurator.app import ADMIN, ADMIN_SECRET, db_path
from homenet.configurator.store import SqliteStore
from homenet.netutil import free_port
from homenet.schemas import Topics

from .harness import wait_until
from .test_cli import HOMENET, Processes, processes, run  # noqa: F401 - processes is a fixture


def configurator_state(mosquitto_sub: str, port: int, data: Path) -> dict:
    secret = wait_until(lambda: (data / ADMIN_SECRET).exists() and (data / ADMIN_SECRET).read_text().strip(),
                        10, "the operator's secret")
    out = run(mosquitto_sub, "-h", "127.0.0.1", "-p", str(port), "-u", ADMIN, "-P", secret,
              "-t", Topics().configurator_state, "-C", "1", "-W", "5", timeout=10)
    return json.loads(out.stdout)["body"]


def test_a_second_gateway_on_a_data_directory_is_refused(tmp_path: Path, processes: Processes) -> None:
    port, data = free_port(), tmp_path / "gw"
    first = processes.start(HOMENET, "gateway", "run", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data))
    wait_listening(port)
    second = run(HOMENET, "gateway", "run", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data),
                 timeout=20)
    assert second.returncode != 0
    assert f"another homenet gateway (pid {first.pid}) is running on data directory {data}" in second.stderr
    assert "--standby" in second.stderr and "Traceback" not in second.stderr
    assert first.poll() is None
    assert processes.stop(first)[0] == 0


def test_a_gateway_whose_configurator_was_fenced_says_so_stands_by_and_recovers(
        tmp_path: Path, processes: Processes, mosquitto_sub: str) -> None:
    port, data = free_port(), tmp_path / "gw"
    conf = tmp_path / "gateway.toml"
    conf.write_text("[configurator]\nreconcile_interval = 0.3\nstandby_grace = 1\n")
    gateway = processes.start(HOMENET, "gateway", "run", "--config", str(conf), "--listen", f"127.0.0.1:{port}",
                              "--data-dir", str(data))
    wait_listening(port)
    wait_until(lambda: configurator_state(mosquitto_sub, port, data)["state"] == "online", 15, "online")

    store = SqliteStore(db_path(data))  # another configurator takes over the database
    assert store.claim_epoch() == 2
    store.close()
    stood_down = wait_until(lambda: (s := configurator_state(mosquitto_sub, port, data))["epoch"] == 1
                            and s["state"] == "offline" and s, 10, "the fenced configurator saying offline")
    assert stood_down["state"] == "offline"
    back = wait_until(lambda: (s := configurator_state(mosquitto_sub, port, data))["state"] == "online"
                      and s["epoch"] == 3 and s, 45, "the gateway's configurator taking over again")
    assert back["epoch"] == 3
    code, out = processes.stop(gateway)
    assert code == 0
    assert "standing down: " in out and "was fenced by a newer one: standing by" in out
    assert "no configurator is online: taking over" in out
