"""A real power cut of the gateway: its FIN and RST never reach the devices.

The gateway is SIGKILLed while its namespace drops every TCP segment with FIN or RST, so the
devices' connections look alive until their MQTT keepalive (30 s) runs out. The restarted
gateway's beacon carries a new epoch; the agents follow it and connect again at once, and the
configurator shows every device offline until it says otherwise. The recovery time is printed
(`-s`) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

from .harness import wait_until
from .netns import Lab
from .test_day0 import Home, lab, start_home  # noqa: F401 - lab is a fixture

AGENTS = 3
GOAL = 3.0
NO_FIN_NO_RST = """\
table inet powercut {
    chain output {
        type filter hook output priority 0; policy accept;
        tcp flags & (fin | rst) != 0 drop
    }
}
"""


def log_time(line: str) -> float:
    """The wall-clock time of a log line (`2026-12-04 20:13:14,726 INFO ...`)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_after_a_power_cut_every_agent_is_back_within_3_s_of_the_gateway_serving(lab: Lab, tmp_path: Path) -> None:
    home: Home = start_home(lab, tmp_path)
    assert home.run_gateway is not None
    gateway = lab.processes[-1]
    devices = [home.device(f"dev{n}", "generic") for n in range(AGENTS)]
    before = home.wait_result(AGENTS, timeout=40)
    wait_until(lambda: all(r.online for r in home.records().values()), 10, "every device online")

    home.gw.run("nft", "-f", "-", input=NO_FIN_NO_RST)
    gateway.kill()
    gateway.wait(5)
    time.sleep(1)
    for _, proc, log in devices:
        assert "reconnecting with backoff" not in log.read_text(), "no FIN or RST reached the device"

    home.run_gateway()
    gateway_log = tmp_path / "gateway.log"
    serving = wait_until(lambda: [line for line in gateway_log.read_text().splitlines()
                                  if "broker listening on" in line][1:], 20, "the gateway serving again")
    serving_at = log_time(serving[0])

    def back() -> bool:
        records = home.records()
        return len(records) == AGENTS and all(
            r.online and r.register_id != before[r.device_id].register_id for r in records.values())
    wait_until(back, 30, "every agent registered again with the restarted gateway")
    recovered = time.time() - serving_at
    print(f"\npower cut: {AGENTS} agents back and registered {recovered:.2f} s after the gateway served again")
    assert recovered < GOAL
    for _, proc, log in devices:
        assert proc.poll() is None
        assert re.search(r"the gateway restarted \(its beacon's epoch is 2, was 1\)", log.read_text())
    assert "devices shown offline until they say they are online again" in gateway_log.read_text()
