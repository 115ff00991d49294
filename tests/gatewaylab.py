"""A home behind a Linux gateway, in namespaces, for the gateway driver tests.

    gw:  br0 192.168.50.1/24 (LAN: dnsmasq, the beacon, the broker) -- wan0 11.0.0.2/24 (WAN)
    wan: eth0 11.0.0.1/24, the Internet side (a TCP client, a multicast source, tcpdump)

The gateway already has rules of its own before homenet starts (masquerade, an input filter,
table `ip gwnat` and `inet gwfilter`): they must survive every homenet operation. Devices are
namespaces on br0 running the agent, as in the day-0 tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homenet.configurator.app import ADMIN, ADMIN_SECRET
from homenet.schemas import Topics

from .conftest import require_program
from .harness import gateway_view, wait_until
from .netns import Lab, Namespace, multicast_routing_problem
from .test_day0 import GATEWAY_IP, HOMENET, Home

WAN_GW, WAN_HOST = "11.0.0.2", "11.0.0.1"
FOREIGN_RULES = """\
table ip gwnat {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" masquerade comment "the gateway's own NAT"
    }
}
table inet gwfilter {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 22 accept comment "the gateway's own ssh rule"
    }
}
"""
FOREIGN_TABLES = (("ip", "gwnat"), ("inet", "gwfilter"))
TCP_SERVER = textwrap.dedent("""\
    import socket, sys
    server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
    while True:
        conn, peer = server.accept()
        conn.sendall(f"hello {peer[0]} from the nas\\n".encode())
        conn.close()
    """)
TCP_CLIENT = textwrap.dedent("""\
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as conn:
        print(conn.recv(100).decode().strip())
    """)


def nft_rules(ns: Namespace, family: str = "inet", table: str = "homenet") -> list[dict[str, Any]] | None:
    """The rules of a table as `nft -j` lists them; None when the table does not exist."""
    done = ns.run("nft", "-j", "list", "table", family, table, check=False)
    if done.returncode != 0:
        return None
    return [e["rule"] for e in json.loads(done.stdout)["nftables"] if "rule" in e]


def foreign_ruleset(ns: Namespace) -> str:
    return "".join(ns.run("nft", "-s", "list", "table", f, t).stdout for f, t in FOREIGN_TABLES)


@dataclass
class GatewayHome(Home):
    wan: Namespace | None = None
    process: subprocess.Popen[str] | None = None

    @property
    def conf(self) -> Path:
        return self.tmp / "gateway.toml"

    def log(self) -> str:
        return (self.tmp / "gateway.log").read_text()

    def start_dnsmasq(self, lan: str = "192.168.50") -> subprocess.Popen[str]:
        """dnsmasq serving the pool .100-.199 of the /24 `lan`, with homenet's hosts file."""
        dnsmasq = require_program("dnsmasq", "/usr/sbin/dnsmasq")
        (self.tmp / "dnsmasq.pid").unlink(missing_ok=True)
        proc = self.gw.popen(dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                             "--interface=br0", "--bind-interfaces", "--user=root", "--group=root",
                             f"--dhcp-range={lan}.100,{lan}.199,255.255.255.0,1h",
                             f"--dhcp-hostsfile={self.tmp / 'dhcp-hosts'}", f"--pid-file={self.tmp / 'dnsmasq.pid'}",
                             f"--dhcp-leasefile={self.tmp / 'dnsmasq.leases'}", "--log-dhcp",
                             f"--log-facility={self.tmp / 'dnsmasq.log'}")
        wait_until(lambda: (self.tmp / "dnsmasq.pid").exists(), 5, "dnsmasq's pidfile")
        return proc

    def start_gateway(self, beacon: str = "br0") -> None:
        self.process = self.gw.popen(HOMENET, "gateway", "run", "--config", str(self.conf), "--listen", "0.0.0.0:1883",
                                     "--listen", ":::1883", "--beacon-interface", beacon,
                                     stdout=(self.tmp / "gateway.log").open("a"), stderr=subprocess.STDOUT)

    def stop_gateway(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(10)

    def wait_log(self, text: str, timeout: float = 15) -> str:
        return wait_until(lambda: text in (log := self.log()) and log, timeout, f"{text!r} in the gateway log")

    def forget(self, device_id: str) -> subprocess.CompletedProcess[str]:
        return self.gw.run(HOMENET, "devices", "forget", device_id, "--config", str(self.conf),
                           "--broker", "mqtt://127.0.0.1:1883", check=False, timeout=30)

    def gateway_state(self) -> dict[str, Any]:
        """The whole gateway state from the retained `gateway/state` and `gateway/device/+`, read
        with mosquitto_sub as the gateway's operator."""
        secret = (self.tmp / "gw" / ADMIN_SECRET).read_text().strip()
        topics = Topics()
        out = self.gw.run(require_program("mosquitto_sub"), "-h", "127.0.0.1", "-p", "1883", "-u", ADMIN,
                          "-P", secret, "-v", "-t", topics.gateway_state, "-t", topics.gateway_devices,
                          "--retained-only", "-W", "2", check=False, timeout=10)
        messages = [(t, p.encode(), True) for t, _, p in (line.partition(" ") for line in out.stdout.splitlines())]
        view = gateway_view(messages, topics)
        assert view is not None, f"no retained gateway/state: {out.stdout!r} {out.stderr!r}"
        return view

    def wan_connect(self, port: int) -> subprocess.CompletedProcess[str]:
        assert self.wan is not None
        return self.wan.run("python3", "-c", TCP_CLIENT, WAN_GW, str(port), check=False, timeout=10)


def add_wan(lab: Lab, gw: Namespace) -> Namespace:
    """The `wan` namespace (eth0 WAN_HOST) behind `gw`'s wan0 (WAN_GW, a public address); `gw` forwards."""
    wan = lab.namespace("wan")
    gw.run("ip", "link", "add", "wan0", "type", "veth", "peer", "name", "eth0", "netns", wan.name)
    gw.run("ip", "addr", "add", f"{WAN_GW}/24", "dev", "wan0")
    gw.run("ip", "link", "set", "wan0", "up")
    wan.run("ip", "addr", "add", f"{WAN_HOST}/24", "dev", "eth0")
    wan.run("ip", "link", "set", "eth0", "up")
    gw.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    return wan


def start_linux_home(lab: Lab, tmp: Path, retry_max: float = 60, **configurator: Any) -> GatewayHome:
    """The namespaces, the gateway's own rules and the settings; dnsmasq and homenet are started by the test.
    `configurator`: more settings of the `[configurator]` section (e.g. `reconcile_interval=1`)."""
    for program in ("nft", "tc"):
        require_program(program, f"/usr/sbin/{program}")
    gw = lab.namespace("gw")
    lab.bridge(gw, "br0", f"{GATEWAY_IP}/24")
    gw.run("ip", "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
    wan = add_wan(lab, gw)
    gw.run("nft", "-f", "-", input=FOREIGN_RULES)
    home = GatewayHome(lab, gw, tmp, wan=wan)
    more = ("\n" + " " * 8).join(f"{key} = {json.dumps(value)}" for key, value in configurator.items())
    home.conf.write_text(textwrap.dedent(f"""\
        [configurator]
        gateway_driver = "linux"
        data_dir = "{tmp / 'gw'}"
        {more}

        [configurator.lan]
        subnet = "192.168.50.0/24"
        gateway = "{GATEWAY_IP}"
        pool_start = "192.168.50.100"
        pool_end = "192.168.50.199"

        [configurator.gateway]
        lan_interface = "br0"
        wan_interface = "wan0"
        wan_rate_kbit = 100000
        dnsmasq_hosts = "{tmp / 'dhcp-hosts'}"
        dnsmasq_pidfile = "{tmp / 'dnsmasq.pid'}"
        igmpproxy = "{require_program('igmpproxy', '/usr/sbin/igmpproxy')}"
        igmpproxy_conf = "{tmp / 'igmpproxy.conf'}"
        retry_max = {retry_max}
        """))
    return home


def record_of(home: Home, ns: Namespace) -> Any:
    """The database record of the device in namespace `ns` (matched by its MAC)."""
    mac = ns.mac("eth0")
    return next(r for r in home.records().values() if any(i.mac == mac for i in r.info.interfaces))


def multicast_unroutable(home: GatewayHome, device_id: str) -> str | None:
    """None where the kernel routes multicast. Else checks that the gateway tells the truth (the
    device's IGMP item failed, with the kernel option named, in `devices list` and `devices show`)
    and returns the reason the caller gives when it skips its multicast assertions at its end."""
    if (problem := multicast_routing_problem()) is None:
        return None
    def shown(*command: str) -> str:
        return home.gw.run(HOMENET, "devices", *command, "--config", str(home.conf), timeout=30).stdout
    wait_until(lambda: "failed: igmp" in shown("list"), 10, "the IGMP item shown failed in `devices list`")
    detail = shown("show", device_id)
    assert re.search(r"igmp +failed - igmpproxy: kernel lacks multicast routing \(CONFIG_IP_MROUTE\)", detail), detail
    return f"multicast forwarding not checked: {problem} (every other assertion of this test ran and passed)"
