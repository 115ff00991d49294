"""The `networkmanager` executor against a real NetworkManager, in a network namespace.

Each test builds a small home LAN: a gateway namespace with `br0` and a DHCP server (dnsmasq),
a device namespace whose `eth0` is a veth port of that bridge. NetworkManager runs in the device
namespace on a private D-Bus system bus, with its profiles, state and run files in a temp dir,
and holds a DHCP profile named as Raspberry Pi OS names it ("Wired connection 1"). The
executor talks to it through nmcli from the test's own namespace, over the private bus, as the
agent would over the real one; assertions read the kernel's state with `ip -n NS -j`.

How NetworkManager is made to run here (no systemd, no udev, not the host's network):
- `ip netns exec` gives it the namespace and a private mount namespace, where tmpfs hides the
  host's /run and /var/lib/NetworkManager;
- /sys is remounted read-only there: NetworkManager then does not wait for udev to "initialize"
  each link (it would otherwise keep every device `unmanaged`, reason platform-init);
- `[main] auth-polkit=false` (no polkit; nmcli runs as root), `dns=none` and
  `rc-manager=unmanaged` (the host's /etc/resolv.conf is left alone), `hostname-mode=none`,
  `no-auto-default=*` (the test makes the profile), keyfile profiles in the temp dir.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from homenet.agent.executor import Executor
from homenet.agent.networkmanager import NetworkManagerExecutor, Nmcli, detect
from homenet.schemas.messages import Ipv4Item, ItemStatus, QosClass, QosItem

from .conftest import require_program
from .netns import Lab, Namespace

DEVICE_MAC = "02:00:00:00:62:08"
EUI64_LINK_LOCAL = "fe80::ff:fe00:6208"
"""What `ipv6.addr-gen-mode eui64` would give DEVICE_MAC; the profile starts on stable-privacy."""
PROFILE = "Wired connection 1"

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
</busconfig>
"""

NM_CONF = """[main]
plugins=keyfile
no-auto-default=*
auth-polkit=false
dns=none
rc-manager=unmanaged
hostname-mode=none
dhcp=internal

[keyfile]
path={profiles}

[logging]
level=INFO

[device-test]
match-device=interface-name:eth0
managed=1
"""

# Runs inside `ip netns exec` (its own mount namespace); `mount -n` writes no utab under the
# host's /run.
NM_START = """set -e
mount -n -t tmpfs tmpfs /run
mount -n -o remount,ro /sys
mount -n -t tmpfs tmpfs /var/lib/NetworkManager
exec "$0" --debug --config="$1/nm.conf" --config-dir="$1/conf.d" --system-config-dir="$1/system.d" \
    --state-file="$1/NetworkManager.state" --intern-config="$1/intern.conf" 2>"$1/nm.log"
"""


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0, log: Path | None = None) -> Any:
    """`check()`'s first truthy value; fails naming `what` (and the NetworkManager log's tail)."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= end:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{log_tail(log)}")
        time.sleep(0.1)


def log_tail(log: Path | None) -> str:
    """The end of NetworkManager's log, to explain a failure."""
    if log is None or not log.exists():
        return ""
    return "\nNetworkManager log:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])


@dataclass
class NmLab:
    dev: Namespace
    gw: Namespace
    nmcli: Nmcli
    executor: NetworkManagerExecutor
    log: Path

    def inet(self) -> list[str]:
        return self.dev.ipv4("eth0")

    def link_local(self) -> list[str]:
        return [a["local"] for a in self.dev.addresses("eth0") if a["family"] == "inet6" and a["scope"] == "link"]

    def default_routes(self) -> list[tuple[str, str, str]]:
        return [(r.get("gateway", ""), r["dev"], r.get("protocol", "")) for r in self.dev.routes("default")]

    def connected(self) -> bool:
        state = self.nmcli.records(["GENERAL.STATE"], "device", "show", "eth0")[0]["GENERAL.STATE"]
        return state.startswith("100 ")

    def profile(self, *fields: str) -> dict[str, str]:
        return self.nmcli.records(fields, "connection", "show", PROFILE)[0]


@pytest.fixture
def nm_lab() -> Iterator[NmLab]:
    """NetworkManager (and its bus) in a device namespace on a DHCP-served LAN; all stopped by PID
    and the namespaces deleted at the end, also when the test fails."""
    networkmanager = require_program("NetworkManager", "/usr/sbin/NetworkManager")
    require_program("nmcli")
    dbus_daemon = require_program("dbus-daemon")
    dnsmasq = require_program("dnsmasq", "/usr/sbin/dnsmasq")
    if not Path("/var/lib/NetworkManager").is_dir():
        pytest.fail("/var/lib/NetworkManager is missing: network-manager is not installed properly")
    with tempfile.TemporaryDirectory(prefix="hn-nm-") as tmp, Lab() as lab:  # short: a unix socket path
        work = Path(tmp)
        for sub in ("conf.d", "system.d", "profiles"):
            (work / sub).mkdir()
        socket = work / "bus"
        (work / "bus.conf").write_text(BUS_CONF.format(socket=socket))
        (work / "nm.conf").write_text(NM_CONF.format(profiles=work / "profiles"))

        gw = lab.namespace("gw")
        lab.bridge(gw, "br0", "192.168.50.1/24")
        dev = lab.namespace("dev")
        lab.veth(dev, gw, mac=DEVICE_MAC)
        gw.popen(dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--user=root",
                 "--interface=br0", "--bind-interfaces", "--no-ping", f"--pid-file={work / 'dnsmasq.pid'}",
                 f"--dhcp-leasefile={work / 'leases'}", "--dhcp-range=192.168.50.100,192.168.50.150,1h",
                 "--dhcp-option=option:router,192.168.50.1", "--dhcp-option=option:dns-server,192.168.50.53",
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        bus = subprocess.Popen([dbus_daemon, f"--config-file={work / 'bus.conf'}", "--nofork"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for("the private D-Bus socket", socket.exists, timeout=10)
            nmcli = Nmcli(bus_address=f"unix:path={socket}")
            log = work / "nm.log"
            nm = dev.popen("sh", "-c", NM_START, networkmanager, str(work),
                           env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={socket}"})

            def managed() -> bool:
                if nm.poll() is not None:
                    pytest.fail(f"NetworkManager exited {nm.returncode}{log_tail(log)}")
                return detect("eth0", nmcli)

            wait_for("NetworkManager to manage eth0", managed, log=log)
            nmcli.run("connection", "add", "type", "ethernet", "ifname", "eth0", "con-name", PROFILE,
                      "ipv4.method", "auto", "ipv6.method", "auto", "ipv6.addr-gen-mode", "stable-privacy")
            nm_lab = NmLab(dev, gw, nmcli, NetworkManagerExecutor(nmcli), log)
            wait_for("eth0 connected, with a DHCP lease and a link-local address past DAD",
                     lambda: nm_lab.connected() and nm_lab.inet() and nm_lab.default_routes() and all(
                         not a.get("tentative") for a in nm_lab.dev.addresses("eth0") if a["family"] == "inet6")
                     and nm_lab.link_local(), log=log)
            yield nm_lab
        finally:
            lab.close()  # NetworkManager and dnsmasq first, while the bus is still there
            bus.terminate()
            try:
                bus.wait(5)
            except subprocess.TimeoutExpired:
                bus.kill()
                bus.wait()


def test_apply_is_real_keeps_link_local_and_rolls_back(nm_lab: NmLab) -> None:
    lease, link_local = nm_lab.inet(), nm_lab.link_local()
    assert len(lease) == 1 and lease[0].startswith("192.168.50.1")  # from the dnsmasq range
    assert nm_lab.default_routes() == [("192.168.50.1", "eth0", "dhcp")]
    assert link_local != [EUI64_LINK_LOCAL]
    executor: Executor = nm_lab.executor
    checkpoint = executor.checkpoint()

    item = Ipv4Item(interface="eth0", mac=DEVICE_MAC, address="192.168.50.20", prefix_len=24,
                    gateway="192.168.50.1", dns=["192.168.50.1", "9.9.9.9"])
    result = executor.apply(item)
    assert (result.status, result.detail) == (ItemStatus.APPLIED, "")
    # the kernel's state: only the new address, the static default route, the same link-local
    assert nm_lab.inet() == ["192.168.50.20/24"]
    assert nm_lab.default_routes() == [("192.168.50.1", "eth0", "static")]
    assert nm_lab.link_local() == link_local
    # the profile: survives a reboot, and takes the MAC-derived link-local at its next activation
    assert nm_lab.profile("ipv4.method", "ipv4.addresses", "ipv4.gateway", "ipv4.dns", "ipv4.ignore-auto-dns",
                          "ipv6.addr-gen-mode") == {
        "ipv4.method": "manual", "ipv4.addresses": "192.168.50.20/24", "ipv4.gateway": "192.168.50.1",
        "ipv4.dns": "192.168.50.1,9.9.9.9", "ipv4.ignore-auto-dns": "yes", "ipv6.addr-gen-mode": "eui64"}
    assert executor.in_force()["ipv4"] == {
        "interface": "eth0", "mac": DEVICE_MAC, "connection": PROFILE, "method": "manual",
        "addresses": ["192.168.50.20/24"], "gateway": "192.168.50.1", "dns": ["192.168.50.1", "9.9.9.9"]}

    assert executor.apply(item).status == ItemStatus.UNCHANGED

    # Raspberry Pi 5 names its Ethernet end0: the configurator's name is wrong, the MAC is right
    moved = executor.apply(item.model_copy(update={"interface": "end0", "address": "192.168.50.21"}))
    assert (moved.status, moved.detail) == (ItemStatus.APPLIED, "")
    assert nm_lab.inet() == ["192.168.50.21/24"]
    assert nm_lab.link_local() == link_local

    executor.rollback(checkpoint)
    wait_for("the DHCP lease back on eth0", lambda: nm_lab.inet() == lease and nm_lab.default_routes(), log=nm_lab.log)
    assert nm_lab.default_routes() == [("192.168.50.1", "eth0", "dhcp")]
    assert nm_lab.link_local() == link_local
    assert nm_lab.profile("ipv4.method", "ipv4.addresses", "ipv4.dns", "ipv6.addr-gen-mode") == {
        "ipv4.method": "auto", "ipv4.addresses": "", "ipv4.dns": "", "ipv6.addr-gen-mode": "stable-privacy"}
    assert executor.apply(item).status == ItemStatus.APPLIED  # not `unchanged`: the state really went back


def test_failures_are_reported_with_nmcli_text(nm_lab: NmLab) -> None:
    lease = nm_lab.inet()
    executor = nm_lab.executor
    missing = executor.apply(Ipv4Item(interface="nosuch0", address="192.168.50.20", prefix_len=24,
                                      gateway="192.168.50.1"))
    assert missing.status == ItemStatus.FAILED
    assert missing.detail == "interface nosuch0: Device 'nosuch0' not found."
    wrong_mac = executor.apply(Ipv4Item(interface="nosuch0", mac="02:00:00:00:00:99", address="192.168.50.20",
                                        prefix_len=24, gateway="192.168.50.1"))
    assert wrong_mac.status == ItemStatus.FAILED
    assert "no NetworkManager device has MAC 02:00:00:00:00:99" in wrong_mac.detail

    # NetworkManager itself refuses: IPv6 DNS servers on a profile whose IPv6 is link-local only
    nm_lab.nmcli.run("connection", "modify", PROFILE, "ipv6.method", "link-local")
    refused = executor.apply(Ipv4Item(interface="eth0", address="192.168.50.20", prefix_len=24,
                                      gateway="192.168.50.1", dns=["fd00::53"]))
    assert refused.status == ItemStatus.FAILED
    assert refused.detail.startswith(f"NetworkManager refused the settings for profile '{PROFILE}' of eth0: ")
    assert "ipv6.dns: this property is not allowed for 'method=link-local'" in refused.detail
    assert nm_lab.profile("ipv4.method")["ipv4.method"] == "auto"  # one atomic update: nothing changed
    assert nm_lab.inet() == lease

    qos = executor.apply(QosItem(qos_class=QosClass.VIDEO, dscp=32))
    assert qos.status == ItemStatus.UNSUPPORTED
    assert executor.in_force() == {}

    assert detect(nmcli=nm_lab.nmcli) and detect("eth0", nm_lab.nmcli)
    assert not detect("nosuch0", nm_lab.nmcli)
    assert not detect(nmcli=Nmcli(bus_address="unix:path=/nonexistent/bus"))

    # terse output escapes `:` and `\\` in names; the parser gives them back
    odd = "Büro: LAN\\2"
    nm_lab.nmcli.run("connection", "add", "type", "ethernet", "ifname", "eth9", "con-name", odd, "autoconnect", "no")
    assert odd in [name for name, _ in nm_lab.nmcli.rows(["NAME", "UUID"], "connection", "show")]


def test_inactive_profile_is_brought_up_and_rollback_takes_it_down(nm_lab: NmLab) -> None:
    nm_lab.nmcli.run("device", "disconnect", "eth0")
    wait_for("eth0 to lose its lease", lambda: not nm_lab.inet(), log=nm_lab.log)
    checkpoint = nm_lab.executor.checkpoint()
    result = nm_lab.executor.apply(Ipv4Item(interface="eth0", address="192.168.50.20", prefix_len=24,
                                            gateway="192.168.50.1"))
    assert (result.status, result.detail) == (ItemStatus.APPLIED, "")
    assert nm_lab.inet() == ["192.168.50.20/24"]
    assert nm_lab.default_routes() == [("192.168.50.1", "eth0", "static")]
    nm_lab.executor.rollback(checkpoint)
    assert nm_lab.nmcli.records(["GENERAL.CON-UUID"], "device", "show", "eth0") == [{"GENERAL.CON-UUID": ""}]
    wait_for("eth0 to be deconfigured again", lambda: not nm_lab.inet(), log=nm_lab.log)
    assert nm_lab.profile("ipv4.method")["ipv4.method"] == "auto"


def test_without_nmcli_items_fail_clearly() -> None:
    """No NetworkManager at all (a laptop, a container): a clear failure, not an exception."""
    executor = NetworkManagerExecutor(Nmcli(program="/nonexistent/nmcli"))
    result = executor.apply(Ipv4Item(interface="eth0", address="192.168.50.20", prefix_len=24,
                                     gateway="192.168.50.1"))
    assert (result.status, result.detail) == (
        ItemStatus.FAILED, "interface eth0: nmcli is not installed (Debian package network-manager)")
    assert not detect(nmcli=executor.nmcli)

