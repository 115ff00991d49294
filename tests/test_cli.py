"""The command-line programs as a user runs them: real processes, real signals, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from homenet.brokers import wait_listening
from homenet.netutil import free_port

from .harness import wait_until

BIN = Path(sys.executable).parent
HOMENET, AGENT = str(BIN / "homenet"), str(BIN / "homenet-agent")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


class Processes:
    """Processes started by a test, stopped by PID when it ends, whatever happened."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> tuple[int, str]:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        return proc.returncode, out

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.close()


def devices_list(data_dir: Path) -> str:
    return run(HOMENET, "devices", "list", "--data-dir", str(data_dir)).stdout


def test_gateway_and_agent_programs_onboard_a_device(tmp_path: Path, processes: Processes,
                                                      mosquitto_sub: str) -> None:
    port = free_port()
    gw_dir = tmp_path / "gw"
    gateway = processes.start(HOMENET, "gateway", "run", "--listen", f"0.0.0.0:{port}", "--listen", f":::{port}",
                              "--data-dir", str(gw_dir))
    wait_listening(port)
    # the configurator inside uses IPv4 loopback; this agent comes in over IPv6
    agent = processes.start(AGENT, "run", "--broker", f"mqtt://[::1]:{port}", "--device-id", "stb-1",
                            "--device-type", "iptv-stb", "--model", "STB 9000", "--collector", "simulated",
                            "--data-dir", str(tmp_path / "agent"))
    wait_until(lambda: "configured" in devices_list(gw_dir), timeout=20, what="stb-1 configured")

    table = devices_list(gw_dir)
    assert table.splitlines()[0].split()[:3] == ["DEVICE", "TYPE", "STATE"]
    assert "stb-1" in table and "iptv-stb" in table and "video/32" in table
    detail = run(HOMENET, "devices", "show", "stb-1", "--data-dir", str(gw_dir)).stdout
    assert "STB 9000" in detail and "result      version 1: ok" in detail

    code, out = processes.stop(agent)
    assert code == 0, out
    code, out = processes.stop(gateway)
    assert code == 0, out
    # a clean stop leaves the retained configurator state saying offline; the database stays
    assert "configured" in devices_list(gw_dir)


def test_agent_started_before_the_gateway_waits_and_then_registers(tmp_path: Path, processes: Processes) -> None:
    port = free_port()
    agent = processes.start(AGENT, "run", "--broker", f"127.0.0.1:{port}", "--device-id", "nas-1",
                            "--device-type", "nas", "--collector", "simulated", "--data-dir", str(tmp_path / "a"))
    gateway = processes.start(HOMENET, "gateway", "run", "--listen", f"127.0.0.1:{port}",
                              "--data-dir", str(tmp_path / "gw"))
    wait_until(lambda: "configured" in devices_list(tmp_path / "gw"), timeout=30, what="nas-1 configured")
    assert processes.stop(agent)[0] == 0
    assert processes.stop(gateway)[0] == 0


def test_agent_info_reports_this_machines_real_interfaces(tmp_path: Path) -> None:
    out = run(AGENT, "info", "--device-id", "probe", "--data-dir", str(tmp_path))
    info = json.loads(out.stdout)
    assert info["hostname"] == os.uname().nodename
    lo = next(i for i in info["interfaces"] if i["name"] == "lo")
    assert "127.0.0.1/8" in lo["addresses"]


def test_demo_onboards_every_built_in_type_and_exits_zero() -> None:
    out = run(HOMENET, "demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "7/7 devices confirmed their configuration" in out.stdout
    assert out.stdout.count("configured") == 7


@pytest.mark.parametrize("args,message", [
    ((HOMENET, "devcies", "list"), "No such command 'devcies'"),
    ((HOMENET, "devices", "show", "nobody", "--data-dir", "{tmp}"), "no configuration database at"),
    ((AGENT, "run", "--broker", "http://x", "--data-dir", "{tmp}"), "scheme must be mqtt:// or mqtts://"),
    ((AGENT, "run", "--device-id", "a/b", "--data-dir", "{tmp}"), "is not a safe topic level"),
    ((AGENT, "run", "--collector", "magic"), "Invalid value for '--collector'"),
])
def test_cli_mistakes_get_a_clear_error(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    out = run(*(a.replace("{tmp}", str(tmp_path)) for a in args), timeout=20)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_settings_file_typo_names_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "gateway.toml"
    conf.write_text('[configurator.lan]\nsubnett = "10.0.0.0/24"\n')
    out = run(HOMENET, "devices", "list", "--config", str(conf))
    assert out.returncode != 0
    assert "configurator.lan.subnett: Extra inputs are not permitted" in out.stderr
    conf.write_text("[broker\n")
    out = run(HOMENET, "gateway", "run", "--config", str(conf))
    assert out.returncode != 0 and "is not valid TOML" in out.stderr
