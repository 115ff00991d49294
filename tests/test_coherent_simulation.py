"""`--executor simulated` on a real host is coherent: what it records is what it reports, so
reconciliation finds nothing to correct (before, the real interfaces were reported, never had
the planned address, and every reconciliation sent a new config version)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from homenet.brokers import wait_listening
from homenet.netutil import free_port

from .harness import wait_until
from .test_cli import AGENT, HOMENET, Processes, processes, run  # noqa: F401 - processes is a fixture


def test_a_simulated_executor_with_the_default_collector_converges_and_stays(tmp_path: Path,
                                                                            processes: Processes) -> None:
    port = free_port()
    conf = tmp_path / "gateway.toml"
    conf.write_text("[configurator]\nreconcile_interval = 0.5\n")
    processes.start(HOMENET, "gateway", "run", "--config", str(conf), "--listen", f"127.0.0.1:{port}",
                    "--data-dir", str(tmp_path / "gw"))
    wait_listening(port)
    agent = processes.start(AGENT, "run", "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", "sim-1",
                            "--executor", "simulated", "--data-dir", str(tmp_path / "agent"))

    def show() -> str:
        return run(HOMENET, "devices", "show", "sim-1", "--data-dir", str(tmp_path / "gw")).stdout

    wait_until(lambda: "result      version 1: ok" in show(), 20, "sim-1 configured")
    time.sleep(4)  # eight reconciliations, and the agent's info sent after its apply
    assert "result      version 1: ok" in show(), "no new config version: nothing drifted"
    simulated = json.loads((tmp_path / "agent" / "simulated.json").read_text())
    code, out = processes.stop(agent)
    assert code == 0
    assert "settings are recorded in" in out and "simulated interface" in out
    assert simulated["ipv4"]["address"] in show()
