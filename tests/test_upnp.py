"""The `upnp` path: a third-party router (Debian's miniupnpd-nftables, secure mode) maps a NAS's
port when the NAS's own agent asks (the `upnp` executor), and the policy hands port mappings
to the agent when the gateway kind is `upnp`."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homenet.configurator.policy import NetworkView, evaluate
from homenet.schemas.messages import (DeviceInfo, Interface, ItemStatus, PortMappingItem, ResultStatus, Target,
                                      item_key)

from .conftest import require_program
from .gatewaylab import TCP_CLIENT, TCP_SERVER, WAN_GW, WAN_HOST, GatewayHome, add_wan, record_of
from .harness import wait_until
from .netns import Lab, Namespace
from .test_policy import LAN

ROUTER = "192.168.60.1"
ROUTER_TABLE = """\
table inet miniupnpd {
    chain forward { type filter hook forward priority filter; policy accept; jump miniupnpd; }
    chain miniupnpd { }
    chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }
    chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }
    chain prerouting_miniupnpd { }
    chain postrouting_miniupnpd { }
}
table ip nat {
    chain post { type nat hook postrouting priority srcnat; policy accept; oifname "wan0" masquerade; }
}
"""
MINIUPNPD_CONF = """\
ext_ifname=wan0
listening_ip=br0
http_port=0
enable_natpmp=no
enable_upnp=yes
secure_mode=yes
system_uptime=yes
uuid=5d8f6e3a-1b2c-4d5e-8f90-1a2b3c4d5e6f
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
allow 1-65535 192.168.60.0/24 1-65535
deny 0-65535 0.0.0.0/0 0-65535
"""
AGENT_SIDE = textwrap.dedent("""\
    import json, sys
    from pathlib import Path
    from homenet.agent.executor import SimulatedExecutor
    from homenet.agent.upnp import UpnpExecutor
    from homenet.schemas.messages import PortMappingItem
    data = Path(sys.argv[1])
    executor = UpnpExecutor(SimulatedExecutor(data), data, lease=120)
    item = PortMappingItem(target="agent", protocol="tcp", external_port=8443, internal_port=443,
                           description="NAS remote access")
    executor.checkpoint()
    result = executor.apply(item)
    out = {"result": result.model_dump(mode="json"), "renewed": executor.renew(), "in_force": executor.in_force()}
    # a next config maps another port, then is rolled back: the first mapping is the one renewed
    before = executor.checkpoint()
    out["second"] = executor.apply(item.model_copy(update={"external_port": 9443})).status
    executor.rollback(before)
    out["renewed_after_rollback"] = executor.renew()
    out["in_force_after_rollback"] = executor.in_force()
    print(json.dumps(out))
    """)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def test_policy_delegates_port_mappings_to_the_agent_behind_a_upnp_router() -> None:
    nas = DeviceInfo(device_id="nas-1", device_type="nas",
                     interfaces=[Interface(name="eth0", mac="02:00:00:00:00:01")])
    own = {i.kind: i.target for i in evaluate(nas, NetworkView(LAN, gateway="linux")).items}
    upnp = {i.kind: i.target for i in evaluate(nas, NetworkView(LAN, gateway="upnp")).items}
    assert own == {"ipv4": Target.AGENT, "qos": Target.GATEWAY, "port_mapping": Target.GATEWAY}
    assert upnp == {"ipv4": Target.AGENT, "qos": Target.GATEWAY, "port_mapping": Target.AGENT}


def start_router(lab: Lab, tmp: Path) -> tuple[Namespace, Namespace]:
    """The third-party router (br0 ROUTER/24 on the LAN, NAT to wan0, miniupnpd in secure mode)
    and the `wan` namespace behind it. Devices plug into the router's br0 (`lab.veth`)."""
    miniupnpd = require_program("miniupnpd", "/usr/sbin/miniupnpd")
    require_program("nft", "/usr/sbin/nft")
    router = lab.namespace("router")
    lab.bridge(router, "br0", f"{ROUTER}/24")
    wan = add_wan(lab, router)
    router.run("nft", "-f", "-", input=ROUTER_TABLE)  # miniupnpd fills its chains, never creates them
    conf = tmp / "miniupnpd.conf"
    conf.write_text(MINIUPNPD_CONF)
    router.popen(miniupnpd, "-f", str(conf), "-d", stdout=(tmp / "miniupnpd.log").open("w"),
                 stderr=(tmp / "miniupnpd.err").open("w"))
    wait_until(lambda: "HTTP listening" in (tmp / "miniupnpd.log").read_text()
               + (tmp / "miniupnpd.err").read_text(), 5, "miniupnpd listening")
    return router, wan


def test_nas_maps_its_port_on_a_miniupnpd_router(lab: Lab, tmp_path: Path) -> None:
    router, wan = start_router(lab, tmp_path)
    nas = lab.namespace("nas")
    lab.veth(nas, router)
    nas.run("ip", "addr", "add", "192.168.60.20/24", "dev", "eth0")
    nas.run("ip", "route", "add", "default", "via", ROUTER)
    nas.popen(sys.executable, "-c", TCP_SERVER, "443")

    done = nas.run(sys.executable, "-c", AGENT_SIDE, str(tmp_path), timeout=30)
    out = json.loads(done.stdout)
    assert out["result"]["status"] == "applied", out
    assert "-> 192.168.60.20:443" in out["result"]["detail"]
    assert out["renewed"] is True, done.stderr
    assert out["in_force"]["upnp_port_mappings"][0]["internal_client"] == "192.168.60.20"
    assert "dnat ip to 192.168.60.20:443" in router.run("nft", "list", "table", "inet", "miniupnpd").stdout

    reply = wait_until(lambda: (r := wan.run("python3", "-c", TCP_CLIENT, WAN_GW, "8443", check=False)).returncode == 0
                       and r, 10, "a connection from the WAN through the router's mapping")
    assert reply.stdout.strip() == f"hello {WAN_HOST} from the nas"
    assert out["second"] == "applied" and out["renewed_after_rollback"] is True
    assert [m["external_port"] for m in out["in_force_after_rollback"]["upnp_port_mappings"]] == [8443]
    leases = json.loads((tmp_path / "upnp.json").read_text())
    assert list(leases) == ["port_mapping:tcp/8443"], "the rolled-back mapping is not renewed"
    assert leases["port_mapping:tcp/8443"]["internal_client"] == "192.168.60.20"


SERVER = "192.168.60.100"
"""The home server running `homenet gateway run`: an address from the router's DHCP pool."""
LEASE = 8
"""The NAS's UPnP lease (renewed every 4 s), short so that its expiry is seen within the test."""


def test_nas_behind_a_third_party_router_end_to_end(lab: Lab, tmp_path: Path) -> None:
    """`gateway_driver = "upnp"`: the configurator runs on a home server, not on the router. The
    NAS's agent maps its own port on miniupnpd; gateway items are reported unsupported. When the
    NAS has left and is forgotten, the router keeps its mapping until the lease ends."""
    router, wan = start_router(lab, tmp_path)
    server = lab.namespace("server")
    lab.veth(server, router)
    server.run("ip", "addr", "add", f"{SERVER}/24", "dev", "eth0")
    home = GatewayHome(lab, server, tmp_path, lan=router, wan=wan)
    home.conf.write_text(textwrap.dedent(f"""\
        [configurator]
        gateway_driver = "upnp"
        data_dir = "{tmp_path / 'gw'}"

        [configurator.lan]
        subnet = "192.168.60.0/24"
        gateway = "{ROUTER}"
        pool_start = "192.168.60.100"
        pool_end = "192.168.60.199"
        """))
    home.start_gateway(beacon="eth0")
    nas, proc, log = home.device("nas", "nas", settings=f"upnp_lease = {LEASE}\n")
    home.wait_result(1)
    mapped_at = time.monotonic()
    record = record_of(home, nas)
    mapping = next(i for i in record.config.items if isinstance(i, PortMappingItem))
    key = item_key(mapping)
    assert mapping.target == Target.AGENT and mapping.external_port == 443
    result = {r.item: r for r in record.result.items}
    assert record.result.status == ResultStatus.OK, record.result
    assert result[key].status == ItemStatus.APPLIED
    assert f"-> {record.address}:443 on {ROUTER}, lease {LEASE} s" in result[key].detail
    assert record.result.in_force["upnp_port_mappings"][0]["internal_client"] == str(record.address)
    nas.popen(sys.executable, "-c", TCP_SERVER, "443")
    reply = wait_until(lambda: (r := home.wan_connect(443)).returncode == 0 and r, 10,
                       "a connection from the WAN through the router's mapping")
    assert reply.stdout.strip() == f"hello {WAN_HOST} from the nas"
    # while the agent runs it renews the lease, so the mapping outlives it
    time.sleep(max(0.0, mapped_at + LEASE + 1 - time.monotonic()))
    wait_until(lambda: home.wan_connect(443).returncode == 0, 3, "the mapping after its first lease")
    assert "has expired" not in (tmp_path / "miniupnpd.err").read_text()

    # what the configurator did: the mapping delegated to the NAS; nothing it could not do
    state = home.gateway_state()
    assert (state["driver"], state["reservations"], state["qos"], state["igmp_proxy"]) == ("upnp", [], [], False)
    assert [(m["device_id"], m["internal_address"], m["external_port"]) for m in state["port_mappings"]] == [
        (record.device_id, str(record.address), 443)]
    text = home.wait_log(f"gateway.unsupported device={record.device_id}: qos: UPnP IGD has no traffic priority")
    assert f"gateway.unsupported device={record.device_id}: reservation: a third-party router's DHCP" in text

    # the NAS leaves and is forgotten: the router's entry is the NAS's own, so it is not deleted
    # but expires (miniupnpd logs why), with no agent left to renew it
    assert proc.poll() is None, log.read_text()
    proc.terminate()
    proc.wait(10)
    out = home.forget(record.device_id)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: home.gateway_state()["port_mappings"] == [], 5, "gateway/state without the mapping")
    refused = wait_until(lambda: (r := home.wan_connect(443)).returncode != 0 and r, LEASE + 5,
                         "the router dropping the mapping at the end of its lease")
    assert "Connection refused" in refused.stderr
    assert "443" not in router.run("nft", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd").stdout
    assert "remove port mapping 443 TCP because it has expired" in (tmp_path / "miniupnpd.err").read_text()
