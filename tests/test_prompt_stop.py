"""The agent stops within a second of SIGTERM or SIGINT in every state, and says what it waits for.

Real agent processes in network namespaces: in beacon discovery (no gateway on the LAN),
connecting (the broker's SYNs are dropped), applying (an address whose check against the
broker runs until an 8 s deadline) and configured. A stop mid-apply is resumed at the next
start from the apply journal.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from pathlib import Path

from homenet.agent.waiting import Waiting
from homenet.schemas.messages import ResultStatus

from .harness import wait_until
from .netns import Lab, Namespace
from .test_day0 import AGENT, GATEWAY_IP, Home, lab, start_home  # noqa: F401 - lab is a fixture

PROMPT = 1.0
DROP_BROKER_SYN = """\
table inet cut {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 1883 drop
    }
}
"""


def stopped_within(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> float:
    """Seconds from the signal to the process's exit; it must have exited 0."""
    began = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(10)
    took = time.monotonic() - began
    assert code == 0, f"exit status {code}"
    return took


def agent(ns: Namespace, data: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    data.mkdir(exist_ok=True)
    log = data / "agent.log"
    proc = ns.popen(AGENT, "run", "--data-dir", str(data), "--executor", "simulated", *args,
                    stdout=log.open("a"), stderr=subprocess.STDOUT)
    return proc, log


def test_in_discovery_and_while_connecting_a_stop_is_prompt(lab: Lab, tmp_path: Path) -> None:
    gw = lab.namespace("gw")  # a LAN with no gateway running: no beacon, and the broker's port drops SYNs
    lab.bridge(gw, "br0", f"{GATEWAY_IP}/24")
    gw.run("nft", "-f", "-", input=DROP_BROKER_SYN)
    dev = lab.namespace("dev")
    lab.veth(dev, gw)
    dev.run("ip", "addr", "add", "192.168.50.9/24", "dev", "eth0")

    for sig in (signal.SIGTERM, signal.SIGINT):
        proc, log = agent(dev, tmp_path / f"discovering-{sig.name}")
        wait_until(lambda: "waiting for the gateway's beacon on eth0" in log.read_text(), 10, "the wait named")
        assert stopped_within(proc, sig) < PROMPT, log.read_text()

        proc, log = agent(dev, tmp_path / f"connecting-{sig.name}", "--broker", f"mqtt://{GATEWAY_IP}:1883")
        wait_until(lambda: f"waiting for the broker at mqtt://{GATEWAY_IP}:1883" in log.read_text(), 10,
                   "the wait named")
        time.sleep(0.5)  # inside the TCP connect, which the dropped SYNs keep open for seconds
        assert stopped_within(proc, sig) < PROMPT, log.read_text()


def test_a_stop_while_applying_is_prompt_and_the_apply_resumes_at_the_next_start(lab: Lab, tmp_path: Path) -> None:
    # The configurator plans from 10.99.0.0/24 but the broker is on 192.168.50.0/24: the new
    # address cannot reach it, and the agent keeps trying until its 8 s deadline.
    home: Home = start_home(lab, tmp_path, lan="10.99.0")
    ns, proc, log = home.device("cam", "camera", deadline=8)
    state = tmp_path / "cam" / "state.json"
    wait_until(lambda: state.exists() and json.loads(state.read_text()).get("applying"), 30, "the apply under way")
    assert stopped_within(proc) < PROMPT, log.read_text()
    assert "stopping while config version 1 is being applied" in log.read_text()
    assert json.loads(state.read_text())["applying"], "the journal is kept for the next start"

    proc = ns.popen(AGENT, "run", "--config", str(tmp_path / "cam" / "agent.toml"), "--data-dir",
                    str(tmp_path / "cam"), stdout=log.open("a"), stderr=subprocess.STDOUT)
    record = next(iter(home.wait_result(1, timeout=40).values()))
    assert record.result.status == ResultStatus.ROLLED_BACK
    assert "resumed after the agent stopped while applying version 1" in record.result.items[0].detail
    assert ns.ipv4("eth0") == []
    assert stopped_within(proc) < PROMPT, log.read_text()


def test_a_wait_is_said_again_while_it_lasts() -> None:
    log = logging.getLogger("test.waiting")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    waiting = Waiting(log, every=0.2)
    try:
        waiting.on("the gateway's beacon on eth0")
        wait_until(lambda: sum("still waiting for the gateway's beacon" in line for line in lines) >= 2, 3,
                   "the wait said again")
        waiting.on("the broker")
        waiting.done()
        said = len(lines)
        time.sleep(0.5)
        assert len(lines) == said, "nothing more once the wait is over"
    finally:
        waiting.close()
        log.removeHandler(handler)
    assert lines[0] == "waiting for the gateway's beacon on eth0"
    assert "waiting for the broker" in lines
