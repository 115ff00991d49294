"""The iproute2 executor and safe apply, on real interfaces in network namespaces.

The executor runs inside the device namespace (a child python started with `ip netns exec`,
so its netlink socket and its TCP checks live there); assertions read the interface with
`ip -n NS -j`, never the executor's own report. A gateway namespace holds the LAN bridge and
the "broker" (a TCP listener). Safe apply is also checked through a whole agent with the
simulated executor and a real broker and configurator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from homenet.agent.app import open_device
from homenet.agent.dns import RESOLV_CONF, read_file
from homenet.agent.executor import SimulatedExecutor
from homenet.agent.safeapply import apply_safely
from homenet.agent.service import Agent
from homenet.brokers import Embedded
from homenet.mqtt import BrokerUrl
from homenet.netutil import free_port
from homenet.schemas.messages import Ipv4Item, ItemStatus, QosClass, QosItem, ResultStatus, Target
from homenet.settings import AgentSettings, SettingsError, load

from .harness import Gateway, wait_until
from .netns import Lab, Namespace

MAC = "02:00:5e:00:00:02"
ITEM = Ipv4Item(interface="eth0", address="192.168.50.20", prefix_len=24, gateway="192.168.50.1",
                dns=["192.168.50.1", "2001:db8::53"])
CUT_OFF = Ipv4Item(interface="eth0", address="10.99.0.2", prefix_len=24, gateway="10.99.0.1", dns=["10.99.0.53"])

RUNNER = """
import json, sys
from pathlib import Path
from pydantic import TypeAdapter
from homenet.agent.dns import detect
from homenet.agent.iproute2 import Iproute2Executor
from homenet.agent.safeapply import apply_safely
from homenet.schemas.messages import ConfigItem

request = json.load(sys.stdin)
executor = Iproute2Executor(detect(Path(request["resolv_conf"]) if request["resolv_conf"] else None))
items = TypeAdapter(list[ConfigItem]).validate_python(request["items"])
if request["op"] == "safe":
    results = apply_safely(executor, items, [tuple(e) for e in request["endpoints"]], request["deadline"])
else:
    checkpoint = executor.checkpoint() if request["op"] == "rollback" else None
    results = [executor.apply(item) for item in items]
    if checkpoint is not None:
        executor.rollback(checkpoint)
print(json.dumps({"results": [r.model_dump(mode="json") for r in results], "in_force": executor.in_force()}))
"""

LISTENER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
time.sleep(600)
"""


@dataclass
class Lan:
    """A gateway namespace with br0 at 192.168.50.1/24; a device whose eth0 has .2 and a default route."""

    gw: Namespace
    dev: Namespace
    resolv: Path

    def execute(self, op: str, *items: Any, resolv: Path | None | str = "lan", prefix: tuple[str, ...] = (),
                **extra: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """Run the executor in the device namespace (under `prefix`, e.g. setpriv): `apply`,
        `rollback` (checkpoint, apply, rollback) or `safe` (apply_safely with `endpoints` and
        `deadline`); DNS goes to `resolv` (the lab's file; None: the host's way)."""
        resolv = self.resolv if resolv == "lan" else resolv
        request = {"op": op, "resolv_conf": str(resolv) if resolv else None,
                   "items": [i.model_dump(mode="json") for i in items], **extra}
        out = json.loads(self.dev.run(*prefix, sys.executable, "-c", RUNNER, input=json.dumps(request)).stdout)
        return out["results"], out["in_force"]

    def state(self) -> dict[str, Any]:
        """What the executor may change, as the system shows it."""
        path = self.resolv
        return {
            "addresses": [{k: a.get(k) for k in ("family", "local", "prefixlen", "broadcast", "scope")}
                          for a in self.dev.addresses("eth0")],
            "routes": self.dev.routes(),
            "resolv": (os.readlink(path) if path.is_symlink() else None,
                       path.read_bytes() if path.exists() else None,
                       path.stat().st_mode & 0o7777 if path.exists() else None),
        }

    def broker(self) -> int:
        """A TCP listener at 192.168.50.1 in the gateway namespace; its port."""
        process = self.gw.popen(sys.executable, "-c", LISTENER, "192.168.50.1", stdout=subprocess.PIPE)
        assert process.stdout is not None
        return int(process.stdout.readline())


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    with Lab() as lab:
        gw = lab.namespace("gw")
        lab.bridge(gw, "br0", "192.168.50.1/24")
        dev = lab.namespace("dev")
        lab.veth(dev, gw, mac=MAC)
        dev.run("ip", "addr", "add", "192.168.50.2/24", "dev", "eth0")
        dev.run("ip", "route", "add", "default", "via", "192.168.50.1")
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("search home.arpa\nnameserver 192.168.50.1\n")
        yield Lan(gw, dev, resolv)


def inet6(ns: Namespace) -> list[tuple[str, int]]:
    return [(a["local"], a["prefixlen"]) for a in ns.addresses("eth0") if a["family"] == "inet6"]


# --- the executor on real interfaces -----------------------------------------------------------

def test_apply_sets_exactly_the_item_leaves_ipv6_alone_and_is_then_unchanged(lan: Lan) -> None:
    lan.dev.run("ip", "addr", "add", "192.168.50.9/24", "dev", "eth0")  # a secondary in the subnet
    lan.dev.run("ip", "addr", "add", "10.1.0.5/16", "dev", "eth0")  # and another subnet
    link_local = inet6(lan.dev)
    assert link_local and link_local[0][0].startswith("fe80:")

    results, in_force = lan.execute("apply", ITEM)

    assert results == [{"item": "ipv4", "status": "applied", "detail": ""}]
    assert lan.dev.ipv4("eth0") == ["192.168.50.20/24"]
    assert inet6(lan.dev) == link_local
    assert [(r["gateway"], r["dev"]) for r in lan.dev.routes("default")] == [("192.168.50.1", "eth0")]
    assert lan.resolv.read_text() == "search home.arpa\nnameserver 192.168.50.1\nnameserver 2001:db8::53\n"
    assert lan.resolv.stat().st_mode & 0o777 == 0o644
    assert in_force == {"ipv4": {"interface": "eth0", "mac": MAC, "addresses": ["192.168.50.20/24"],
                                 "gateway": "192.168.50.1", "dns": ["192.168.50.1", "2001:db8::53"]}}

    before = lan.state()
    results, _ = lan.execute("apply", ITEM)
    assert results == [{"item": "ipv4", "status": "unchanged", "detail": ""}]
    assert lan.state() == before


def test_an_unknown_interface_name_falls_back_to_the_mac(lan: Lan) -> None:
    results, _ = lan.execute("apply", ITEM.model_copy(update={"interface": "enp3s0", "mac": MAC}))
    assert results[0]["status"] == "applied"
    assert lan.dev.ipv4("eth0") == ["192.168.50.20/24"]


def test_failures_are_reported_with_the_reason_and_change_nothing(lan: Lan) -> None:
    before = lan.state()
    results, _ = lan.execute(
        "apply",
        ITEM.model_copy(update={"interface": "eth9"}),
        ITEM.model_copy(update={"interface": "eth9", "mac": "02:00:5e:00:00:99"}),
        ITEM.model_copy(update={"gateway": CUT_OFF.gateway}),  # not on the item's subnet
        QosItem(qos_class=QosClass.VIDEO, dscp=32, target=Target.AGENT))

    assert [r["status"] for r in results] == ["failed", "failed", "failed", "unsupported"]
    assert results[0]["detail"] == "interface eth9 not found"
    assert results[1]["detail"] == "interface eth9 not found, nor one with MAC 02:00:5e:00:00:99"
    assert results[2]["detail"].startswith("setting the default route via 10.99.0.1 on eth0: ")
    assert results[2]["detail"].endswith("; previous settings restored")
    assert "qos" in results[3]["detail"]
    assert lan.state() == before


@pytest.mark.parametrize("resolv", ["file", "symlink", "absent"])
def test_rollback_restores_addresses_route_and_resolv_conf_exactly(lan: Lan, tmp_path: Path, resolv: str) -> None:
    lan.dev.run("ip", "addr", "add", "192.168.50.9/24", "brd", "+", "dev", "eth0")
    if resolv == "symlink":  # as with systemd-resolved
        stub = tmp_path / "stub-resolv.conf"
        stub.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
        lan.resolv.unlink()
        lan.resolv.symlink_to(stub)
    elif resolv == "absent":
        lan.resolv.unlink()
    before = lan.state()

    results, _ = lan.execute("rollback", CUT_OFF)

    assert results[0]["status"] == "applied"
    assert lan.state() == before


# --- DNS the host's way ------------------------------------------------------------------------

def test_under_ip_netns_exec_the_hosts_resolv_conf_is_never_touched(lan: Lan) -> None:
    host = read_file(RESOLV_CONF)
    results, in_force = lan.execute("apply", ITEM, resolv=None)

    assert results[0]["status"] == "applied"
    assert results[0]["detail"] == (f"address and route set; DNS not set (none): running in network namespace "
                                    f"{lan.dev}: the host's /etc/resolv.conf is left alone (create "
                                    f"/etc/netns/{lan.dev}/resolv.conf for this namespace's own, or set resolv_conf)")
    assert lan.dev.ipv4("eth0") == ["192.168.50.20/24"]
    assert in_force["ipv4"]["dns"] == []
    assert read_file(RESOLV_CONF) == host


def test_under_ip_netns_exec_the_namespaces_own_resolv_conf_is_written(lan: Lan) -> None:
    own = Path("/etc/netns") / str(lan.dev) / "resolv.conf"
    own.parent.mkdir(parents=True)
    try:
        own.write_text("search home.arpa\n")
        host = read_file(RESOLV_CONF)
        results, in_force = lan.execute("apply", ITEM, resolv=None)
        assert results == [{"item": "ipv4", "status": "applied", "detail": ""}]
        assert own.read_text() == "search home.arpa\nnameserver 192.168.50.1\nnameserver 2001:db8::53\n"
        assert in_force["ipv4"]["dns"] == ["192.168.50.1", "2001:db8::53"]
        assert read_file(RESOLV_CONF) == host
    finally:
        shutil.rmtree(own.parent)


def test_dns_that_cannot_be_written_costs_neither_the_address_nor_the_route(lan: Lan, as_nobody: list[str],
                                                                            root_only_dir: Path) -> None:
    """As under the shipped unit: a non-root user with ambient CAP_NET_ADMIN, /etc not writable."""
    resolv = root_only_dir / "resolv.conf"
    resolv.write_text("nameserver 192.168.50.1\n")
    unit_like = (*as_nobody, "--inh-caps=+net_admin", "--ambient-caps=+net_admin")
    results, in_force = lan.execute("apply", ITEM, resolv=resolv, prefix=unit_like)
    assert results == [{"item": "ipv4", "status": "applied", "detail": (
        f"address and route set; DNS not set (file): writing {resolv}: Permission denied")}]
    assert lan.dev.ipv4("eth0") == ["192.168.50.20/24"]
    assert [(r["gateway"], r["dev"]) for r in lan.dev.routes("default")] == [("192.168.50.1", "eth0")]
    assert resolv.read_text() == "nameserver 192.168.50.1\n"
    assert in_force["ipv4"]["dns"] == ["192.168.50.1"]


# --- safe apply --------------------------------------------------------------------------------

def test_settings_that_lose_the_broker_are_rolled_back(lan: Lan) -> None:
    port = lan.broker()
    before = lan.state()

    results, in_force = lan.execute("safe", CUT_OFF, endpoints=[["192.168.50.1", port]], deadline=2)

    assert [(r["item"], r["status"]) for r in results] == [("ipv4", "rolled_back")]
    assert results[0]["detail"].startswith(f"broker 192.168.50.1:{port} unreachable from 10.99.0.2 within 2 s: ")
    assert lan.state() == before
    assert in_force["ipv4"]["addresses"] == ["192.168.50.2/24"]


def test_settings_that_reach_the_broker_stay(lan: Lan) -> None:
    port = lan.broker()
    results, _ = lan.execute("safe", ITEM, endpoints=[["192.168.50.1", port]], deadline=2)
    assert results == [{"item": "ipv4", "status": "applied", "detail": ""}]
    assert lan.dev.ipv4("eth0") == ["192.168.50.20/24"]


def test_safe_apply_with_the_simulated_executor(tmp_path: Path) -> None:
    executor = SimulatedExecutor(tmp_path)
    closed = [("127.0.0.1", free_port())]
    kept = apply_safely(executor, [ITEM], [], 0.3)  # no IPv4 endpoint: nothing to verify with
    assert kept[0].status == ItemStatus.APPLIED
    assert apply_safely(executor, [ITEM], closed, 30)[0].status == ItemStatus.UNCHANGED  # no check

    results = apply_safely(executor, [CUT_OFF], closed, 0.3)

    assert results[0].status == ItemStatus.ROLLED_BACK
    assert results[0].detail.startswith(f"broker 127.0.0.1:{closed[0][1]} unreachable from 10.99.0.2 within 0.3 s: ")
    assert executor.in_force()["ipv4"]["address"] == "192.168.50.20"
    assert SimulatedExecutor(tmp_path).in_force() == executor.in_force()  # the rollback was saved


def test_an_agent_reports_rolled_back_and_keeps_its_applied_version(tmp_path: Path) -> None:
    broker = Embedded()
    broker.start()
    gateway = Gateway(broker, tmp_path)
    try:
        gateway.start()
        settings = AgentSettings(broker=broker.url, device_id="stb-rb", device_type="iptv-stb",
                                 collector="simulated", data_dir=tmp_path / "agent", apply_deadline=0.3)
        device = open_device(settings)
        # by name, so only the closed endpoint below counts for the check
        url = replace(BrokerUrl.parse(broker.url), host="localhost")
        agent = Agent(device, url, verify=[("127.0.0.1", free_port()), ("fe80::1", 1883)])
        gateway.agents.append(agent)
        agent.start()

        record = wait_until(lambda: (r := gateway.record("stb-rb")) and r.result and r, what="a config.result")
        assert record.result.status == ResultStatus.ROLLED_BACK
        assert [(i.item, i.status) for i in record.result.items] == [("ipv4", ItemStatus.ROLLED_BACK)]
        assert "unreachable from" in record.result.items[0].detail
        assert agent.state.state.applied_version == 0  # a corrected version will apply
        assert agent.executor.in_force() == {}
        gateway.watcher.wait_event("config.failed", device_id="stb-rb")
    finally:
        gateway.close()
        broker.stop()


# --- executor selection ------------------------------------------------------------------------

def test_auto_picks_iproute2_for_a_real_device_with_cap_net_admin(tmp_path: Path) -> None:
    from homenet.agent import iproute2

    real = open_device(AgentSettings(data_dir=tmp_path / "real", device_id="d1"))
    assert real.executor.name == ("iproute2" if iproute2.usable() else "simulated")
    simulated = open_device(AgentSettings(data_dir=tmp_path / "sim", device_id="d2", collector="simulated"))
    assert simulated.executor.name == "simulated"
    with pytest.raises(SettingsError, match="simulated collector needs executor 'simulated'"):
        load(AgentSettings, None, {"collector": "simulated", "executor": "iproute2"})
