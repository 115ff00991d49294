"""Gateway renumbering (docs/renumbering.md): when the gateway's LAN moves to another subnet, every
device is re-planned in it, the gateway's reservations and port forwards follow, and the agents
apply their new addresses with the safe-apply path, without a person. The pure core first, then
the configurator on a real broker, then the whole appliance in network namespaces."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from homenet.brokers import Embedded
from homenet.configurator.app import ADMIN, ADMIN_SECRET
from homenet.configurator.ipam import LanPlan
from homenet.configurator.lifecycle import State
from homenet.configurator.renumber import follow, left_the_lan, saved, saved_plan
from homenet.schemas import Topics
from homenet.schemas.messages import DeviceInfo, Interface, Ipv4Item, ResultStatus
from homenet.settings import LanSettings

from .conftest import require_program
from .gatewaylab import TCP_SERVER, WAN_HOST, multicast_unroutable, record_of, start_linux_home
from .harness import Gateway, wait_until
from .test_gateway_linux import RECEIVER, SENDER
from .netns import Lab, Namespace
from .test_day0 import AGENT

PLAN = LanPlan.build("192.168.50.0/24", "192.168.50.1", "192.168.50.100", "192.168.50.199",
                     dns=["192.168.50.1", "192.168.50.53", "9.9.9.9"])


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


# --- the pure core: what the new plan is -----------------------------------------------------

def test_the_plan_holds_while_the_gateway_keeps_its_address() -> None:
    assert follow(PLAN, [IPv4Interface("192.168.50.1/24")]) is None
    assert follow(PLAN, []) is None, "an interface without IPv4 (being readdressed) proves nothing"
    both = [IPv4Interface("192.168.60.1/24"), IPv4Interface("192.168.50.1/24")]
    assert follow(PLAN, both) is None, "new address added before the old one is removed: no flap"


def test_a_bridge_moved_to_another_subnet_carries_the_pool_and_dns_over() -> None:
    lan = follow(PLAN, [IPv4Interface("192.168.60.1/24")])
    assert lan == LanPlan.build("192.168.60.0/24", "192.168.60.1", "192.168.60.100", "192.168.60.199",
                                dns=["192.168.60.1", "192.168.60.53", "9.9.9.9"])


def test_a_smaller_subnet_gets_the_pool_by_its_share_a_larger_one_keeps_it() -> None:
    smaller = follow(PLAN, [IPv4Interface("10.0.0.1/25")])
    assert (smaller.pool_start, smaller.pool_end) == (ip("10.0.0.50"), ip("10.0.0.99"))
    larger = follow(PLAN, [IPv4Interface("192.168.50.1/16")])
    assert larger.subnet == IPv4Network("192.168.0.0/16")
    assert (larger.pool_start, larger.pool_end) == (ip("192.168.50.100"), ip("192.168.50.199"))


def _info(*addresses: str) -> DeviceInfo:
    return DeviceInfo(device_id="dev-1", device_type="camera", interfaces=[
        Interface(name="lo", addresses=["127.0.0.1/8"]),
        Interface(name="eth0", mac="02:00:00:00:00:01", addresses=[*addresses, "fe80::1/64"])])


def test_a_device_has_left_the_lan_when_its_address_there_is_replaced_by_others() -> None:
    before = _info("192.168.50.20/24")
    assert left_the_lan(PLAN, before, _info("192.168.60.57/24")) == ["192.168.60.57/24"]
    assert left_the_lan(PLAN, before, _info("192.168.50.21/24")) == [], "moved within the LAN"
    assert left_the_lan(PLAN, before, _info()) == [], "no IPv4 at all (e.g. link down) is not another LAN"
    assert left_the_lan(PLAN, _info(), _info("10.1.2.3/8")) == [], "it never was in the LAN (a new device)"


def test_the_saved_plan_is_kept_at_restart_unless_the_owner_changed_the_settings() -> None:
    settings = LanSettings(subnet="192.168.50.0/24", gateway="192.168.50.1",
                           pool_start="192.168.50.100", pool_end="192.168.50.199")
    moved = follow(PLAN, [IPv4Interface("192.168.60.1/24")])
    meta = json.loads(json.dumps({"epoch": 3, "lan": saved(moved, settings)}))  # as the store keeps it
    assert saved_plan(settings, meta) == moved
    assert saved_plan(settings.model_copy(update={"pool_end": "192.168.50.150"}), meta) is None
    assert saved_plan(settings, {"epoch": 3}) is None


# --- the configurator: re-plan, events, restart ----------------------------------------------

def _moved(lan: str) -> LanPlan:
    """The harness's LAN (192.168.1.0/24) as the gateway would report it moved to `lan`.1/24."""
    old = LanPlan.build("192.168.1.0/24", "192.168.1.1", "192.168.1.100", "192.168.1.199")
    return follow(old, [IPv4Interface(f"{lan}.1/24")])


def _index(events: list[dict[str, Any]], name: str, device_id: str | None = None, version: int | None = None) -> int:
    """Where the first event `name` (of the device, for the config version) is in the story."""
    return next(n for n, e in enumerate(events) if e["event"] == name
                and (device_id is None or e["device_id"] == device_id)
                and (version is None or e["detail"].get("version") == version))


def test_renumbering_moves_every_device_and_a_restart_keeps_the_new_plan(gateway: Gateway) -> None:
    agents = {kind: gateway.agent(kind) for kind in ("nas", "iptv-stb")}
    before = {kind: gateway.wait_configured(f"test-{kind}") for kind in agents}

    gateway.configurator.renumber(_moved("10.60.0"))  # what the LAN watch does when it sees the bridge move
    after = {kind: gateway.wait_configured(f"test-{kind}", version=2) for kind in agents}
    for kind, record in after.items():
        old, new = IPv4Address(before[kind].address), IPv4Address(record.address)
        assert new in IPv4Network("10.60.0.0/24") and new.packed[3] == old.packed[3], "host part kept"
        in_force = agents[kind].executor.in_force()["ipv4"]
        assert (in_force["address"], in_force["gateway"]) == (record.address, "10.60.0.1")
        assert in_force["dns"] == ["10.60.0.1"], "the DNS server was the old gateway: now the new one"
    state = gateway.configurator.driver.state()
    assert state.lan == "10.60.0.0/24"
    assert {str(r.address) for r in state.reservations} == {r.address for r in after.values()}
    assert [str(m.internal_address) for m in state.port_mappings] == [after["nas"].address]

    events = gateway.watcher.events()
    renumbered = events[_index(events, "lan.renumbered")]
    assert renumbered["detail"] == {"old": "192.168.1.0/24", "new": "10.60.0.0/24"}
    for kind in agents:  # the story: renumbered, then each device sent and applied its new config
        sent = _index(events, "config.sent", f"test-{kind}", 2)
        assert _index(events, "lan.renumbered") < sent < _index(events, "config.applied", f"test-{kind}", 2)

    gateway.stop()
    gateway.start()  # the settings still say 192.168.1.0/24; the saved plan wins: nothing flaps back
    assert gateway.configurator.driver.lan() == _moved("10.60.0")
    assert [gateway.record(f"test-{kind}").version for kind in agents] == [2, 2]
    assert sum(e["event"] == "lan.renumbered" for e in gateway.watcher.events()) == 1


def test_settings_changed_by_the_owner_after_a_renumbering_win(embedded: Embedded, tmp_path: Path) -> None:
    gateway = Gateway(embedded, tmp_path)
    gateway.start()
    try:
        gateway.agent("camera")
        gateway.wait_configured("test-camera")
        gateway.configurator.renumber(_moved("10.60.0"))
        gateway.wait_configured("test-camera", version=2)
        gateway.stop()
        gateway.lan = LanSettings(subnet="10.70.0.0/24", gateway="10.70.0.1",
                                  pool_start="10.70.0.100", pool_end="10.70.0.199")
        gateway.start()
        record = gateway.wait_configured("test-camera", version=3)
        assert IPv4Address(record.address) in IPv4Network("10.70.0.0/24")
    finally:
        gateway.close()


def test_a_device_waiting_for_the_owner_gets_no_config_from_a_renumbering(embedded: Embedded,
                                                                           tmp_path: Path) -> None:
    gateway = Gateway(embedded, tmp_path, enrollment="approve")
    gateway.start()
    try:
        gateway.agent("camera")
        wait_until(lambda: (r := gateway.record("test-camera")) and r.state == State.PENDING, what="pending")
        gateway.configurator.renumber(_moved("10.60.0"))
        record = gateway.record("test-camera")
        assert record.state == State.PENDING and record.config is None
    finally:
        gateway.close()


def test_a_device_that_left_the_lan_is_reported(embedded: Embedded, tmp_path: Path) -> None:
    """With a gateway the configurator cannot look at (here the memory driver), the owner is told."""
    gateway = Gateway(embedded, tmp_path)
    gateway.start()
    try:
        agent = gateway.agent("camera", info_interval=0.2)
        record = gateway.wait_configured("test-camera")
        wait_until(lambda: gateway.record("test-camera").info.interfaces[0].addresses, what="info with the address")
        # someone else moves the device (a DHCP client, the router's new subnet)
        moved_by_hand = next(i for i in record.config.items if isinstance(i, Ipv4Item)).model_copy(
            update={"address": IPv4Address("10.7.7.7"), "gateway": IPv4Address("10.7.7.1")})
        agent.executor.apply(moved_by_hand)
        event = gateway.watcher.wait_event("lan.mismatch", device_id="test-camera", severity="warning")
        assert event["reason"] == ("reports 10.7.7.7/24, outside the LAN 192.168.1.0/24; "
                                   "checking the gateway's LAN")
    finally:
        gateway.close()


# --- the appliance: a real bridge moves, real agents follow ----------------------------------

@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def restart_agent(home: Any, ns: Namespace, proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """Stop the device's agent and start it again with the same settings and state."""
    proc.terminate()
    proc.wait(10)
    data = home.tmp / ns.role
    return ns.popen(AGENT, "run", "--config", str(data / "agent.toml"), "--data-dir", str(data),
                    stdout=(data / "agent.log").open("a"), stderr=subprocess.STDOUT)


UDHCPC_SCRIPT = '#!/bin/sh\n[ "$1" = bound ] && echo "$ip" > "$(dirname "$0")/lease"\nexit 0\n'


def test_a_gateway_bridge_moved_to_another_subnet_takes_every_device_and_port_forward_along(
        lab: Lab, tmp_path: Path) -> None:
    ping, busybox, mosquitto_sub = require_program("ping"), require_program("busybox"), require_program("mosquitto_sub")
    home = start_linux_home(lab, tmp_path)
    dnsmasq = home.start_dnsmasq("192.168.50")
    home.start_gateway()
    nas, nas_proc, nas_log = home.device("nas", "nas")
    stb, stb_proc, stb_log = home.device("stb", "iptv-stb")
    home.wait_result(2)
    before = {ns.role: record_of(home, ns) for ns in (nas, stb)}
    mapping = next(i for i in before["nas"].config.items if i.kind == "port_mapping")
    nas.popen(sys.executable, "-c", TCP_SERVER, str(mapping.internal_port))
    # the NAS talks to the broker over the gateway's link-local address (day 0); the STB, restarted
    # with its address, over the gateway's IPv4 address, which the renumbering takes away
    stb_proc = restart_agent(home, stb, stb_proc)
    wait_until(lambda: "connected to mqtt://192.168.50.1:1883" in stb_log.read_text(), 30, "the STB over IPv4")
    secret = (tmp_path / "gw" / ADMIN_SECRET).read_text().strip()
    events_out = tmp_path / "events.txt"
    home.gw.popen("stdbuf", "-oL", mosquitto_sub, "-d", "-h", "127.0.0.1", "-u", ADMIN, "-P", secret, "-t", Topics().events,
                  stdout=events_out.open("w"), stderr=subprocess.STDOUT)
    wait_until(lambda: "SUBACK" in events_out.read_text(), 10, "the events subscription")

    # the firmware upgrade: the gateway's dnsmasq serves the new subnet and br0 moves to it
    dnsmasq.terminate()
    dnsmasq.wait(5)
    home.start_dnsmasq("192.168.60")
    moved_at = time.monotonic()
    home.gw.run("ip", "-batch", "-", input="addr del 192.168.50.1/24 dev br0\naddr add 192.168.60.1/24 dev br0\n")

    new_lan = IPv4Network("192.168.60.0/24")

    def all_moved() -> dict[str, Any] | None:
        records = {ns.role: record_of(home, ns) for ns in (nas, stb)}
        done = all(r.version > before[role].version and IPv4Address(r.address) in new_lan and r.result
                   and r.result.version == r.version and r.result.status == ResultStatus.OK
                   for role, r in records.items())
        return records if done else None

    after = wait_until(all_moved, 60, "both devices confirmed in 192.168.60.0/24")
    print(f"\nrenumbering: {len(after)} devices confirmed in {new_lan} "
          f"{time.monotonic() - moved_at:.1f} s after the bridge moved")

    for ns, proc, log in ((nas, nas_proc, nas_log), (stb, stb_proc, stb_log)):
        record = after[ns.role]
        assert IPv4Address(record.address).packed[3] == IPv4Address(before[ns.role].address).packed[3]
        assert ns.ipv4("eth0") == [f"{record.address}/24"], "the real interface: old address gone"
        assert ns.routes("default")[0]["gateway"] == "192.168.60.1"
        ns.run(ping, "-c", "1", "-W", "2", "192.168.60.1")
        assert proc.poll() is None, log.read_text()
    assert "no longer has 192.168.50.1; connecting to mqtt://[fe80::" in stb_log.read_text()

    # the port forward follows the NAS: nft points at its new address, and the WAN reaches it there
    nas_address = after["nas"].address
    rules = home.gw.run("nft", "list", "table", "inet", "homenet").stdout
    assert f"dnat ip to {nas_address}:{mapping.internal_port}" in rules and before["nas"].address not in rules
    reply = wait_until(lambda: (r := home.wan_connect(mapping.external_port)).returncode == 0 and r, 15,
                       "a connection from the WAN to the NAS")
    assert reply.stdout.strip() == f"hello {WAN_HOST} from the nas"
    # the reservations follow too: dnsmasq hands the NAS its new address
    hosts = (tmp_path / "dhcp-hosts").read_text()
    assert all(f"{r.info.interfaces[0].mac},{r.address}" in hosts for r in after.values())
    script = tmp_path / "udhcpc"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    nas.run(busybox, "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s", str(script), timeout=20)
    assert (tmp_path / "lease").read_text().strip() == nas_address

    # the IGMP proxy, started again on the new LAN, routes a stream from the WAN to the STB
    if (multicast := multicast_unroutable(home, after["stb"].device_id)) is None:
        home.wan.popen(sys.executable, "-c", SENDER, "239.10.0.1", "5004", WAN_HOST)
        received = stb.run(sys.executable, "-c", RECEIVER, "239.10.0.1", "5004", after["stb"].address, timeout=20)
        assert received.stdout.strip() == "channel 1"

    # the story on `events`: the LAN moved, then every device was sent its new config and applied it
    events = [json.loads(line)["body"] for line in events_out.read_text().splitlines() if line.startswith("{")]
    assert events[_index(events, "lan.renumbered")]["detail"] == {"old": "192.168.50.0/24", "new": "192.168.60.0/24"}
    for record in after.values():
        sent = _index(events, "config.sent", record.device_id, record.version)
        assert _index(events, "lan.renumbered") < sent < _index(events, "config.applied", record.device_id,
                                                                 record.version)

    # a restart after the renumbering keeps the new plan: no device moves again
    home.stop_gateway()
    home.start_gateway()
    wait_until(lambda: home.log().count(" online at ") == 2, 30, "the configurator online again")
    time.sleep(3)  # longer than the LAN check interval
    assert home.log().count("lan.renumbered") == 1
    assert {ns.role: record_of(home, ns).version for ns in (nas, stb)} == {r: after[r].version for r in after}
    if multicast:
        pytest.skip(multicast)
