"""TLS: the gateway makes its certificate on first start; agents trust exactly that one
(pinned by its SHA-256), and plain TCP can be turned off. On the embedded broker through
`homenet gateway run`, and on Mosquitto with dynamic security."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homenet.agent.app import build as build_agent
from homenet.brokers import wait_listening
from homenet.configurator.operator import operator_key, send_command
from homenet.netutil import free_port
from homenet.schemas.messages import Command
from homenet.settings import AgentSettings
from homenet.tls import CertificateMismatch, ensure_certificate, fingerprint

from .harness import Gateway, wait_until
from .test_security import secured
from .test_cli import Processes, devices_list

BIN = Path(sys.executable).parent
HOMENET, AGENT = str(BIN / "homenet"), str(BIN / "homenet-agent")


@dataclass
class TlsGateway:
    port: int
    data: Path
    fingerprint: str

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def cert(self) -> Path:
        return self.data / "broker-cert.pem"


@pytest.fixture
def tls_gateway(tmp_path: Path) -> Iterator[tuple[TlsGateway, Processes]]:
    procs = Processes()
    port, data = free_port(), tmp_path / "gw"
    procs.start(HOMENET, "gateway", "run", "--no-plain", "--tls-listen", f"127.0.0.1:{port}", "--data-dir", str(data))
    wait_listening(port)
    gw = TlsGateway(port, data, fingerprint((data / "broker-cert.pem").read_bytes()))
    yield gw, procs
    procs.close()


def agent_args(gw: TlsGateway, tmp: Path, device_id: str, *extra: str) -> list[str]:
    return [AGENT, "run", "--broker", gw.url, "--device-id", device_id, "--device-type", "nas",
            "--collector", "simulated", "--data-dir", str(tmp / device_id), *extra]


def test_an_agent_onboards_over_tls_with_the_pinned_certificate(tls_gateway, tmp_path: Path) -> None:
    gw, procs = tls_gateway
    procs.start(*agent_args(gw, tmp_path, "tls-1", "--broker-fingerprint", gw.fingerprint))
    wait_until(lambda: "configured" in devices_list(gw.data), timeout=30, what="tls-1 configured over TLS")
    assert (tmp_path / "tls-1" / "broker-cert.pem").read_bytes() == gw.cert.read_bytes()


def test_an_agent_refuses_a_broker_with_another_certificate(tls_gateway, tmp_path: Path) -> None:
    gw, _ = tls_gateway
    other = fingerprint(ensure_certificate(tmp_path / "other.pem", tmp_path / "other.key"))
    out = subprocess.run(agent_args(gw, tmp_path, "tls-2", "--broker-fingerprint", other),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert f"not the pinned {other[:16]}...; refusing to connect" in out.stderr
    assert "tls-2" not in devices_list(gw.data)


def test_with_plain_tcp_off_a_plain_connection_fails(tls_gateway, mosquitto_sub: str) -> None:
    gw, _ = tls_gateway
    plain = subprocess.run([mosquitto_sub, "-h", "127.0.0.1", "-p", str(gw.port), "-t", "homenet/#", "-W", "3"],
                           capture_output=True, text=True, timeout=20)
    assert plain.returncode != 0


def test_mosquitto_sub_reads_the_tree_over_tls_with_an_operator_account(tls_gateway, tmp_path: Path,
                                                                          mosquitto_sub: str) -> None:
    gw, procs = tls_gateway
    procs.start(*agent_args(gw, tmp_path, "tls-3", "--broker-fingerprint", gw.fingerprint))
    wait_until(lambda: "configured" in devices_list(gw.data), timeout=30, what="tls-3 configured")
    out = subprocess.run([HOMENET, "users", "add", "alice", "--read-only", "--broker", gw.url,
                          "--data-dir", str(gw.data)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    password = out.stdout.strip().rsplit(" ", 1)[1]
    read = subprocess.run([mosquitto_sub, "-h", "127.0.0.1", "-p", str(gw.port), "--cafile", str(gw.cert),
                           "--insecure", "-u", "alice", "-P", password, "-v", "-t", "homenet/#", "-W", "3"],
                          capture_output=True, text=True, timeout=20)
    assert "homenet/v1/device/tls-3/config " in read.stdout


@pytest.fixture
def tls_mosquitto(tmp_path: Path) -> Iterator[Gateway]:
    """Mosquitto speaking TLS only, with dynamic security provisioned by the configurator."""
    yield from secured("mosquitto", tmp_path, tls=True)


def test_on_mosquitto_everything_speaks_tls_with_the_pinned_certificate(
        tls_mosquitto: Gateway, tmp_path: Path, mosquitto_sub: str) -> None:
    gw, broker = tls_mosquitto, tls_mosquitto.broker
    agent = gw.agent("nas", "tls-m")
    gw.wait_configured("tls-m")
    wait_until(lambda: agent.state.state.username == "tls-m" and agent.client.is_connected(), what="logged in")

    other = fingerprint(ensure_certificate(tmp_path / "other.pem", tmp_path / "other.key"))
    with pytest.raises(CertificateMismatch, match="refusing to connect"):
        build_agent(AgentSettings(broker=broker.url, broker_fingerprint=other, device_id="tls-x",
                                  collector="simulated", data_dir=tmp_path / "tls-x"))

    plain = subprocess.run([mosquitto_sub, "-h", "127.0.0.1", "-p", str(broker.port), "-t", "homenet/#", "-W", "3"],
                           capture_output=True, text=True, timeout=20)
    assert plain.returncode != 0

    reply = send_command(broker.url, Command(op="user.add", user="alice", read_only=True), "homenet/v1",
                         gw.admin, cafile=broker.cafile, key=operator_key(gw.data_dir))
    read = subprocess.run([mosquitto_sub, "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(broker.cafile),
                           "--insecure", "-u", "alice", "-P", reply.result["password"], "-v", "-t", "homenet/#",
                           "-W", "3"], capture_output=True, text=True, timeout=20)
    assert "homenet/v1/device/tls-m/config " in read.stdout
