"""Day-0 in network namespaces: devices with only IPv6 link-local find the broker from the
gateway's Layer-2 beacon, register, get IPv4 from the policy, apply it with the iproute2
executor and can then reach the gateway over IPv4. Assertions read the real interfaces."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homenet.configurator.lifecycle import State
from homenet.configurator.app import db_path
from homenet.configurator.store import SqliteStore
from homenet.schemas.messages import ResultStatus

from .conftest import require_program
from .harness import wait_until
from .netns import Lab, Namespace

BIN = Path(sys.executable).parent
HOMENET, AGENT = str(BIN / "homenet"), str(BIN / "homenet-agent")
GATEWAY_IP = "192.168.50.1"


@dataclass
class Home:
    lab: Lab
    gw: Namespace
    """Where `homenet gateway run` runs (the broker and the configurator)."""
    tmp: Path
    lan: Namespace | None = None
    """The namespace whose br0 the devices plug into: `gw` unless the LAN is another box's
    (a third-party router)."""
    run_gateway: Callable[[], subprocess.Popen[str]] | None = None
    """Starts `homenet gateway run` (again) as `start_home` did; its output goes on in gateway.log."""

    @property
    def db(self) -> Path:
        return db_path(self.tmp / "gw")

    def records(self) -> dict:
        if not self.db.exists():
            return {}
        return {r.device_id: r for r in SqliteStore(self.db, read_only=True).all()}

    def device(self, role: str, device_type: str, deadline: float = 10, settings: str = "",
               link_down: bool = False) -> tuple[Namespace, subprocess.Popen[str], Path]:
        """A device namespace on the bridge, IPv6 link-local only, running the agent (no --broker);
        `settings`: more lines of its TOML; `link_down`: the agent starts before link-up."""
        ns = self.lab.namespace(role)
        self.lab.veth(ns, self.lan or self.gw)
        if link_down:
            ns.run("ip", "link", "set", "eth0", "down")
        data = self.tmp / role
        data.mkdir()
        conf = data / "agent.toml"
        conf.write_text(f'device_type = "{device_type}"\nexecutor = "iproute2"\n'
                        f'resolv_conf = "{data / "resolv.conf"}"\napply_deadline = {deadline}\n{settings}')
        log = data / "agent.log"
        proc = ns.popen(AGENT, "run", "--config", str(conf), "--data-dir", str(data),
                        stdout=log.open("w"), stderr=subprocess.STDOUT)
        return ns, proc, log

    def wait_result(self, count: int, timeout: float = 30) -> dict:
        def results() -> dict | None:
            records = self.records()
            done = {k: r for k, r in records.items() if r.result is not None}
            return records if len(done) == count else None
        return wait_until(results, timeout, f"{count} devices with a config.result")


def start_home(lab: Lab, tmp: Path, lan: str = "192.168.50", tls: bool = False) -> Home:
    gw = lab.namespace("gw")
    lab.bridge(gw, "br0", f"{GATEWAY_IP}/24")
    conf = tmp / "gateway.toml"
    conf.write_text(textwrap.dedent(f"""\
        [configurator.lan]
        subnet = "{lan}.0/24"
        gateway = "{lan}.1"
        pool_start = "{lan}.100"
        pool_end = "{lan}.199"
        """))
    listeners = (["--no-plain", "--tls-listen", "0.0.0.0:8883", "--tls-listen", ":::8883"] if tls
                 else ["--listen", "0.0.0.0:1883", "--listen", ":::1883"])

    def run_gateway() -> subprocess.Popen[str]:
        return gw.popen(HOMENET, "gateway", "run", "--config", str(conf), "--data-dir", str(tmp / "gw"),
                        *listeners, "--beacon-interface", "br0",
                        stdout=(tmp / "gateway.log").open("a"), stderr=subprocess.STDOUT)
    run_gateway()
    return Home(lab, gw, tmp, run_gateway=run_gateway)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_devices_with_only_link_local_get_ipv4_from_the_policy(lab: Lab, tmp_path: Path, tls: bool) -> None:
    """With TLS on, the agent pins the certificate whose fingerprint the signed beacon carries."""
    ping = require_program("ping")
    home = start_home(lab, tmp_path, tls=tls)
    devices = [home.device("stb", "iptv-stb"), home.device("nas", "nas")]
    records = home.wait_result(2)

    for ns, proc, log in devices:
        assert proc.poll() is None, log.read_text()
        assert f"found the gateway's broker at {'mqtts' if tls else 'mqtt'}://[fe80::" in log.read_text()
        record = next(r for r in records.values() if r.info.interfaces and
                      any(i.mac == ns.mac("eth0") for i in r.info.interfaces))
        assert record.state == State.CONFIGURED and record.result.status == ResultStatus.OK
        # the real interface, not the agent's report
        assert ns.ipv4("eth0") == [f"{record.address}/24"]
        assert ns.routes("default")[0]["gateway"] == GATEWAY_IP
        assert any(a["local"].startswith("fe80:") for a in ns.addresses("eth0")), "link-local kept"
        ns.run(ping, "-c", "1", "-W", "2", GATEWAY_IP)
    assert len({r.address for r in records.values()}) == 2


ROGUE = textwrap.dedent("""\
    import socket, sys
    from homenet.keys import KeyPair
    from homenet.l2 import mac_of
    from homenet.schemas.beacon import Beacon, encode_beacon, ethernet_frame
    from ipaddress import IPv4Interface
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind(("eth0", 0))
    mac = mac_of("eth0")
    evil = KeyPair.generate()
    forged = Beacon(epoch=99, counter=1, key=evil.public, ipv4=(IPv4Interface("192.168.50.66/24"), 1883))
    sock.send(ethernet_frame(mac, encode_beacon(forged, evil.sign)))
    good = encode_beacon(forged, evil.sign)
    sock.send(ethernet_frame(mac, good[:-67]))     # unsigned
    sock.send(ethernet_frame(mac, good[:20]))      # truncated
    sock.send(ethernet_frame(mac, b"not a beacon at all"))
    """)


def test_rogue_and_malformed_beacons_are_ignored_after_pinning(lab: Lab, tmp_path: Path) -> None:
    home = start_home(lab, tmp_path)
    ns, proc, log = home.device("stb", "iptv-stb")
    home.wait_result(1)
    assert "pinned configurator key" in log.read_text()

    rogue = lab.namespace("rogue")
    lab.veth(rogue, home.gw)
    rogue.run(sys.executable, "-c", ROGUE)

    text = wait_until(lambda: (t := log.read_text()).count("ignored") >= 4 and t, 10, "four ignored frames")
    assert "signed by key" in text and "but configurator key" in text and "is pinned" in text
    assert "unsigned beacon" in text and "truncated" in text and "bad magic" in text
    assert proc.poll() is None, "the agent survived"
    assert ns.ipv4("eth0")[0].startswith("192.168.50."), "nothing changed on the device"


def test_an_address_that_cannot_reach_the_broker_is_rolled_back(lab: Lab, tmp_path: Path) -> None:
    # The configurator plans from 10.99.0.0/24, but the LAN (and the broker) is 192.168.50.0/24.
    home = start_home(lab, tmp_path, lan="10.99.0")
    ns, proc, log = home.device("cam", "camera", deadline=3)
    records = home.wait_result(1, timeout=40)
    record = next(iter(records.values()))
    assert record.result.status == ResultStatus.ROLLED_BACK
    ipv4 = next(i for i in record.result.items if i.item == "ipv4")
    assert ipv4.status == "rolled_back" and "192.168.50.1:1883" in ipv4.detail
    assert record.state == State.FAILED
    assert ns.ipv4("eth0") == [], "interface restored to its previous settings"
    assert ns.routes("default") == []
    assert proc.poll() is None, log.read_text()


def test_a_device_that_boots_before_its_link_is_up_waits_for_it(lab: Lab, tmp_path: Path) -> None:
    home = start_home(lab, tmp_path)
    ns, proc, log = home.device("late", "camera", link_down=True)
    wait_until(lambda: "no network interface is up yet" in log.read_text(), 10, "the agent waiting")
    assert proc.poll() is None, "it waits instead of exiting"
    ns.run("ip", "link", "set", "eth0", "up")
    record = next(iter(home.wait_result(1).values()))
    assert record.state == State.CONFIGURED
    assert ns.ipv4("eth0") == [f"{record.address}/24"]
