"""`homenet bench storm`: N new devices connect and register at once; how long until all confirmed.

How one run is set up (everything in a temp dir, removed at the end, also on Ctrl-C or SIGTERM):
  amqtt      `homenet gateway run` as its own process: the appliance exactly (embedded amqtt and
             the configurator in one process and one interpreter; broker accounts on, so every
             new device is handed an account in its `register.reply` and logs in again with it).
  gw-mosquitto  `homenet gateway run` with `[broker] engine = "mosquitto"`: the appliance with
             Mosquitto as its child process (broker/mosquitto.py), accounts kept by Mosquitto's
             dynamic-security plugin; as with amqtt every new device logs in again.
  mosquitto  Debian's Mosquitto (`homenet.brokers.Mosquitto`: anonymous clients, no ACL,
             `set_tcp_nodelay true`) and `homenet configurator run` against it, two processes.
             No accounts: the configurator issues none, agents register once. The baseline of
             the side-by-side ratios.
All: LAN 10.0.0.0/16 (the DHCP pool at 10.0.200.0 and up, so 51k static addresses), the memory
gateway driver, enrollment `auto`, a fresh database, logging as the product ships it (INFO, to a
file in the temp dir).

The devices are `bench/loadgen.py` agents (real signed messages, one asyncio loop per
process), spread over `--processes` generator processes started before the clock. On "go" every
agent starts its TCP connect at once. An observer (a paho client in this process, logged in as
the gateway's local operator when the broker authenticates) records when `config.applied` for
each device arrives on `events`: the configurator publishes it only after the `configured` state
is committed to its database. A run ends when every device is confirmed or at `--timeout`.

With `--renumber`, once all are confirmed the gateway is renumbered as after a firmware
upgrade: the configurator restarts (for amqtt the whole gateway process, broker included, so
every device reconnects) with its LAN moved from 10.0.0.0/16 to 10.1.0.0/16, re-plans every
device and sends new configs; reported is the time from that restart to the last device
confirming its new config (`config.applied` of version 2).

Reported per run: time from "go" to the last `config.applied`; per-agent latency from the
agent's first TCP connect to its `config.applied`; CPU seconds between "go" and the end of the
run of the configurator process (for amqtt: broker and configurator together), of Mosquitto,
of all generator processes and of this process (observer); the configurator process's peak
RSS (VmHWM) at the end. The database is then opened read-only to count `configured` devices.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import click
import paho.mqtt.client as paho

from homenet import __version__
from homenet.brokers import Mosquitto, wait_listening
from homenet.mqtt import make_client, set_nodelay
from homenet.netutil import free_port
from homenet.schemas import Topics

from . import loadgen

DEVICE_TYPE, MODEL = "iptv-stb", "Storm STB"
CONFIG_TOML = """\
[configurator]
gateway_driver = "memory"
enrollment = "auto"

[configurator.lan]
subnet = "10.0.0.0/16"
gateway = "10.0.0.1"
pool_start = "10.0.200.0"
pool_end = "10.0.255.254"
dns = ["10.0.0.1"]
"""
GW_MOSQUITTO = "gw-mosquitto"
"""`homenet gateway run` with `[broker] engine = "mosquitto"`: the appliance, its broker Mosquitto."""
ENGINE_MOSQUITTO = '\n[broker]\nengine = "mosquitto"\n'
BROKERS = ["amqtt", GW_MOSQUITTO, "mosquitto"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def console_script(name: str) -> str:
    """The console script of this very install (the one next to this interpreter)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise click.ClickException(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the observer ------------------------------------------------------------------------------


class Observer:
    """Arrival time of `config.applied` per device on `events`, and what else went wrong."""

    def __init__(self, url_port: int, topics: Topics, login: tuple[str, str] | None) -> None:
        self.topics = topics
        self.applied: dict[str, float] = {}
        self.reapplied: dict[str, float] = {}
        """A later version confirmed (after a renumbering)."""
        self.other: Counter[str] = Counter()
        self.samples: dict[str, str] = {}
        self.online = threading.Event()
        self.client = make_client(f"storm-observer-{os.getpid()}", clean_session=True,
                                  username=login[0] if login else None, password=login[1] if login else None)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", url_port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            set_nodelay(client)
            client.subscribe([(self.topics.events, 1), (self.topics.configurator_state, 1)])

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        arrived = time.monotonic()
        if msg.topic == self.topics.configurator_state:
            if msg.payload and json.loads(msg.payload)["body"]["state"] == "online":
                self.online.set()
            return
        body = json.loads(msg.payload)["body"]
        event = body["event"]
        if event == "config.applied":
            confirmed = self.applied if body["detail"].get("version", 1) == 1 else self.reapplied
            confirmed.setdefault(body["device_id"], arrived)
        elif event not in ("device.registered", "config.sent", "device.info", "device.online", "device.offline",
                           "lan.renumbered"):
            self.other[event] += 1
            self.samples.setdefault(event, f"{body.get('device_id')}: {body.get('reason')}"[:200])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- one run -----------------------------------------------------------------------------------


@dataclass
class StormRun:
    broker: str
    n: int
    timeout: float
    finished: bool = False
    confirmed: int = 0
    all_s: float | None = None
    p99_all_s: float | None = None
    """Time until 99 % of the devices were confirmed."""
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    rss_kb: dict[str, int] = field(default_factory=dict)
    gen_procs: int = 0
    gen_maxrss_kb: int = 0
    connections: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    unconfirmed: list[str] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    event_samples: dict[str, str] = field(default_factory=dict)
    store_configured: int | None = None
    repeat: int = 0
    """Which of `--repeat` rounds this run was (0 for the first)."""
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])
    """The 1-minute load average as the run was set up (the machine may be shared)."""
    db_bytes: int = 0
    profile: list[str] = field(default_factory=list)
    renumbered_s: float | None = None
    """Restart with the new LAN -> the last device confirmed its new config (`--renumber`)."""
    reconfirmed: int = 0

    def pct(self, q: int) -> float | None:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else None
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[q - 1]


class Server:
    """The configurator (and Mosquitto) for one run, in processes of their own."""

    def __init__(self, broker: str, tmp: Path) -> None:
        self.broker = broker
        self.tmp = tmp
        self.data = tmp / "gateway"
        self.config = tmp / "storm.toml"
        self.config.write_text(CONFIG_TOML + (ENGINE_MOSQUITTO if broker == GW_MOSQUITTO else ""))
        self.log = tmp / "configurator.log"
        self.mosquitto = Mosquitto() if broker == "mosquitto" else None
        self.port = self.mosquitto.port if self.mosquitto else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.mosquitto is not None:
            self.mosquitto.start()
        self.start_configurator()

    def start_configurator(self) -> None:
        """The configurator; for amqtt the gateway process (broker included)."""
        if self.mosquitto is not None:
            cmd = [console_script("homenet"), "configurator", "run", "--config", str(self.config),
                   "--data-dir", str(self.data), "--broker", self.mosquitto.url]
        else:
            cmd = [console_script("homenet"), "gateway", "run", "--config", str(self.config), "--data-dir",
                   str(self.data), "--listen", f"127.0.0.1:{self.port}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if self.broker != "mosquitto":
            wait_listening(self.port, timeout=30)

    def login(self, timeout: float = 30.0) -> tuple[str, str] | None:
        """The gateway's local operator account (only the appliance, `gateway run`, authenticates)."""
        if self.broker == "mosquitto":
            return None
        secret = self.data / "admin.secret"
        deadline = time.monotonic() + timeout
        while not secret.exists() or not secret.read_text().strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {secret} after {timeout}s")
            time.sleep(0.05)
        return ("admin", secret.read_text().strip())

    def pids(self) -> dict[str, int]:
        pids = {"configurator": self.proc.pid} if self.proc else {}
        if self.mosquitto and self.mosquitto.proc:
            pids["broker"] = self.mosquitto.proc.pid
        if self.broker == GW_MOSQUITTO and self.proc:
            import psutil

            pids["broker"] = next(c.pid for c in psutil.Process(self.proc.pid).children() if c.name() == "mosquitto")
        return pids

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        _stop_process(self.proc)
        if self.mosquitto:
            self.mosquitto.stop()

    def renumber(self, observer: Observer, n: int, timeout: float) -> tuple[float | None, int]:
        """Restart the configurator with the LAN moved to 10.1.0.0/16 (a firmware upgrade):
        seconds from the restart until all `n` devices confirmed their new config, and how many did."""
        _stop_process(self.proc)
        self.config.write_text(self.config.read_text().replace('"10.0.', '"10.1.'))
        t_restart = time.monotonic()
        self.start_configurator()
        deadline = t_restart + timeout
        while len(observer.reapplied) < n and time.monotonic() < deadline and self.alive():
            time.sleep(0.05)
        done = len(observer.reapplied)
        return (max(observer.reapplied.values()) - t_restart if done >= n else None), done


def _py_spy() -> str | None:
    return os.environ.get("PY_SPY") or shutil.which("py-spy") or next(
        (p for p in ("/tmp/pyspy-venv/bin/py-spy",) if Path(p).exists()), None)


def summarize_profile(raw: Path, top: int = 15) -> list[str]:
    """Top functions of py-spy's collapsed stacks: share of samples in which each is on the stack
    (inclusive) and at the top of it (self)."""
    incl: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = []
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            path = where.rsplit(":", 1)[0]
            for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
                path = path.split(marker, 1)[-1]
            frames.append(f"{name} ({path})")
        if frames:
            for f in set(frames):
                incl[f] += count
            own[frames[-1]] += count
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; inclusive % (on the stack) / self % (top of the stack)"]
    lines += [f"  incl {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    lines += [f"  self {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    return lines


def storm(broker: str, n: int, timeout: float, processes: int, profile: Path | None,
          keep: bool = False, renumber: bool = False) -> StormRun:
    run = StormRun(broker, n, timeout)
    ctx = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix=f"homenet-storm-{broker}-{n}-"))
        if keep:
            click.echo(f"    keeping {tmp}", err=True)
        else:
            stack.callback(shutil.rmtree, tmp, True)
        server = Server(broker, tmp)
        stack.callback(server.stop)
        # generators first: making N keys and signed registers overlaps the server's start
        devices = [loadgen.device_id(i) for i in range(n)]
        procs = max(1, min(processes, n))
        workers = []
        for k in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=loadgen.worker, daemon=True, name=f"storm-gen-{k}",
                            args=(child, "127.0.0.1", server.port, devices[k::procs], None, DEVICE_TYPE, MODEL))
            p.start()
            workers.append((p, parent))
            stack.callback(lambda p=p: (p.is_alive() and p.terminate(), p.join(5)))
        server.start()
        observer = Observer(server.port, Topics(), server.login())
        stack.callback(observer.close)
        if not observer.online.wait(60):
            raise click.ClickException(f"{broker}: the configurator did not come online in 60 s "
                                       f"(log: {server.log.read_text()[-2000:]})")
        for p, conn in workers:
            if not conn.poll(300):
                raise click.ClickException("a generator process did not get ready in 300 s")
            msg = conn.recv()
            if msg[0] != "ready":
                raise click.ClickException(f"generator failed: {msg[1]}")
        pids = server.pids()
        time.sleep(1.0)  # let the configurator's start settle (retained republish, replan)
        cpu0 = {name: proc_cpu(pid) for name, pid in pids.items()}
        self0 = _self_cpu()
        rss0 = proc_mem(pids["configurator"])
        spy = None
        if profile is not None:
            tool = _py_spy()
            if tool is None:
                raise click.ClickException("--profile needs py-spy (pip install py-spy; or PY_SPY=/path)")
            spy = subprocess.Popen([tool, "record", "-p", str(pids["configurator"]), "-r", "100", "-f", "raw",
                                    "-o", str(profile), "--nonblocking", "-d", str(int(timeout) + 5)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(_stop_process, spy, 15)
            time.sleep(1.0)
        t_go = time.monotonic()
        for _, conn in workers:
            conn.send("go")
        deadline, last_note = t_go + timeout, t_go
        while len(observer.applied) < n and time.monotonic() < deadline and server.alive():
            time.sleep(0.05)
            if time.monotonic() - last_note >= 10:
                last_note = time.monotonic()
                click.echo(f"    {broker} {n}: {len(observer.applied)} confirmed after "
                           f"{last_note - t_go:.0f} s", err=True)
        t_end = time.monotonic()
        run.elapsed_s = t_end - t_go
        run.finished = len(observer.applied) >= n
        cpu1 = {name: proc_cpu(pid) for name, pid in pids.items() if Path(f"/proc/{pid}").exists()}
        self1 = _self_cpu()
        rss1 = proc_mem(pids["configurator"]) if server.alive() else {}
        broker_rss = proc_mem(pids["broker"]) if Path(f"/proc/{pids.get('broker', 0)}").exists() else {}
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
        if renumber and run.finished:
            run.renumbered_s, run.reconfirmed = server.renumber(observer, n, timeout)
        for _, conn in workers:
            conn.send("stop")
        results = []
        for p, conn in workers:
            if conn.poll(60):
                msg = conn.recv()
                if msg[0] == "done":
                    results.append(msg[1])
                else:
                    run.errors.append(f"generator: {msg[1]}")
            else:
                run.errors.append(f"generator {p.pid} did not report within 60 s")
        observer.close()
        applied = dict(observer.applied)
        run.confirmed = len(applied)
        if run.finished:
            run.all_s = max(applied.values()) - t_go
        ordered = sorted(applied.values())
        need = -(-99 * n // 100)  # ceil(0.99 n)
        if len(ordered) >= need:
            run.p99_all_s = ordered[need - 1] - t_go
        for name in cpu0:
            if name in cpu1:
                run.cpu[name] = cpu1[name] - cpu0[name]
        run.cpu["generator"] = sum(r["cpu_s"] for r in results)
        run.cpu["observer"] = self1 - self0
        run.rss_kb = {"start": rss0.get("VmRSS", 0), "end": rss1.get("VmRSS", 0), "peak": rss1.get("VmHWM", 0),
                      "broker_peak": broker_rss.get("VmHWM", 0)}
        run.gen_procs = len(results)
        run.gen_maxrss_kb = max((r["maxrss_kb"] for r in results), default=0)
        for r in results:
            for device, (t_connect, _connack, _reg, _result, conns, refused, errors) in r["agents"].items():
                run.connections += conns
                run.refused += refused
                if errors and len(run.errors) < 8:
                    run.errors.append(f"{device}: {errors[0]}")
                if device in applied and t_connect:
                    run.latencies_ms.append((applied[device] - t_connect) * 1000)
                elif len(run.unconfirmed) < 5:
                    rel = [round(t - t_go, 2) if t else None for t in (t_connect, _connack, _reg, _result)]
                    run.unconfirmed.append(f"{device}: connect/connack/register/result at {rel} s, "
                                           f"{conns} connections, {errors}")
        run.events, run.event_samples = dict(observer.other), dict(observer.samples)
        if not server.alive():
            run.errors.append(f"configurator exited ({server.proc.returncode if server.proc else '?'}): "
                              f"{server.log.read_text()[-500:]}")
        server.stop()
        run.store_configured, run.db_bytes = _count_configured(server.data)
        if profile is not None and profile.exists():
            run.profile = summarize_profile(profile)
    return run


def _count_configured(data: Path) -> tuple[int | None, int]:
    """Read the database the configurator left (read-only): devices in state `configured`."""
    from homenet.configurator.app import db_path

    path = db_path(data)
    if not path.exists():
        return None, 0
    from homenet.configurator.lifecycle import State
    from homenet.configurator.store import SqliteStore

    store = SqliteStore(path, read_only=True)
    try:
        return sum(1 for r in store.all() if r.state == State.CONFIGURED), path.stat().st_size
    finally:
        store.close()


# --- footprint of one agent --------------------------------------------------------------------


def agent_connect_times(runs: int) -> list[float]:
    """Seconds from spawning `homenet-agent run` to its CONNECT arriving at a listening socket."""
    import socket

    times = []
    agent = console_script("homenet-agent")
    with tempfile.TemporaryDirectory(prefix="homenet-footprint-") as tmp, \
            socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(30)
        for i in range(runs):
            cmd = [agent, "run", "--broker", f"mqtt://127.0.0.1:{port}", "--collector", "simulated",
                   "--device-type", DEVICE_TYPE, "--device-id", f"fp-{i}", "--data-dir", f"{tmp}/a{i}"]
            start = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(30)
                    first = conn.recv(1)
                    arrived = time.monotonic()
                    if first[:1] != b"\x10":
                        raise RuntimeError(f"expected CONNECT, got {first!r}")
                times.append(arrived - start)
            finally:
                _stop_process(proc, 5)
    return times


def agent_rss(count: int, timeout: float = 30.0) -> list[dict[str, int]]:
    """VmRSS/VmHWM of `count` real agents, 3 s after each confirmed its config (Mosquitto +
    `homenet configurator run`)."""
    out = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="homenet-footprint-")))
        server = Server("mosquitto", tmp)
        stack.callback(server.stop)
        server.start()
        observer = Observer(server.port, Topics(), None)
        stack.callback(observer.close)
        if not observer.online.wait(30):
            raise click.ClickException("configurator not online in 30 s")
        procs = []
        for i in range(count):
            cmd = [console_script("homenet-agent"), "run", "--broker", f"mqtt://127.0.0.1:{server.port}",
                   "--collector", "simulated", "--device-type", DEVICE_TYPE, "--device-id", f"fp-rss-{i}",
                   "--data-dir", str(tmp / f"agent{i}")]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(_stop_process, proc, 5)
            procs.append(proc)
        deadline = time.monotonic() + timeout
        while len(observer.applied) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)
        for proc in procs:
            if proc.poll() is None:
                out.append(proc_mem(proc.pid))
    return out


def synthetic_database(data: Path, n: int) -> None:
    """A database of `n` configured iptv-stb devices, as the configurator would have left it
    after onboarding them (each record built by the real models and planner, its config signed
    by the configurator key in `data`), written in one go: building it through the configurator
    is what the storm measures."""
    from homenet.keys import KeyPair
    from homenet.schemas import encode
    from homenet.schemas.messages import Config, ConfigResult, ItemResult, ItemStatus, ResultStatus
    from homenet.settings import LanSettings

    from homenet.configurator.app import KEY_NAME, db_path, lan_plan
    from homenet.configurator.lifecycle import State
    from homenet.configurator.policy import NetworkView, evaluate
    from homenet.configurator.records import DeviceRecord
    from homenet.configurator.store import SqliteStore

    data.mkdir(parents=True, exist_ok=True)
    conf_key = KeyPair.load_or_create(data / KEY_NAME)
    lan = LanSettings(subnet="10.0.0.0/16", gateway="10.0.0.1", pool_start="10.0.200.0",
                      pool_end="10.0.255.254", dns=["10.0.0.1"])
    plan_lan = lan_plan(lan)
    gen = loadgen.Generator("127.0.0.1", 1, [], None, DEVICE_TYPE, MODEL)
    store = SqliteStore(db_path(data))
    with store.transaction():
        for i in range(n):
            agent = loadgen.SimAgent(gen, loadgen.device_id(i), KeyPair.generate(), DEVICE_TYPE, MODEL)
            address = f"10.0.{(i + 2) // 256}.{(i + 2) % 256}"
            agent.address, agent.applied, agent.username = (address, 16), 1, agent.device
            items = [item.model_copy(update={"address": address}) if item.kind == "ipv4" else item
                     for item in evaluate(agent.info(), NetworkView(plan_lan)).items]
            config = Config(device_id=agent.device, version=1, epoch=1, profile=DEVICE_TYPE, items=items)
            config_id, payload = encode("config", config, sender="configurator", seq=10 + i, sign=conf_key.sign)
            mine = [item for item in items if item.target == "agent"]
            result = ConfigResult(re=config_id, version=1, status=ResultStatus.OK,
                                  items=[ItemResult(item=item.kind, status=ItemStatus.APPLIED) for item in mine],
                                  in_force={item.kind: item.model_dump(mode="json", exclude={"kind", "target"})
                                            for item in mine})
            record = DeviceRecord(device_id=agent.device, state=State.CONFIGURED, online=False, info=agent.info(),
                                  profile=DEVICE_TYPE, config=config, config_payload=payload.decode(), result=result,
                                  public_key=agent.info().public_key, register_id="0" * 32, last_seq=4)
            store.put(record)
        store.set_meta(epoch=1, seq_reserved=10 + n + 1000)
    store.close()


def configurator_at_rest(n: int, timeout: float = 180.0) -> dict[str, float]:
    """`homenet configurator run` (Mosquitto) started on a database of `n` devices: seconds until
    its CPU is idle (republish, re-plan), and its RSS then."""
    from homenet.configurator.app import db_path

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="homenet-rest-")))
        server = Server("mosquitto", tmp)
        stack.callback(server.stop)
        synthetic_database(server.data, n)
        start = time.monotonic()
        server.start()
        pid = server.proc.pid if server.proc else 0
        previous, idle_since = 0.0, None
        while time.monotonic() - start < timeout and server.alive():
            time.sleep(0.5)
            cpu = proc_cpu(pid)
            if cpu - previous < 0.02:  # under 4 % of a core for half a second
                idle_since = idle_since or time.monotonic() - 0.5
                if time.monotonic() - idle_since >= 1.5:
                    break
            else:
                idle_since = None
            previous = cpu
        mem = proc_mem(pid) if server.alive() else {}
        return {"devices": n, "idle_after_s": (idle_since or time.monotonic()) - start,
                "idle": idle_since is not None, "cpu_s": previous, "rss_kb": mem.get("VmRSS", 0),
                "peak_kb": mem.get("VmHWM", 0), "db_bytes": db_path(server.data).stat().st_size}


# --- the command -------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(runs: list[StormRun]) -> str:
    head = (f"{'broker':<12} {'N':>5} {'all confirmed':>16} {'99% conf':>8} {'p50 ms':>8} {'p99 ms':>8} {'conf cpu s':>10} "
            f"{'broker cpu s':>12} {'gen cpu s':>9} {'obs cpu s':>9} {'conf peak RSS':>13} {'db MB':>6}")
    lines = [head]
    for r in runs:
        done = f"{r.all_s:.2f} s" if r.finished else f"{r.confirmed}/{r.n} in {r.timeout:.0f}s"
        broker_cpu = _fmt(r.cpu.get("broker")) if "broker" in r.cpu else "(in conf)"
        lines.append(f"{r.broker:<12} {r.n:>5} {done:>16} {_fmt(r.p99_all_s, '.2f'):>8} {_fmt(r.pct(50), '.0f'):>8} {_fmt(r.pct(99), '.0f'):>8} "
                     f"{_fmt(r.cpu.get('configurator')):>10} {broker_cpu:>12} {_fmt(r.cpu.get('generator')):>9} "
                     f"{_fmt(r.cpu.get('observer')):>9} {r.rss_kb.get('peak', 0) / 1024:>10.1f} MB "
                     f"{r.db_bytes / 1e6:>6.1f}")
    return "\n".join(lines)


def side_by_side(runs: list[StormRun], baseline: str = "mosquitto") -> str:
    """Per size, every broker's time to all confirmed and its ratio to `baseline`'s in this run
    (a run that did not finish counts its timeout: the ratio is then at least that)."""
    lines = [f"side by side (ratio: time to all confirmed / {baseline}'s in this run):"]
    for repeat, n in dict.fromkeys((r.repeat, r.n) for r in runs):
        same = [r for r in runs if r.n == n and r.repeat == repeat]
        base = next((r for r in same if r.broker == baseline and r.finished), None)
        cells = []
        for r in same:
            took = r.all_s if r.finished else r.timeout
            ratio = f"{'>=' if not r.finished else ''}{took / base.all_s:.1f}x" if base and base.all_s else "-"
            what = f"{r.all_s:.2f} s" if r.finished else f"{r.confirmed}/{r.n} in {r.timeout:.0f} s"
            cells.append(f"{r.broker} {what} ({ratio})")
        lines.append(f"  {n:>5}{f' #{repeat + 1}' if repeat else ''}: " + " | ".join(cells))
    return "\n".join(lines)


def lost(runs: list[StormRun]) -> str:
    """Per broker and size: in how many runs every device was confirmed, and the devices
    not confirmed in each run (the "no device lost, ever" check of `--repeat`)."""
    lines = ["devices not confirmed by the end of each run:"]
    for broker, n in dict.fromkeys((r.broker, r.n) for r in runs):
        mine = [r for r in runs if r.broker == broker and r.n == n]
        missing = [r.n - r.confirmed for r in mine]
        lines.append(f"  {broker} {n}: every device confirmed in {missing.count(0)}/{len(mine)} runs; "
                     f"not confirmed per run: {missing}")
    return "\n".join(lines)


def details(r: StormRun) -> str:
    lines = [f"  {r.broker} {r.n}: elapsed {r.elapsed_s:.1f} s, confirmed (events) {r.confirmed}/{r.n}, "
             f"configured in the database {r.store_configured}; configurator RSS start "
             f"{r.rss_kb.get('start', 0) / 1024:.1f} MB, end {r.rss_kb.get('end', 0) / 1024:.1f} MB, peak "
             f"{r.rss_kb.get('peak', 0) / 1024:.1f} MB"
             + (f" (Mosquitto's peak {r.rss_kb['broker_peak'] / 1024:.1f} MB)" if r.rss_kb.get("broker_peak") else "")
             + f"; {r.gen_procs} generator processes (max RSS "
             f"{r.gen_maxrss_kb / 1024:.0f} MB each); TCP connections {r.connections} (refused {r.refused}); load average (1 min) before "
             f"{r.load_before:.2f}"]
    if r.reconfirmed:
        lines.append(f"    renumbered (restart with 10.1.0.0/16): "
                     + (f"all {r.n} confirmed their new config {r.renumbered_s:.2f} s after the restart"
                        if r.renumbered_s is not None else f"{r.reconfirmed}/{r.n} confirmed in {r.timeout:.0f} s"))
    if r.events:
        lines.append(f"    other events: {r.events}; e.g. {r.event_samples}")
    lines += [f"    error: {e}" for e in r.errors]
    lines += [f"    not confirmed: {e}" for e in r.unconfirmed]
    if r.profile:
        lines.append("    profile of the configurator process (py-spy):")
        lines += [f"    {p}" for p in r.profile]
    return "\n".join(lines)


def terminated(signum: int, _frame: Any) -> NoReturn:
    """SIGTERM handler: unwind like Ctrl-C does, so the cleanup in `finally` stops our processes."""
    raise SystemExit(128 + signum)


def run_storm(counts: list[int], brokers: list[str], timeout: float, processes: int, profile: Path | None,
              footprint: bool, json_out: Path | None, keep: bool = False, renumber: bool = False,
              repeat: int = 1) -> bool:
    """Run and print every storm; True when every device was confirmed in every run."""
    if any("mosquitto" in b for b in brokers) and Mosquitto.binary() is None:
        raise click.ClickException("mosquitto is not installed (Debian package 'mosquitto')")
    click.echo(f"homenet {__version__} bench storm: N agents ({DEVICE_TYPE}) connect and register at once; "
               f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs; timeout {timeout:.0f} s "
               f"per run, {processes} generator processes; load average "
               f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    click.echo("all confirmed: go -> last config.applied (99% conf: -> the ceil(0.99 N)th); p50/p99: agent's TCP connect -> its config.applied; "
               "cpu: go -> end of run\n")
    runs: list[StormRun] = []
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        for k in range(repeat):
            for n in counts:  # each size on every broker in turn: a pair shares the machine's load
                for broker in brokers:
                    prof = None
                    if profile is not None:
                        prof = profile.with_name(f"{profile.stem}-{broker}-{n}{profile.suffix or '.txt'}")
                    runs.append(storm(broker, n, timeout, processes, prof, keep, renumber))
                    runs[-1].repeat = k
                    click.echo(f"  {broker} {n}{f' #{k + 1}' if repeat > 1 else ''}: "
                               f"{'done' if runs[-1].finished else 'NOT FINISHED'} after {runs[-1].elapsed_s:.1f} s "
                               f"(load {runs[-1].load_before:.2f})", err=True)
        click.echo(table(runs))
        click.echo("")
        click.echo(side_by_side(runs))
        if repeat > 1:
            click.echo(lost(runs))
        click.echo(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
        for r in runs:
            click.echo(details(r))
        fp: dict[str, Any] = {}
        if footprint:
            times = agent_connect_times(5)
            mems = agent_rss(3)
            rest = [configurator_at_rest(k) for k in (1000, 5000)]
            fp = {"start_to_connect_s": times, "rss_kb": mems, "configurator_at_rest": rest}
            click.echo(f"\nagent footprint (homenet-agent run --collector simulated):\n"
                       f"  process start -> CONNECT at the socket: median {statistics.median(times):.3f} s "
                       f"(min {min(times):.3f}, max {max(times):.3f}, n={len(times)}; fresh data dir each)\n"
                       f"  RSS 3 s after confirmed: " + ", ".join(
                           f"{m['VmRSS'] / 1024:.1f} MB (peak {m['VmHWM'] / 1024:.1f})" for m in mems))
            click.echo("configurator at rest (`configurator run` on Mosquitto, started on a database of N "
                       "configured devices, RSS once its CPU is idle):")
            for r in rest:
                click.echo(f"  N={r['devices']}: db {r['db_bytes'] / 1e6:.1f} MB; idle after {r['idle_after_s']:.1f} s"
                           f"{'' if r['idle'] else ' (NOT idle: timeout)'} ({r['cpu_s']:.1f} CPU s); "
                           f"RSS {r['rss_kb'] / 1024:.1f} MB, peak {r['peak_kb'] / 1024:.1f} MB")
        if json_out is not None:
            json_out.write_text(json.dumps({"runs": [r.__dict__ for r in runs], "footprint": fp}, indent=1,
                                           default=str))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return all(r.finished for r in runs)
