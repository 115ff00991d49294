"""`[broker] engine`: `homenet gateway run` serving MQTT with Debian's Mosquitto as its own child
process — config, accounts (its password and ACL files) and lifetime owned by homenet — instead
of amqtt."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from homenet.brokers import Mosquitto, wait_listening
from homenet.netutil import free_port

from .conftest import require_program
from .harness import wait_until
from .test_cli import AGENT, HOMENET, Processes, devices_list, processes, run  # noqa: F401 (fixture)


def mosquitto_children(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children() if c.name() == "mosquitto"]


@pytest.fixture
def mosquitto_gateway(tmp_path: Path, processes: Processes):  # noqa: F811
    require_program("mosquitto", Mosquitto.binary())
    conf, port, data = tmp_path / "gateway.toml", free_port(), tmp_path / "gw"
    conf.write_text('[broker]\nengine = "mosquitto"\n')
    gateway = processes.start(HOMENET, "gateway", "run", "--config", str(conf), "--data-dir", str(data),
                              "--listen", f"127.0.0.1:{port}", "--listen", f":::{port}")
    wait_listening(port, timeout=20)
    return gateway, port, data


def test_gateway_on_mosquitto_onboards_a_device_and_stops_its_broker(
        mosquitto_gateway, tmp_path: Path, processes: Processes, mosquitto_sub: str) -> None:  # noqa: F811
    gateway, port, data = mosquitto_gateway
    [child] = mosquitto_children(gateway.pid)
    # over IPv6 while the configurator inside uses IPv4 loopback, as with the embedded broker
    agent = processes.start(AGENT, "run", "--broker", f"mqtt://[::1]:{port}", "--device-id", "nas-m",
                            "--device-type", "nas", "--collector", "simulated", "--data-dir", str(tmp_path / "a"))
    wait_until(lambda: "configured" in devices_list(data), timeout=30, what="nas-m configured on mosquitto")
    # the device was handed an account (Mosquitto has its hash) and logged in with it
    assert (data / "mosquitto" / "passwords").read_text().count("nas-m:$6$") == 1
    assert "nas-m" in run(HOMENET, "devices", "show", "nas-m", "--data-dir", str(data)).stdout
    assert (data / "mosquitto" / "passwords").stat().st_mode & 0o007 == 0

    # homenet.acl.RULES hold on Mosquitto: the operator reads a device's retained config but
    # not its register/reply (it carries the device's password); an anonymous client neither
    config = "homenet/v1/device/nas-m/config"
    admin = ["-u", "admin", "-P", (data / "admin.secret").read_text().strip()]
    assert b'"kind":"config"' in subscribe(mosquitto_sub, port, config, *admin)
    assert subscribe(mosquitto_sub, port, "homenet/v1/device/nas-m/register/reply", *admin) == b""
    assert subscribe(mosquitto_sub, port, config, "-i", "nosy-1") == b""

    assert processes.stop(agent)[0] == 0
    code, out = processes.stop(gateway)
    assert code == 0, out
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def subscribe(mosquitto_sub: str, port: int, topic: str, *login: str) -> bytes:
    """What `topic` delivers within 2 s (its retained message, or nothing)."""
    done = subprocess.run([mosquitto_sub, "-p", str(port), "-h", "127.0.0.1", "-t", topic, "-C", "1", "-W", "2",
                           *login], capture_output=True, timeout=10)
    return done.stdout


def test_when_its_mosquitto_dies_the_gateway_says_so_and_exits(mosquitto_gateway, processes: Processes) -> None:  # noqa: F811
    gateway, _, data = mosquitto_gateway
    [child] = mosquitto_children(gateway.pid)
    # killed once the configurator has made its accounts through it (it runs from then on)
    wait_until(lambda: (data / "admin.secret").exists(), timeout=20, what="the configurator's accounts")
    os.kill(child.pid, signal.SIGKILL)
    out, _ = gateway.communicate(timeout=20)
    assert gateway.returncode == 1
    assert "Error: mosquitto exited with status -9; stopping" in out
    assert "Traceback" not in out


def test_an_unknown_engine_is_named_in_a_one_line_error(tmp_path: Path) -> None:
    conf = tmp_path / "gateway.toml"
    conf.write_text('[broker]\nengine = "rabbitmq"\n')
    out = run(HOMENET, "gateway", "run", "--config", str(conf), "--data-dir", str(tmp_path / "gw"))
    assert out.returncode != 0
    assert "broker.engine: Input should be 'auto', 'amqtt' or 'mosquitto'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "gw").exists()


def test_mosquitto_without_a_plain_listener_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    require_program("mosquitto", Mosquitto.binary())
    conf = tmp_path / "gateway.toml"
    conf.write_text('[broker]\nengine = "mosquitto"\n')
    out = run(HOMENET, "gateway", "run", "--config", str(conf), "--data-dir", str(tmp_path / "gw"),
              "--no-plain", "--tls-listen", f"127.0.0.1:{free_port()}")
    assert out.returncode != 0
    assert 'broker engine "mosquitto": it needs a plain listener' in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "gw").exists()
