"""`homenet devices forget X`: X's account is revoked and its session closed at once, and its
address is not handed to another device while X may still hold it (a quarantine)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from homenet.brokers import Embedded, wait_listening
from homenet.configurator.app import db_path
from homenet.netutil import free_port
from homenet.schemas.messages import Command

from .harness import Gateway, load_records, wait_until
from .test_cli import AGENT, HOMENET, Processes, processes, run  # noqa: F401 - processes is a fixture
from .test_security import enrolled, secure_mosquitto  # noqa: F401 - a fixture


class Home:
    """`homenet gateway run` on loopback and agents of simulated devices, as processes."""

    def __init__(self, tmp: Path, processes: Processes) -> None:
        self.tmp, self.processes, self.port = tmp, processes, free_port()
        self.gateway = processes.start(HOMENET, "gateway", "run", "--listen", f"127.0.0.1:{self.port}",
                                       "--data-dir", str(tmp / "gw"))
        wait_listening(self.port)

    def agent(self, device_id: str) -> tuple[subprocess.Popen[str], Path]:
        log = self.tmp / f"{device_id}.log"
        with log.open("w") as out:
            proc = subprocess.Popen([AGENT, "run", "--broker", f"mqtt://127.0.0.1:{self.port}", "--device-id",
                                     device_id, "--collector", "simulated", "--data-dir", str(self.tmp / device_id)],
                                    stdout=out, stderr=subprocess.STDOUT, text=True)
        self.processes.procs.append(proc)
        return proc, log

    def show(self, device_id: str) -> str:
        return run(HOMENET, "devices", "show", device_id, "--data-dir", str(self.tmp / "gw")).stdout

    def address(self, device_id: str) -> str:
        """The address planned for the device once it confirmed its config."""
        def planned() -> str | None:
            record = load_records(self.tmp / "gw").get(device_id) if db_path(self.tmp / "gw").exists() else None
            return record.address if record and record.result else None
        return wait_until(planned, 20, f"{device_id}'s address")

    def forget(self, device_id: str) -> str:
        done = run(HOMENET, "devices", "forget", device_id, "--data-dir", str(self.tmp / "gw"),
                   "--broker", f"mqtt://127.0.0.1:{self.port}", timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout


def test_a_forgotten_device_is_thrown_off_the_embedded_broker_at_once(tmp_path: Path, processes: Processes) -> None:
    home = Home(tmp_path, processes)
    agent, log = home.agent("cam-1")
    wait_until(lambda: "result      version 1: ok" in home.show("cam-1"), 20, "cam-1 configured")
    wait_until(lambda: "logging in with it" in log.read_text(), 10, "cam-1 on its own account")
    home.forget("cam-1")
    text = wait_until(lambda: "dropping the broker account" in (t := log.read_text()) and t, 5,
                      "cam-1 thrown off and its old login refused")
    assert "disconnected from" in text
    assert agent.poll() is None


def test_a_forgotten_devices_address_is_not_handed_out_again(tmp_path: Path, processes: Processes) -> None:
    home = Home(tmp_path, processes)
    old, _ = home.agent("nas-1")
    held = home.address("nas-1")
    processes.stop(old)  # switched off, not gone: it keeps its address and may come back
    home.forget("nas-1")
    home.agent("nas-2")
    assert home.address("nas-2") != held


def test_mosquitto_closes_the_session_of_a_deleted_account(secure_mosquitto: Gateway,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    enrolled(secure_mosquitto, "camera", "cam-m")
    configurator = secure_mosquitto.configurator
    assert configurator is not None
    configurator.submit(lambda: configurator.commands.forget(Command(op="forget", device_id="cam-m")))
    wait_until(lambda: "dropping the broker account" in caplog.text, 5, "cam-m thrown off and its old login refused")
    assert "disconnected from" in caplog.text


def test_the_quarantine_ends_and_survives_a_restart(embedded: Embedded, tmp_path: Path) -> None:
    gateway = Gateway(embedded, tmp_path, forget_quarantine=3, reconcile_interval=0.2)
    try:
        configurator = gateway.start()
        old = gateway.agent("nas", "nas-1")
        held = gateway.wait_configured("nas-1").address
        gateway.stop_agent(old)
        configurator.submit(lambda: configurator.commands.forget(Command(op="forget", device_id="nas-1")))
        wait_until(lambda: gateway.record("nas-1") is None, 5, "nas-1 forgotten")
        gateway.stop()
        gateway.start()  # the quarantine is in the database
        gateway.agent("camera", "cam-1")
        assert gateway.wait_configured("cam-1").address != held
        time.sleep(3)  # the quarantine runs out
        gateway.agent("camera", "cam-2")
        assert gateway.wait_configured("cam-2").address == held
    finally:
        gateway.close()
