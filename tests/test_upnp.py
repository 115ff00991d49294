"""The `upnp` path: a third-party router (Debian's miniupnpd-nftables, secure mode) maps a NAS's
port when the NAS's own agent asks (the `upnp` executor), and the policy hands port mappings
to the agent when the gateway kind is `upnp`."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from homenet.configurator.policy import NetworkView, evaluate
from homenet.schemas.messages import DeviceInfo, Interface, Target

from .conftest import require_program
from .gatewaylab import TCP_CLIENT, TCP_SERVER, WAN_GW, WAN_HOST
from .harness import wait_until
from .netns import Lab
from .test_policy import LAN

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
allow 1024-65535 192.168.60.0/24 1-65535
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
    print(json.dumps({"result": result.model_dump(mode="json"), "renewed": executor.renew(),
                      "in_force": executor.in_force()}))
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


def test_nas_maps_its_port_on_a_miniupnpd_router(lab: Lab, tmp_path: Path) -> None:
    miniupnpd = require_program("miniupnpd", "/usr/sbin/miniupnpd")
    require_program("nft", "/usr/sbin/nft")
    router, wan, nas = lab.namespace("router"), lab.namespace("wan"), lab.namespace("nas")
    lab.bridge(router, "br0", "192.168.60.1/24")
    router.run("ip", "link", "add", "wan0", "type", "veth", "peer", "name", "eth0", "netns", wan.name)
    router.run("ip", "addr", "add", f"{WAN_GW}/24", "dev", "wan0")
    router.run("ip", "link", "set", "wan0", "up")
    wan.run("ip", "addr", "add", f"{WAN_HOST}/24", "dev", "eth0")
    wan.run("ip", "link", "set", "eth0", "up")
    router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    router.run("nft", "-f", "-", input=ROUTER_TABLE)  # miniupnpd fills its chains, never creates them
    lab.veth(nas, router)
    nas.run("ip", "addr", "add", "192.168.60.20/24", "dev", "eth0")
    nas.run("ip", "route", "add", "default", "via", "192.168.60.1")
    conf = tmp_path / "miniupnpd.conf"
    conf.write_text(MINIUPNPD_CONF)
    router.popen(miniupnpd, "-f", str(conf), "-d", stdout=(tmp_path / "miniupnpd.log").open("w"),
                 stderr=(tmp_path / "miniupnpd.err").open("w"))
    wait_until(lambda: "HTTP listening" in (tmp_path / "miniupnpd.log").read_text()
               + (tmp_path / "miniupnpd.err").read_text(), 5, "miniupnpd listening")
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
    assert json.loads((tmp_path / "upnp.json").read_text())["port_mapping:tcp/8443"]["internal_client"] == "192.168.60.20"
