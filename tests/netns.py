"""Network namespaces for tests: a home LAN of real interfaces, always torn down.

    with Lab() as lab:
        gw = lab.namespace("gw")
        lab.bridge(gw, "br0", "192.168.50.1/24")
        dev = lab.namespace("dev")
        lab.veth(dev, gw)                       # dev's eth0 is a port of gw's br0
        dev.run("ip", "addr", "add", "192.168.50.2/24", "dev", "eth0")
        assert dev.ipv4("eth0") == ["192.168.50.2/24"]

Namespaces are named `hn<6 hex>-<role>`, unique per lab, so labs of parallel or crashed runs
do not collide. When the `with` block ends, also on a failed test, the processes started with
`popen` are stopped and the namespaces deleted (which deletes their veths and bridges). Without
root or `ip netns`, entering a lab skips the test, or fails it under CI (CI=true).
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from types import TracebackType
from typing import Any

import pytest

from .conftest import IN_CI

ROLE = re.compile(r"^[a-z0-9]{1,10}$")
"""Short enough that `vp-<role>`, the bridge side of a veth, fits the 15 characters of IFNAMSIZ."""


@functools.cache
def _netns_problem() -> str | None:
    """Why network namespaces cannot be used here, or None; probed once per run."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "ip is not installed (Debian package iproute2)"
    probe = f"hn{secrets.token_hex(3)}-probe"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"`ip netns add` does not work here: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@functools.cache
def multicast_routing_problem() -> str | None:
    """Why this kernel cannot route multicast (igmpproxy's MRT_INIT fails), or None. Asked once
    per run with the gateway's own probe, in a throwaway namespace (MRT_INIT is per namespace)."""
    require_netns()
    probe = f"hn{secrets.token_hex(3)}-mroute"
    _run(["ip", "netns", "add", probe])
    try:
        said = _run(["ip", "netns", "exec", probe, sys.executable, "-c",
                     "from homenet.configurator.drivers.igmpproxy import kernel_problem; print(kernel_problem() or '')"])
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return said.stdout.strip() or None


def require_netns() -> None:
    """Skip the test (laptop) or fail it (CI) when namespaces cannot be used."""
    if problem := _netns_problem():
        if IN_CI:
            pytest.fail(problem + ": CI must run as root with iproute2 installed")
        pytest.skip(problem)


def _run(args: list[str], input: str | None = None, check: bool = True,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done


class Namespace:
    """One network namespace of a lab."""

    def __init__(self, lab: Lab, role: str) -> None:
        self.lab = lab
        self.role = role
        self.name = f"{lab.prefix}-{role}"

    def __str__(self) -> str:
        return self.name

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (`ip netns exec`); text output captured.

        With `check`, a non-zero exit raises RuntimeError carrying the command's stderr.
        """
        return _run(["ip", "netns", "exec", self.name, *args], input, check, timeout)

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a long-running command inside the namespace; the lab stops it at the end."""
        process = subprocess.Popen(["ip", "netns", "exec", self.name, *args], text=True, **kwargs)
        self.lab.processes.append(process)
        return process

    def ip(self, *args: str) -> Any:
        """`ip -n NS -j ARGS`, parsed: e.g. `ns.ip("route", "show", "default")`."""
        out = _run(["ip", "-n", self.name, "-j", *args]).stdout
        return json.loads(out) if out.strip() else []

    def addresses(self, ifname: str) -> list[dict[str, Any]]:
        """The `addr_info` entries of an interface (both families), as `ip -j addr show` gives them."""
        return self.ip("addr", "show", "dev", ifname)[0]["addr_info"]

    def ipv4(self, ifname: str) -> list[str]:
        """The interface's IPv4 addresses in CIDR notation, in the kernel's order."""
        return [f"{a['local']}/{a['prefixlen']}" for a in self.addresses(ifname) if a["family"] == "inet"]

    def routes(self, *selector: str) -> list[dict[str, Any]]:
        """`ip -j route show SELECTOR` (IPv4, main table), e.g. `ns.routes("default")`."""
        return self.ip("route", "show", *selector)

    def mac(self, ifname: str) -> str:
        return self.ip("link", "show", "dev", ifname)[0]["address"]


class Lab:
    """Namespaces, bridges, veths and processes of one test, removed at the end of `with`."""

    def __init__(self) -> None:
        self.prefix = f"hn{secrets.token_hex(3)}"
        self.namespaces: list[Namespace] = []
        self.processes: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Lab:
        require_netns()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def namespace(self, role: str) -> Namespace:
        """A new namespace with its loopback up; `role` is short and unique in the lab (`gw`, `stb1`)."""
        if not ROLE.match(role) or any(ns.role == role for ns in self.namespaces):
            raise ValueError(f"namespace role {role!r}: 1-10 of [a-z0-9], unique in the lab")
        ns = Namespace(self, role)
        _run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)  # before anything else can fail: close() must delete it
        _run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        return ns

    def bridge(self, ns: Namespace, name: str = "br0", address: str | None = None) -> str:
        """A bridge, up, in `ns`, with an address (CIDR) if given; returns its name."""
        _run(["ip", "-n", ns.name, "link", "add", name, "type", "bridge"])
        if address:
            _run(["ip", "-n", ns.name, "addr", "add", address, "dev", name])
        _run(["ip", "-n", ns.name, "link", "set", name, "up"])
        return name

    def veth(self, device: Namespace, bridge_ns: Namespace, bridge: str = "br0", ifname: str = "eth0",
             mac: str | None = None) -> str:
        """A veth pair: `ifname` (up, MAC `mac` if given) in `device`, its peer a port of `bridge`
        in `bridge_ns`. Returns the peer's name, `vp-<device role>`."""
        port = f"vp-{device.role}"
        _run(["ip", "link", "add", ifname, "netns", device.name, *(["address", mac] if mac else []),
              "type", "veth", "peer", "name", port, "netns", bridge_ns.name])
        _run(["ip", "-n", bridge_ns.name, "link", "set", port, "master", bridge, "up"])
        _run(["ip", "-n", device.name, "link", "set", ifname, "up"])
        return port

    def close(self) -> None:
        """Stop the processes, then delete the namespaces; never raises, so cleanup always runs."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        for ns in reversed(self.namespaces):
            _run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()
