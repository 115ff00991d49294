"""The `linux` gateway driver against the real programs, in namespaces (tests/gatewaylab.py):
nftables port forwards and DSCP marks, the htb classes on the WAN, dnsmasq reservations
(renewed by busybox udhcpc), igmpproxy, failures and retries. Assertions read the real state:
`nft -j`, `tc -s`, packets seen by tcpdump, TCP connections, DHCP leases, multicast received."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from homenet.configurator.drivers import dnsmasq, nftables
from homenet.schemas.messages import GatewayState, PortMapping, QosClass, QosRule, Reservation

from .conftest import require_program
from .gatewaylab import (TCP_SERVER, WAN_GW, WAN_HOST, foreign_ruleset, nft_rules, record_of,
                         multicast_unroutable, start_linux_home)
from .harness import wait_until
from .netns import Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def test_rendering_is_a_pure_function_of_the_desired_state() -> None:
    nas = PortMapping(device_id="nas-1", protocol="tcp", external_port=8443,
                      internal_address=IPv4Address("192.168.1.20"), internal_port=443)
    stb = QosRule(device_id="stb-1", address=IPv4Address("192.168.1.10"), qos_class=QosClass.VIDEO, dscp=32)
    empty = GatewayState(driver="linux", lan="192.168.1.0/24")
    assert nftables.render(empty, "wan0") == "table inet homenet\ndelete table inet homenet\n"
    script = nftables.render(empty.model_copy(update={"port_mappings": [nas], "qos": [stb]}), "wan0")
    assert 'dnat ip to 192.168.1.20:443 comment "homenet nas-1 port_mapping:tcp/8443"' in script
    assert 'ip dscp set 32 meta priority set 4e48:20 comment "homenet stb-1 qos"' in script
    hosts = dnsmasq.render_hosts([Reservation(device_id="a", mac="02:00:00:00:00:01", address=IPv4Address("192.168.1.9")),
                                  Reservation(device_id="b", mac=None, address=IPv4Address("192.168.1.8"))])
    assert hosts.splitlines()[1:] == ["02:00:00:00:00:01,192.168.1.9"]


def _comments(rules: list[dict] | None) -> list[str]:
    return sorted(r.get("comment", "") for r in rules or [])


def serving_nas(home):  # noqa: ANN001, ANN201
    """A NAS agent onboarded, and a TCP server on the port its mapping forwards to."""
    nas, proc, log = home.device("nas", "nas")
    home.wait_result(1)
    record = record_of(home, nas)
    mapping = next(i for i in record.config.items if i.kind == "port_mapping")
    nas.popen(sys.executable, "-c", TCP_SERVER, str(mapping.internal_port))
    return nas, proc, log, record, mapping


def test_nas_port_mapping_forwarded_until_forgotten_and_restored_after_reboot(lab: Lab, tmp_path: Path) -> None:
    home = start_linux_home(lab, tmp_path)
    foreign = foreign_ruleset(home.gw)
    home.start_dnsmasq()
    home.start_gateway()
    nas, proc, log, record, mapping = serving_nas(home)
    key = f"homenet {record.device_id} port_mapping:tcp/{mapping.external_port}"

    reply = wait_until(lambda: (r := home.wan_connect(mapping.external_port)).returncode == 0 and r,
                       10, "a connection from the WAN to the NAS")
    assert reply.stdout.strip() == f"hello {WAN_HOST} from the nas"
    assert key in _comments(nft_rules(home.gw)), "the DNAT and the forward accept carry the item"
    assert _comments(nft_rules(home.gw)).count(key) == 2
    assert f"{record.info.interfaces[0].mac},{record.address}" in (tmp_path / "dhcp-hosts").read_text()

    # a reboot: rules gone, database intact; the configurator puts everything back at start
    home.stop_gateway()
    home.gw.run("nft", "delete", "table", "inet", "homenet")
    assert home.wan_connect(mapping.external_port).returncode != 0
    home.start_gateway()
    wait_until(lambda: home.wan_connect(mapping.external_port).returncode == 0, 15, "the forward back after restart")
    wait_until(lambda: home.log().count(" online at ") == 2, 15, "the configurator online again")

    assert proc.poll() is None, log.read_text()
    proc.terminate()  # the NAS leaves the home (running, it would register afresh at once)
    proc.wait(10)
    out = home.forget(record.device_id)
    assert out.returncode == 0, out.stderr
    assert nft_rules(home.gw) is None, "homenet's table is gone with its last rule"
    refused = home.wan_connect(mapping.external_port)
    assert refused.returncode != 0 and "Connection refused" in refused.stderr
    assert str(record.address) not in (tmp_path / "dhcp-hosts").read_text()
    assert foreign_ruleset(home.gw) == foreign, "the gateway's own rules are untouched"


RECEIVER = textwrap.dedent("""\
    import socket, struct, sys
    group, port, local = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((group, port))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(local)))
    sock.settimeout(15)
    print(sock.recv(100).decode(), flush=True)
    """)
SENDER = textwrap.dedent("""\
    import socket, sys, time
    group, port, local = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 8)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
    while True:
        sock.sendto(b"channel 1", (group, port))
        time.sleep(0.2)
    """)
UDHCPC_SCRIPT = '#!/bin/sh\n[ "$1" = bound ] && echo "$ip" >> "$(dirname "$0")/leases"\nexit 0\n'


def test_iptv_stb_gets_its_reservation_video_priority_and_multicast(lab: Lab, tmp_path: Path) -> None:
    busybox = require_program("busybox")
    tcpdump = require_program("tcpdump")
    home = start_linux_home(lab, tmp_path)
    home.start_dnsmasq()
    home.start_gateway()
    script = tmp_path / "udhcpc" / "script"
    script.parent.mkdir()
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    stb, proc, log = home.device("stb", "iptv-stb")

    def dhcp() -> str:
        stb.run(busybox, "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s", str(script), timeout=20)
        return (script.parent / "leases").read_text().split()[-1]

    home.wait_result(1)
    record = record_of(home, stb)
    assert stb.ipv4("eth0") == [f"{record.address}/24"]
    # the reservation: dnsmasq hands the device its planned address, outside the pool
    assert dhcp() == str(record.address)

    # video priority: DSCP CS4 (tos 0x80) on the WAN, counted in the htb video class
    capture = home.wan.popen(tcpdump, "-i", "eth0", "-n", "-v", "-l", "-c", "1",
                             "icmp and ip[1] & 0xfc == 0x80", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert "listening" in capture.stderr.readline()
    stb.run("ping", "-c", "3", "-i", "0.2", WAN_HOST)
    out, _ = capture.communicate(timeout=10)
    assert "tos 0x80" in out and f"{WAN_GW} > {WAN_HOST}" in out, out
    video = home.gw.run("tc", "-s", "class", "show", "dev", "wan0", "classid", "4e48:20").stdout
    assert int(re.search(r"Sent \d+ bytes (\d+) pkt", video).group(1)) >= 3, video
    assert f"homenet {record.device_id} qos" in _comments(nft_rules(home.gw))

    # the IGMP proxy: a stream from the WAN reaches the STB once it joins the group
    if problem := multicast_unroutable(home, record.device_id):
        pytest.skip(problem)
    assert "phyint wan0 upstream" in (tmp_path / "igmpproxy.conf").read_text()
    home.wan.popen(sys.executable, "-c", SENDER, "239.10.0.1", "5004", WAN_HOST)
    received = stb.run(sys.executable, "-c", RECEIVER, "239.10.0.1", "5004", str(record.address), timeout=20)
    assert received.stdout.strip() == "channel 1"
    assert proc.poll() is None, log.read_text()


def test_failed_gateway_operations_are_reported_retried_and_never_half_applied(lab: Lab, tmp_path: Path) -> None:
    home = start_linux_home(lab, tmp_path, retry_max=1)
    foreign = foreign_ruleset(home.gw)
    # Another program owns a table named `inet homenet` (nft's owner flag, held while its
    # socket is open): the kernel refuses every change to it. dnsmasq is not running either.
    holder = home.gw.popen("nft", "-i", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    holder.stdin.write("add table inet homenet { flags owner; }\n")
    holder.stdin.flush()
    def owned_table() -> str:  # text: nft 1.0.6 cannot print an owned table as JSON
        return home.gw.run("nft", "list", "table", "inet", "homenet", check=False).stdout
    wait_until(lambda: "flags owner" in owned_table(), 5, "the foreign owner's table")
    home.start_gateway()
    nas, proc, log, record, mapping = serving_nas(home)

    text = home.wait_log(f"gateway.failed device={record.device_id}: port_mapping:tcp/{mapping.external_port}: nftables:")
    assert "Operation not permitted" in text
    assert f"gateway.failed device={record.device_id}: reservation: dnsmasq: dnsmasq is not running" in text
    assert "chain" not in owned_table(), "not one rule of the refused transaction is in force"
    assert home.wan_connect(mapping.external_port).returncode != 0

    home.start_dnsmasq()
    holder.stdin.close()  # the owner goes away, and its table with it
    home.wait_log("gateway.recovered", timeout=15)
    reply = home.wan_connect(mapping.external_port)
    assert reply.returncode == 0, reply.stderr
    assert len(nft_rules(home.gw)) == 3, "forward, accept and the NAS's bulk QoS mark"
    assert f",{record.address}" in (tmp_path / "dhcp-hosts").read_text()
    assert foreign_ruleset(home.gw) == foreign
    assert proc.poll() is None, log.read_text()
