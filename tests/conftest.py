"""Fixtures: real brokers (embedded amqtt, Debian Mosquitto) on free ports, a configurator and agents.

A test that needs a Debian program skips with the reason on a laptop without it, and fails
under CI (CI=true), where a skip would hide a missing install step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from homenet.brokers import BrokerHandle, Embedded, Mosquitto

from .harness import Gateway
from .processes import Process

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


PACKAGES = {"mosquitto_sub": "mosquitto-clients", "mosquitto_pub": "mosquitto-clients", "ping": "iputils-ping",
            "nft": "nftables", "tc": "iproute2", "miniupnpd": "miniupnpd-nftables", "dnsmasq": "dnsmasq-base",
            "NetworkManager": "network-manager", "nmcli": "network-manager", "mosquitto_ctrl": "mosquitto",
            "mosquitto_dynamic_security.so": "mosquitto", "node": "nodejs", "systemd-analyze": "systemd"}


def require_program(name: str, path: str | None = None) -> str:
    """The program's path; skip (laptop) or fail (CI) when it is missing."""
    found = path if path and Path(path).exists() else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (Debian package {PACKAGES.get(name, name)})"
    if IN_CI:
        pytest.fail(message + ": CI must install it (.ci/run)")
    pytest.skip(message)


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerHandle]:
    """Each test that takes `broker` runs against the embedded broker and against Mosquitto."""
    if request.param == "mosquitto":
        require_program("mosquitto", Mosquitto.binary())
        handle: BrokerHandle = Mosquitto()
    else:
        handle = Embedded()
    handle.start()
    yield handle
    handle.stop()


@pytest.fixture
def embedded() -> Iterator[Embedded]:
    handle = Embedded()
    handle.start()
    yield handle
    handle.stop()


@pytest.fixture
def mosquitto_sub() -> str:
    return require_program("mosquitto_sub")


@pytest.fixture
def mosquitto_pub() -> str:
    return require_program("mosquitto_pub")


@pytest.fixture
def gateway(broker: BrokerHandle, tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(broker, tmp_path)
    gw.start()
    yield gw
    gw.close()


@pytest.fixture
def started() -> Iterator[list[Process]]:
    """Processes a test started (`Process`): killed by PID when it ends, whatever happened."""
    procs: list[Process] = []
    yield procs
    for p in procs:
        p.kill()


NOBODY = ("--reuid=65534", "--regid=65534", "--clear-groups")


@pytest.fixture
def as_nobody() -> list[str]:
    """A command prefix that drops to an unprivileged user."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        if IN_CI:
            pytest.fail("CI runs as root with util-linux setpriv; this test must run there")
        pytest.skip("needs root and setpriv to drop privileges")
    probe = subprocess.run([setpriv, *NOBODY, sys.executable, "-c", "import homenet.agent.cli"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"the virtualenv is not readable by an unprivileged user: {probe.stderr.strip()}")
    return [setpriv, *NOBODY]


def _outside_tmp_path(mode: int) -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="homenet-shared-"))
    path.chmod(mode)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory everyone may write."""
    yield from _outside_tmp_path(0o777)


@pytest.fixture
def root_only_dir() -> Iterator[Path]:
    """A directory everyone may enter and read, and only root may write."""
    yield from _outside_tmp_path(0o755)
