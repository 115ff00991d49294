"""Day-0 time: from link-up of a new device's interface to usable IPv4, homenet against DHCP.

    sudo .venv/bin/python bench/day0.py --runs 20          # or: sudo make bench-day0

Topology (the network namespaces of tests/netns.py): a gateway namespace with a bridge `br0`
(10.50.0.1/16) and, for every run, a new device namespace whose `eth0` is a veth port of `br0`,
created DOWN. Paths (one server at a time in the gateway namespace, kept running across runs):

  homenet      `homenet gateway run --beacon-interface br0`; in the device namespace
               `homenet-agent run` (iproute2 executor, no --broker) with a new data dir, so every
               run is a new device's first registration: beacon over Layer 2, MQTT over IPv6
               link-local, register, config, address and default route applied over netlink
  dhcp         dnsmasq as it comes (its ping check included) serving `br0`; busybox udhcpc with
               a small script that sets the address and the default route with `ip`
  dhcp-noping  the same with `dnsmasq --no-ping`

Each path in two starts: `at` (the client is started at link-up, as a link-aware supervisor
would) and `before` (the client is started on the down interface, a random 1-4 s before the
link comes up). Runs are spaced (--spacing: 6.5 s from one link-up to the next): new devices
do not arrive every few seconds in a home, and dnsmasq stops its ping check once it has made 6
in 30 s. The clock starts when a probe process in the device namespace has set `eth0`
up (SIOCSIFFLAGS returned) and stops when the device is usable:

    `eth0` has an IPv4 address in 10.50.0.0/16 and the probe has received the gateway's
    (10.50.0.1) ICMP echo reply to a request sent after that address appeared

The same probe and the same check serve every path. The probe also records when the kernel
created eth0's IPv6 link-local address and when its duplicate address detection ended (the
agent's own test, homenet.l2.link_local). For homenet the agent's log gives the phases between.
Every namespace and process is removed at the end, also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import importlib.util
import ipaddress
import json
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
BIN = Path(sys.executable).parent
HOMENET, AGENT = BIN / "homenet", BIN / "homenet-agent"

LAN = ipaddress.IPv4Network("10.50.0.0/16")
GATEWAY = "10.50.0.1"
POOL = ("10.50.200.0", "10.50.255.254")
"""The DHCP pool: dnsmasq leases from it, homenet plans static addresses outside it."""
BROKER_PORT = 1883
UDHCPC_RETRY = 3
"""udhcpc -T: seconds between its discovers (busybox's default, given explicitly)."""

PATHS = ("homenet", "dhcp", "dhcp-noping")
STARTS = ("before", "at")
DEFAULT_PATHS = [f"{p}@{s}" for p in PATHS for s in STARTS]
LABELS = {"homenet": "homenet (beacon, MQTT, iproute2)", "dhcp": "DHCP (dnsmasq defaults)",
          "dhcp-noping": "DHCP (dnsmasq --no-ping)"}

UDHCPC_SCRIPT = """\
#!/bin/sh
# busybox udhcpc calls this with the lease in the environment; mask is a prefix length.
case "$1" in
    bound|renew)
        ip addr replace "$ip/$mask" dev "$interface" ${broadcast:+broadcast "$broadcast"}
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        ;;
    deconfig)
        ip -4 addr flush dev "$interface"
        ;;
esac
exit 0
"""

AGENT_MILESTONES = [  # (name, the agent's log message), in the order they happen
    ("discovering", re.compile(r"^looking for the gateway's beacon")),
    ("beacon", re.compile(r"^pinned configurator key")),
    ("connected", re.compile(r"^agent \S+ connected to ")),
    ("registering", re.compile(r"^found configurator .*; registering as")),
    ("registered", re.compile(r"^registered; configuration version")),
    ("confirmed", re.compile(r"^config version \d+: ")),
]
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+\s+[\w.]+: (.*)$")


# --- the probe: runs inside a device namespace -------------------------------------------------

SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCGIFADDR = 0x8913, 0x8914, 0x8915
IFF_UP = 0x1
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int) -> bytes:
    payload = b"homenet day-0 bench"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _icmp_checksum(header + payload), ident, seq) + payload


def _is_echo_reply(packet: bytes, ident: int, source: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    return (len(packet) >= ihl + 8 and packet[12:16] == source and packet[ihl] == 0
            and struct.unpack("!H", packet[ihl + 4:ihl + 6])[0] == ident)


def _ipv4_of(ctl: socket.socket, iface: bytes) -> str | None:
    try:
        ifreq = fcntl.ioctl(ctl, SIOCGIFADDR, struct.pack("16sH14s", iface, socket.AF_INET, b""))
    except OSError:  # EADDRNOTAVAIL: no IPv4 address
        return None
    return socket.inet_ntoa(ifreq[20:24])


def _sysctls(iface: str) -> dict[str, str]:
    paths = {name: f"/proc/sys/net/ipv6/conf/{iface}/{name}" for name in
             ("dad_transmits", "router_solicitation_delay", "optimistic_dad", "enhanced_dad")}
    paths["retrans_time_ms"] = f"/proc/sys/net/ipv6/neigh/{iface}/retrans_time_ms"
    return {name: Path(path).read_text().strip() for name, path in paths.items() if Path(path).exists()}


def probe(iface_name: str, gateway: str, subnet: str, timeout: float, poll: float, dad_grace: float) -> None:
    """Set the interface up when told (`go` on stdin), then report events as JSON lines, times in
    seconds since link-up: `ll` (link-local address created), `ll_ok` (DAD over), `ipv4`, `usable`."""
    from homenet.l2 import link_local  # the agent's own test for a usable (non-tentative) fe80

    iface, lan, source = iface_name.encode(), ipaddress.IPv4Network(subnet), socket.inet_aton(gateway)
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    icmp.setblocking(False)
    netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    netlink.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))  # wake up on address changes
    netlink.setblocking(False)
    ident = os.getpid() & 0xFFFF
    _emit(event="ready", sysctl=_sysctls(iface_name))
    if sys.stdin.readline().strip() != "go":
        return

    flags = struct.unpack("16sH", fcntl.ioctl(ctl, SIOCGIFFLAGS, struct.pack("16sH", iface, 0))[:18])[1]
    fcntl.ioctl(ctl, SIOCSIFFLAGS, struct.pack("16sH", iface, flags | IFF_UP))
    up, wall = time.monotonic(), time.time()
    _emit(event="up", mono=up, wall=wall)

    seen: dict[str, float] = {}
    seq, next_echo = 0, 0.0
    while True:
        now = time.monotonic()
        if "ll_ok" not in seen and (ll := link_local(iface_name)) is not None:
            if "ll" not in seen:
                seen["ll"] = now - up
                _emit(event="ll", t=seen["ll"], address=ll[0])
            if ll[1]:
                seen["ll_ok"] = now - up
                _emit(event="ll_ok", t=seen["ll_ok"])
        if "ipv4" not in seen and (address := _ipv4_of(ctl, iface)) and ipaddress.IPv4Address(address) in lan:
            seen["ipv4"] = now - up
            _emit(event="ipv4", t=seen["ipv4"], address=address)
        if "ipv4" in seen and "usable" not in seen and now >= next_echo:
            seq += 1
            next_echo = now + poll
            with contextlib.suppress(OSError):  # no route yet, or a neighbour queue full
                icmp.sendto(_echo_request(ident, seq), (gateway, 0))
        if "usable" in seen and ("ll_ok" in seen or now - up > seen["usable"] + dad_grace):
            _emit(event="done")
            return
        if now - up > timeout:
            _emit(event="timeout", t=now - up)
            return
        ready, _, _ = select.select([icmp, netlink], [], [], poll)
        if icmp in ready:
            received = time.monotonic()
            with contextlib.suppress(BlockingIOError):
                while True:
                    if _is_echo_reply(icmp.recv(2048), ident, source) and "usable" not in seen:
                        seen["usable"] = received - up
                        _emit(event="usable", t=seen["usable"], echoes=seq)
        if netlink in ready:
            with contextlib.suppress(BlockingIOError):
                while netlink.recv(65536):
                    pass


# --- the benchmark -----------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    start: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.start}"

    @property
    def code(self) -> str:
        """Two letters for namespace names: `ha` is homenet, client started at link-up."""
        return {"homenet": "h", "dhcp": "d", "dhcp-noping": "n"}[self.name] + self.start[0]


@dataclass
class Sample:
    path: str
    index: int
    warmup: bool
    ok: bool = False
    reason: str = ""
    times: dict[str, float] = field(default_factory=dict)
    """Seconds since link-up: ll, ll_ok, ipv4, usable (probe); spawn; the agent's milestones."""
    fatal: bool = False
    """The path cannot be measured at all (e.g. its client exits on a down interface)."""


class LineReader:
    """JSON lines from a child's stdout, with timeouts."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, b""

    def next(self, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = end - time.monotonic()
            if left <= 0:
                return None
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError("the probe exited")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")


def stop(process: subprocess.Popen[Any], grace: float = 5) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_text(path: Path, text: str, timeout: float, process: subprocess.Popen[Any]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"{Path(process.args[4]).name} exited {process.returncode}:\n{tail(path)}")
        time.sleep(0.05)
    raise RuntimeError(f"no {text!r} in {path} after {timeout} s:\n{tail(path)}")


def tail(path: Path, lines: int = 5) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def agent_milestones(log: Path, wall_up: float) -> dict[str, float]:
    """The first time of each milestone in the agent's log, in seconds since link-up."""
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if not (match := LOG_LINE.match(line)):
            continue
        for name, message in AGENT_MILESTONES:
            if name not in found and message.match(match[2]):
                stamp = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found[name] = stamp - wall_up
    return found


class Bench:
    def __init__(self, lab: Any, work: Path, args: argparse.Namespace) -> None:
        self.lab, self.work, self.args = lab, work, args
        self.random = random.Random(args.seed)
        self.gw = lab.namespace("gw")
        lab.bridge(self.gw, "br0", f"{GATEWAY}/{LAN.prefixlen}")
        self.server: tuple[str, subprocess.Popen[str]] | None = None
        self.counter = 0
        self.last_up = 0.0
        self.sysctl: dict[str, str] = {}
        self.script = work / "udhcpc.script"
        self.script.write_text(UDHCPC_SCRIPT)
        self.script.chmod(0o755)

    # servers in the gateway namespace, one at a time

    def serve(self, name: str) -> None:
        kind = "homenet" if name == "homenet" else name
        if self.server and self.server[0] == kind:
            return
        if self.server:
            stop(self.server[1])
            self.server = None
        if kind == "homenet":
            conf = self.work / "gateway.toml"
            conf.write_text(textwrap.dedent(f"""\
                [configurator.lan]
                subnet = "{LAN}"
                gateway = "{GATEWAY}"
                pool_start = "{POOL[0]}"
                pool_end = "{POOL[1]}"
                """))
            log = self.work / "gateway.log"
            with log.open("a") as out:
                process = self.gw.popen(str(HOMENET), "gateway", "run", "--config", str(conf),
                                        "--data-dir", str(self.work / "gateway"),
                                        "--listen", f"0.0.0.0:{BROKER_PORT}", "--listen", f":::{BROKER_PORT}",
                                        "--beacon-interface", "br0", stdout=out, stderr=subprocess.STDOUT)
            wait_for_text(log, "online at", 30, process)
        else:
            log = self.work / f"{kind}.log"
            with log.open("a") as out:  # no DNS (--port=0), no pid file, the lease file in the work dir
                process = self.gw.popen("dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                                        "--interface=br0", "--bind-interfaces", "--user=root", "--pid-file",
                                        f"--dhcp-range={POOL[0]},{POOL[1]},{LAN.netmask},12h",
                                        f"--dhcp-option=option:router,{GATEWAY}",
                                        f"--dhcp-leasefile={self.work / (kind + '.leases')}", "--log-facility=-",
                                        *(["--no-ping"] if kind == "dhcp-noping" else []),
                                        stdout=out, stderr=subprocess.STDOUT)
            wait_for_text(log, "DHCP, IP range", 10, process)
        self.server = (kind, process)

    # one run

    def client(self, path: Variant, dev: Any, run_dir: Path) -> subprocess.Popen[str]:
        if path.name == "homenet":  # a new device: its own data dir, nothing pinned, nothing applied
            conf = run_dir / "agent.toml"
            conf.write_text(f'device_type = "iptv-stb"\nexecutor = "iproute2"\n'
                            f'resolv_conf = "{run_dir / "resolv.conf"}"\n')
            command = [str(AGENT), "run", "--config", str(conf), "--data-dir", str(run_dir / "agent")]
        else:
            command = ["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "10", "-T", str(UDHCPC_RETRY),
                       "-s", str(self.script)]
        with (run_dir / "client.log").open("w") as out:
            return dev.popen(*command, stdout=out, stderr=subprocess.STDOUT)

    def run(self, path: Variant, index: int, warmup: bool) -> Sample:
        time.sleep(max(0.0, self.last_up + self.args.spacing - time.monotonic()))
        self.counter += 1
        sample = Sample(path.key, index, warmup)
        run_dir = self.work / "runs" / f"{self.counter:03d}-{path.name}-{path.start}"
        run_dir.mkdir(parents=True)
        dev = self.lab.namespace(f"{path.code}{self.counter}")
        processes: list[subprocess.Popen[Any]] = []
        try:
            port = f"vp-{dev.role}"
            sh("ip", "link", "add", "eth0", "netns", dev.name, "type", "veth",
               "peer", "name", port, "netns", self.gw.name)
            sh("ip", "-n", self.gw.name, "link", "set", port, "master", "br0", "up")  # eth0 stays down
            for setting in self.args.sysctl:
                dev.run("sysctl", "-qw", setting)
            with (run_dir / "probe.err").open("w") as err:
                probe_process = dev.popen(sys.executable, str(SCRIPT), "_probe", "--timeout", str(self.args.timeout),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            processes.append(probe_process)
            assert probe_process.stdout is not None and probe_process.stdin is not None
            events = LineReader(probe_process.stdout.fileno())
            ready = events.next(30)
            if not ready or ready.get("event") != "ready":
                raise RuntimeError(f"the probe did not start: {tail(run_dir / 'probe.err')}")
            self.sysctl = ready["sysctl"]
            client = None
            if path.start == "before":
                client = self.client(path, dev, run_dir)
                processes.append(client)
                settle = self.random.uniform(1, 1 + UDHCPC_RETRY)
                sample.times["client_start"] = -settle
                time.sleep(settle)
                if client.poll() is not None:
                    sample.reason = f"the client exited (code {client.returncode}) before link-up: " + \
                        " ".join(tail(run_dir / "client.log", 2).split())
                    sample.fatal = True
                    return sample
            probe_process.stdin.write("go\n")
            probe_process.stdin.flush()
            up = events.next(10)
            if not up or up.get("event") != "up":
                raise RuntimeError(f"the probe did not set eth0 up: {tail(run_dir / 'probe.err')}")
            self.last_up = up["mono"]
            if client is None:
                spawned = time.monotonic()
                client = self.client(path, dev, run_dir)
                processes.append(client)
                sample.times["spawn"] = spawned - up["mono"]
            while (event := events.next(0.5)) is None or event["event"] not in ("done", "timeout"):
                if event is None:
                    if client.poll() not in (None, 0):
                        sample.reason = f"the client exited (code {client.returncode}): " + \
                            " ".join(tail(run_dir / "client.log", 2).split())
                        return sample
                    continue
                sample.times[event["event"]] = event["t"]
            if event["event"] == "timeout":
                sample.reason = f"not usable within {self.args.timeout:g} s"
                return sample
            if path.name == "homenet":  # the confirmation is logged after the address is usable
                end = time.monotonic() + 10
                while "confirmed" not in (found := agent_milestones(run_dir / "client.log", up["wall"])) \
                        and time.monotonic() < end and client.poll() is None:
                    time.sleep(0.05)
                sample.times.update(found)
            sample.ok = True
            return sample
        finally:
            for process in processes:
                stop(process)
                for stream in (process.stdin, process.stdout):
                    if stream:
                        with contextlib.suppress(OSError):
                            stream.close()
            self.retire(dev)

    def retire(self, dev: Any) -> None:
        """Delete a device namespace now (its veth with it), not only when the lab closes."""
        subprocess.run(["ip", "netns", "del", dev.name], capture_output=True)
        self.lab.namespaces.remove(dev)
        self.lab.processes[:] = [p for p in self.lab.processes if p.poll() is None]

    def database(self) -> tuple[int, int] | None:
        """Devices in the configurator's database and its size in bytes."""
        from homenet.configurator.app import db_path
        from homenet.configurator.store import SqliteStore

        db = db_path(self.work / "gateway")
        if not db.exists():
            return None
        return len(SqliteStore(db, read_only=True).all()), db.stat().st_size


# --- report ------------------------------------------------------------------------------------

def nearest_rank(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def median_of(samples: list[Sample], key: str) -> float | None:
    values = [s.times[key] for s in samples if key in s.times]
    return statistics.median(values) if values else None


def report(paths: list[Variant], results: dict[str, list[Sample]], bench: Bench) -> None:
    print("\nDay-0 time: link-up of eth0 -> usable IPv4 (address on eth0 and the gateway's ICMP echo reply)")
    header = (f"{'path':34} {'start':9} {'n':>3} {'fail':>4} {'p50 ms':>7} {'p90 ms':>7} {'max ms':>7} "
              f"{'min ms':>7} {'IPv4 p50':>8} {'DAD p50':>7}")
    print(header)
    print("-" * len(header))
    medians: dict[str, float] = {}
    for path in paths:
        samples = [s for s in results[path.key] if not s.warmup]
        good = [s for s in samples if s.ok]
        failed = [s for s in results[path.key] if not s.ok]
        label, start = LABELS[path.name], "at link" if path.start == "at" else "before"
        if not good:
            reason = failed[0].reason if failed else "no runs"
            print(f"{label:34} {start:9} {0:>3} {len(failed):>4}   not measurable: {reason}")
            continue
        usable = [s.times["usable"] for s in good]
        medians[path.key] = statistics.median(usable)
        print(f"{label:34} {start:9} {len(good):>3} {len(samples) - len(good):>4} {ms(medians[path.key]):>7} "
              f"{ms(nearest_rank(usable, 90)):>7} {ms(max(usable)):>7} {ms(min(usable)):>7} "
              f"{ms(median_of(good, 'ipv4')):>8} {ms(median_of(good, 'll_ok')):>7}")
    print("(p90: nearest rank; IPv4: the address appears on eth0; DAD: eth0's fe80 address stops being tentative)")

    for start in STARTS:
        if (homenet := medians.get(f"homenet@{start}")) is None:
            continue
        for other in ("dhcp", "dhcp-noping"):
            if (dhcp := medians.get(f"{other}@{start}")) is not None:
                print(f"ratio, client started {'at' if start == 'at' else 'before'} link-up: "
                      f"homenet p50 / {LABELS[other]} p50 = {homenet / dhcp:.2f}")

    for path in paths:
        good = [s for s in results[path.key] if not s.warmup and s.ok]
        if path.name != "homenet" or not good:
            continue
        print(f"\nWhere the time goes, homenet started {path.start} link-up (median ms since link-up, n={len(good)}):")
        steps = [("spawn", "agent process started"), ("ll", "kernel created eth0's fe80 (tentative)"),
                 ("discovering", "agent up, soliciting a beacon"), ("beacon", "beacon accepted"),
                 ("ll_ok", "DAD over: fe80 usable (probe)"), ("connected", "MQTT connected over fe80"),
                 ("registering", "retained configurator state in, register sent"),
                 ("registered", "register.reply in"), ("ipv4", "address on eth0 (iproute2 executor)"),
                 ("usable", "gateway answers a ping"), ("confirmed", "config.result sent (after the TCP check)")]
        for key, text in steps:
            print(f"  {ms(median_of(good, key)):>6}  {text}")
        gaps = [s.times["connected"] - s.times["ll_ok"] for s in good if {"connected", "ll_ok"} <= s.times.keys()]
        if gaps:
            print(f"  DAD over -> MQTT connected: median {ms(statistics.median(gaps))} ms, "
                  f"max {ms(max(gaps))} ms (the agent checks every 0.1 s)")
        after = [s.times["usable"] - s.times["ll_ok"] for s in good if {"usable", "ll_ok"} <= s.times.keys()]
        if after:
            print(f"  DAD over -> usable: median {ms(statistics.median(after))} ms")

    dad = [s.times["ll_ok"] for samples in results.values() for s in samples if not s.warmup and "ll_ok" in s.times]
    if dad:
        print(f"\nIPv6 DAD on every device (n={len(dad)}): link-up -> fe80 usable median "
              f"{ms(statistics.median(dad))} ms, min {ms(min(dad))}, max {ms(max(dad))}; "
              f"device sysctls {bench.sysctl}")
    if (db := bench.database()) is not None:
        print(f"configurator database at the end: {db[0]} devices, {db[1] / 1024:.0f} KiB "
              "(one new device per homenet run, warm-ups included)")


# --- main --------------------------------------------------------------------------------------

def missing_prerequisites(paths: list[Variant]) -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces, raw sockets): sudo .venv/bin/python bench/day0.py")
    if shutil.which("ip") is None:
        problems.append("ip is not installed: apt-get install iproute2")
    if any(p.name == "homenet" for p in paths) and not (HOMENET.exists() and AGENT.exists()):
        problems.append(f"no homenet and homenet-agent next to {sys.executable}: run with the project's "
                        "virtualenv (make bench-day0 creates .venv)")
    if any(p.name != "homenet" for p in paths):
        if shutil.which("dnsmasq") is None:
            problems.append("dnsmasq is not installed: apt-get install dnsmasq-base (or dnsmasq)")
        busybox = shutil.which("busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout if busybox else ""
        if "udhcpc" not in applets.split():
            problems.append("busybox with udhcpc is not installed: apt-get install busybox")
    if importlib.util.find_spec("pytest") is None:  # tests/netns.py needs it
        problems.append("pytest is missing (tests/netns.py needs it): use the dev virtualenv, pip install -e '.[dev]'")
    return problems


def version_of(*command: str) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "?"


def parse_paths(text: str) -> list[Variant]:
    paths = []
    for item in text.split(","):
        name, _, start = item.strip().partition("@")
        for s in ([start] if start else list(STARTS)):
            if name not in PATHS or s not in STARTS:
                raise argparse.ArgumentTypeError(f"{item!r}: a path is NAME[@START], NAME one of {', '.join(PATHS)}, "
                                                 f"START one of {', '.join(STARTS)}")
            paths.append(Variant(name, s))
    return paths


@contextlib.contextmanager
def signals_end_the_run() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C; while cleaning up, signals wait."""
    def leave(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        parser = argparse.ArgumentParser(prog="day0.py _probe")
        parser.add_argument("--iface", default="eth0")
        parser.add_argument("--gateway", default=GATEWAY)
        parser.add_argument("--subnet", default=str(LAN))
        parser.add_argument("--timeout", type=float, default=30)
        parser.add_argument("--poll", type=float, default=0.01)
        parser.add_argument("--dad-grace", type=float, default=5)
        a = parser.parse_args(sys.argv[2:])
        probe(a.iface, a.gateway, a.subnet, a.timeout, a.poll, a.dad_grace)
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Needs root. " + __doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="measured runs per path (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted runs first, per path (default 2)")
    parser.add_argument("--paths", type=parse_paths, default=parse_paths(",".join(DEFAULT_PATHS)),
                        help=f"comma-separated NAME[@START] (default: {','.join(DEFAULT_PATHS)})")
    parser.add_argument("--timeout", type=float, default=30, help="seconds until a run counts as failed")
    parser.add_argument("--spacing", type=float, default=6.5,
                        help="at least this many seconds from one link-up to the next run (default 6.5): "
                        "dnsmasq skips its ping check once it has made 6 in 30 s")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every sample to FILE")
    parser.add_argument("--seed", type=int, default=62608, help="for the random link-up delays of `before`")
    parser.add_argument("--sysctl", action="append", default=[], metavar="KEY=VALUE",
                        help="set in every device namespace before link-up, e.g. "
                        "net.ipv6.conf.eth0.router_solicitation_delay=0 (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs of every run)")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")

    if problems := missing_prerequisites(args.paths):
        print("day0.py cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    import pytest

    from tests.netns import Lab

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.node()}, "
          f"Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    commit = version_of("git", "-c", f"safe.directory={REPO}", "-C", str(REPO), "describe", "--always", "--dirty")
    print(f"{version_of('dnsmasq', '--version')}; {version_of('busybox')}; homenet {commit}")
    print(f"{args.runs} runs per path after {args.warmup} warm-up runs; paths: {', '.join(p.key for p in args.paths)}"
          + (f"; device sysctls {', '.join(args.sysctl)}" if args.sysctl else ""))

    work = Path(tempfile.mkdtemp(prefix="homenet-day0-"))
    results: dict[str, list[Sample]] = {p.key: [] for p in args.paths}
    try:
        with Lab() as lab, signals_end_the_run():
            bench = Bench(lab, work, args)
            print(f"namespaces {lab.prefix}-*, work dir {work}", flush=True)
            for path in args.paths:
                bench.serve(path.name)
                for index in range(args.warmup + args.runs):
                    warmup = index < args.warmup
                    sample = bench.run(path, index, warmup)
                    results[path.key].append(sample)
                    status = f"{ms(sample.times['usable'])} ms" if sample.ok else f"FAILED: {sample.reason}"
                    number = index + 1 if warmup else index - args.warmup + 1
                    print(f"{path.key:20} {'warm-up' if warmup else 'run'} {number:>3}: {status}", flush=True)
                    if sample.fatal:
                        break
            report(args.paths, results, bench)
            if args.json:
                args.json.write_text(json.dumps({k: [vars(s) for s in v] for k, v in results.items()}, indent=1))
    except pytest.skip.Exception as exc:  # tests/netns.py found namespaces unusable
        print(f"day0.py cannot run: {exc.msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the benchmark's namespaces and processes are gone", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"logs of every run: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
