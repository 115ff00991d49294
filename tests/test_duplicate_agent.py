"""Two agents on one host without --device-id: the second one is refused, the first carries on."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from homenet.configurator.lifecycle import State

from .harness import wait_until
from .netns import Lab
from .test_day0 import AGENT, GATEWAY_IP, lab, start_home  # noqa: F401 - lab is a fixture


def test_a_second_agent_with_the_same_derived_id_is_refused_and_the_first_is_unaffected(
        lab: Lab, tmp_path: Path) -> None:
    home = start_home(lab, tmp_path)
    dev = lab.namespace("dev")
    lab.veth(dev, home.gw)
    dev.run("ip", "addr", "add", "192.168.50.9/24", "dev", "eth0")
    device_id = "hn-" + dev.mac("eth0").replace(":", "")

    def agent(name: str) -> tuple[subprocess.Popen[str], Path]:
        (tmp_path / name).mkdir()
        log = tmp_path / name / "agent.log"
        return dev.popen(AGENT, "run", "--data-dir", str(tmp_path / name), "--executor", "simulated",
                         "--broker", f"mqtt://{GATEWAY_IP}:1883", stdout=log.open("w"),
                         stderr=subprocess.STDOUT), log

    first, first_log = agent("first")
    wait_until(lambda: (r := home.records().get(device_id)) and r.state == State.CONFIGURED, 30, "the first configured")
    second, second_log = agent("second")
    assert second.wait(10) != 0
    said = second_log.read_text()
    assert f"another agent on this host already runs as device id {device_id}" in said
    assert "--device-id" in said and "Traceback" not in said

    time.sleep(1)
    assert first.poll() is None
    assert "reconnecting with backoff" not in first_log.read_text(), "its session was never taken over"
    record = home.records()[device_id]
    assert record.state == State.CONFIGURED and record.online
