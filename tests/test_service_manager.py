"""What systemd sees of the real programs: readiness and watchdog pings on a real notify
socket, and log lines with journald priorities when stderr is the journal stream."""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homenet.brokers import wait_listening
from homenet.netutil import free_port

from .harness import wait_until
from .processes import Process

BIN = Path(sys.executable).parent
HOMENET, AGENT = str(BIN / "homenet"), str(BIN / "homenet-agent")


class NotifySocket:
    """The AF_UNIX datagram socket systemd listens on for sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, timeout: float) -> list[str]:
        """The fields of the next datagram."""
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode().split("\n")

    def until(self, field: str, timeout: float = 20) -> list[str]:
        """Datagrams' fields up to and including the one that holds `field`."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while field not in seen:
            seen += self.receive(max(0.01, deadline - time.monotonic()))
        return seen


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.sock.close()


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_gateway_is_ready_only_once_serving_pings_the_watchdog_and_says_stopping(
        tmp_path: Path, notify: NotifySocket, started: list[Process]) -> None:
    port = free_port()
    gateway = Process(tmp_path / "gw.log", HOMENET, "gateway", "run", "--listen", f"127.0.0.1:{port}",
                    "--data-dir", str(tmp_path / "gw"),
                    env=env_with(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000"))
    started.append(gateway)
    fields = notify.until("READY=1")
    assert accepts(port)  # READY=1 came after the broker listens ...
    assert "configurator configurator (epoch 1) online" in gateway.output()  # ... and the configurator is on it
    assert f"STATUS=serving on 127.0.0.1:{port}" in fields
    assert notify.receive(timeout=2) == ["WATCHDOG=1"]  # every WATCHDOG_USEC/2
    assert gateway.terminate() == 0
    assert "STOPPING=1" in notify.until("STOPPING=1", timeout=5)


def test_agent_is_ready_once_working_with_its_broker(tmp_path: Path, notify: NotifySocket,
                                                     started: list[Process], embedded) -> None:
    agent = Process(tmp_path / "agent.log", AGENT, "run", "--broker", embedded.url, "--device-id", "ready-1",
                  "--collector", "simulated", "--data-dir", str(tmp_path / "a"),
                  env=env_with(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000"))
    started.append(agent)
    fields = notify.until("READY=1")
    assert f"STATUS=agent ready-1 working with {embedded.url}" in fields
    assert notify.receive(timeout=2) == ["WATCHDOG=1"]
    assert agent.terminate() == 0


def journal_stream(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


def test_under_the_journal_lines_carry_priorities_and_libraries_stay_quiet(tmp_path: Path,
                                                                          started: list[Process]) -> None:
    """journalctl -p warning shows warnings only: the normal credential hand-off is INFO."""
    port = free_port()
    gw_log, agent_log = tmp_path / "gw.log", tmp_path / "agent.log"
    gw_log.touch()
    agent_log.touch()
    gateway = Process(gw_log, HOMENET, "gateway", "run", "--listen", f"127.0.0.1:{port}",
                    "--data-dir", str(tmp_path / "gw"), env=env_with(JOURNAL_STREAM=journal_stream(gw_log)))
    started.append(gateway)
    wait_listening(port)  # no "cannot reach the broker" warning: that one would be true
    agent = Process(agent_log, AGENT, "run", "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", "journal-1",
                  "--collector", "simulated", "--data-dir", str(tmp_path / "a"),
                  env=env_with(JOURNAL_STREAM=journal_stream(agent_log)))
    started.append(agent)
    wait_until(lambda: "config.applied device=journal-1" in gateway.output(), timeout=20, what="configured")
    assert agent.terminate() == 0 and gateway.terminate() == 0

    gw_lines, agent_lines = gateway.output().splitlines(), agent.output().splitlines()
    for line in gw_lines + agent_lines:
        assert re.match(r"<[0-7]>homenet\.", line), line  # a priority, and nothing of amqtt/transitions/paho
    assert any(line.startswith("<6>homenet.configurator.service: configurator configurator (epoch 1) online")
               for line in gw_lines)
    assert any(line.startswith("<6>homenet.agent.service: received broker account journal-1") for line in agent_lines)
    # the re-login with the new account is the agent's own doing: said at INFO, never as a loss
    assert any(line.startswith("<6>homenet.agent.service: disconnected from") and "on purpose" in line
               for line in agent_lines)
    assert not [line for line in agent_lines if line[:3] in ("<4>", "<3>")]


def test_library_lines_appear_when_asked(tmp_path: Path, started: list[Process]) -> None:
    port = free_port()
    gateway = Process(tmp_path / "gw.log", HOMENET, "gateway", "run", "--listen", f"127.0.0.1:{port}",
                      "--data-dir", str(tmp_path / "gw"), "--log-level", "warning", "--library-log-level", "info")
    started.append(gateway)
    wait_until(lambda: " amqtt." in gateway.output(), timeout=20, what="amqtt's own lines")
    wait_listening(port)
    gateway.terminate()
    assert " INFO    homenet." not in gateway.output()
