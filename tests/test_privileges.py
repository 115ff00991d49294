"""Without CAP_NET_RAW the agent cannot hear the beacon: it says so and how to grant it, and
still works when given --broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .harness import Gateway

AGENT = str(Path(sys.executable).parent / "homenet-agent")


def test_without_cap_net_raw_the_agent_says_how_to_grant_it(as_nobody: list[str], nobody_dir: Path) -> None:
    out = subprocess.run([*as_nobody, AGENT, "run", "--data-dir", str(nobody_dir / "agent")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "needs CAP_NET_RAW" in out.stderr
    assert "AmbientCapabilities=CAP_NET_RAW" in out.stderr and "--broker" in out.stderr
    assert "Traceback" not in out.stderr


def test_without_cap_net_raw_the_agent_works_with_broker(as_nobody: list[str], nobody_dir: Path, embedded,
                                                         tmp_path: Path) -> None:
    gateway = Gateway(embedded, tmp_path)
    gateway.start()
    proc = subprocess.Popen([*as_nobody, AGENT, "run", "--broker", embedded.url, "--device-id", "plain-1",
                             "--device-type", "smart-speaker", "--collector", "simulated",
                             "--data-dir", str(nobody_dir / "agent")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        gateway.wait_configured("plain-1", timeout=20)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        gateway.close()
    assert proc.returncode == 0, out


def test_an_unwritable_data_dir_is_a_clear_error(as_nobody: list[str]) -> None:
    out = subprocess.run([*as_nobody, AGENT, "run", "--broker", "mqtt://127.0.0.1:1", "--data-dir", "/root/x"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "cannot use data directory /root/x: Permission denied" in out.stderr
    assert "Traceback" not in out.stderr
