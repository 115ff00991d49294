"""igmpproxy as the linux driver's child: starting it never blocks the driver's thread, a process
that dies at start is reported as a failure with its exit status, and a kernel without
multicast routing is named as the reason instead of starting a process that cannot work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from homenet.configurator.drivers import GatewayError, igmpproxy

from .harness import wait_until

CONF = igmpproxy.render_conf("wan0", "br0", ["lo", "wan0", "br0"])


@pytest.fixture
def routing_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a kernel with CONFIG_IP_MROUTE, whatever this one has: the process handling is under test."""
    monkeypatch.setattr(igmpproxy, "kernel_problem", lambda: None)


def test_a_start_returns_at_once_and_a_process_that_died_is_reported_with_its_status(
        tmp_path: Path, routing_kernel: None) -> None:
    proxy = igmpproxy.IgmpProxy("/bin/false", tmp_path / "igmpproxy.conf")
    started = time.monotonic()
    proxy.ensure(True, CONF)
    assert time.monotonic() - started < igmpproxy.STARTUP_GRACE, "the driver's thread is not held up"
    assert proxy.starting()
    wait_until(lambda: proxy._process.poll() is not None, 5, "/bin/false to exit")
    with pytest.raises(GatewayError, match=r"igmpproxy exited with status 1; see .*igmpproxy.log"):
        proxy.ensure(True, CONF)
    assert not proxy.starting() and not proxy.running()


def test_a_process_that_outlives_the_grace_counts_as_started(tmp_path: Path, routing_kernel: None) -> None:
    sleeper = tmp_path / "igmpproxy"
    sleeper.write_text("#!/bin/sh\nexec sleep 30\n")
    sleeper.chmod(0o755)
    proxy = igmpproxy.IgmpProxy(str(sleeper), tmp_path / "igmpproxy.conf")
    try:
        proxy.ensure(True, CONF)
        time.sleep(igmpproxy.STARTUP_GRACE)
        proxy.ensure(True, CONF)
        assert proxy.running() and not proxy.starting()
    finally:
        proxy.stop()
    assert not proxy.running()


def test_a_kernel_without_multicast_routing_is_named_and_nothing_is_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(igmpproxy, "kernel_problem", lambda: igmpproxy.NO_MROUTE)
    proxy = igmpproxy.IgmpProxy("/bin/false", tmp_path / "igmpproxy.conf")
    with pytest.raises(GatewayError, match=r"^kernel lacks multicast routing \(CONFIG_IP_MROUTE\)$"):
        proxy.ensure(True, CONF)
    assert not proxy.running() and not (tmp_path / "igmpproxy.conf").exists()
