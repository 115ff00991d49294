"""Soak: real processes for a set time while devices join, leave and flap and the broker and the
configurator are restarted; then the invariants. A reliability check, not part of `make test`.

    .venv/bin/python bench/soak.py --duration 600 --devices 24 --broker amqtt    # or: make soak ARGS="..."

What runs (everything in a temp dir, removed unless --keep; every process stopped by its PID at
the end, also on Ctrl-C or SIGTERM):
  broker        amqtt: `homenet broker run`, its own process so that it restarts apart from the
                configurator, authenticating against the accounts file the configurator writes
                (what `homenet gateway run` does in one process). mosquitto: Debian's Mosquitto
                (homenet.brokers.Mosquitto: anonymous clients, no ACL, as in `bench storm`).
  configurator  `homenet configurator run`: memory gateway driver, enrollment auto, default LAN.
  devices       one `homenet-agent run --collector simulated` per device, mixed types, each with
                its own data dir and log.
  observer      a paho client in this process counting what appears on `events` (storm.Observer).

After a warm-up (the first --devices devices configured) a seeded RNG picks an action every
1 to 2 x --interval seconds; the seed is printed and --seed replays the same choices:
  join          a new device starts
  leave         `homenet devices forget ID`, then its agent is stopped (SIGTERM): gone for good
  flap          its agent SIGKILLed, restarted 2-20 s later with the same data dir
  stall         its agent SIGSTOPped (a network stall), SIGCONTed 5-60 s later: past 60 s the
                broker has dropped it (keepalive 30 s x 1.5)
  broker        SIGTERM or SIGKILL, started again on the same port 0.5-5 s later (both brokers
                lose their retained messages: amqtt keeps none, Mosquitto runs without persistence)
  configurator  SIGKILL, started again 0.5-5 s later
  attack        (amqtt) issue 11's attacks from the LAN with mosquitto_pub: CONNECTs under a running
                device's id and the configurator's, wills on gateway/state and configurator/command,
                200 connections that never send CONNECT (half closed at once, half held 1-15 s);
                no attacker's will may ever be retained (docs/security.md)
Then the settle phase: every flapped agent restarted, every stalled one continued, no more
faults; the invariants are checked every few seconds until they all hold (the convergence time)
or --settle runs out. Then everything is stopped with SIGTERM and the logs are read. Exit status
1 when an invariant is broken, 2 when the soak itself could not run.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from homenet.agent.executor import SimulatedExecutor
from homenet.agent.state import AgentState
from homenet.brokers import Mosquitto, wait_listening
from homenet.configurator.app import ADMIN, ADMIN_SECRET, db_path
from homenet.configurator.lifecycle import State
from homenet.configurator.profiles import PROFILES
from homenet.configurator.records import DeviceRecord
from homenet.bench.storm import Observer, console_script, terminated
from homenet.configurator.store import SqliteStore
from homenet.durable import read_json
from homenet.mqtt import make_client
from homenet.netutil import free_port
from homenet.schemas import Topics

TOPICS = Topics()
REPO = Path(__file__).resolve().parent.parent
DEVICE_TYPES = sorted(PROFILES)
WEIGHTS = {"join": 3.0, "leave": 1.5, "flap": 3.0, "stall": 1.0, "broker": 0.6, "configurator": 1.0, "attack": 0.8}
"""How often each action is picked (among those possible at that moment)."""
ROUTINE_EVENTS = {"device.registered", "config.sent", "config.applied", "device.info", "device.online",
                  "device.offline", "device.forgotten"}
"""What the faults are expected to cause; every other event kind is listed in the summary."""
FORGOTTEN_CHANNELS = ("config", "config/result", "info")
RECONNECTED = 10.0
"""Seconds after the broker's or the configurator's start before an operator command is sent."""
RECOVERIES = ("flap.back", "stall.cont", "broker.up", "configurator.up", "attack.end")
ATTACK_MARK = b"SOAK-PWNED"
"""What the attack fault's wills carry: it must never be published (check_retained)."""


class Line:
    """Progress on stderr, stamped with seconds since the start: a long silence looks like a hang."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f} s] {text}", file=sys.stderr, flush=True)


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Program:
    """One program of the soak; its output goes to one log file across all its restarts."""

    cmd: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    exit_codes: list[int] = field(default_factory=list)
    """Exit codes after a SIGTERM (each should be 0)."""
    started: float = 0.0
    _terminated: set[int] = field(default_factory=set)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or said goodbye to."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def terminate(self) -> None:
        """SIGCONT (in case it is stalled), then one SIGTERM. Only one: a second one that lands
        while Python finalizes (its handlers are reset by then) would kill it with -15."""
        if self.alive() and self.proc is not None and self.proc.pid not in self._terminated:
            self._terminated.add(self.proc.pid)
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)

    def stop(self, grace: float = 20.0) -> None:
        """Terminate, wait for the exit (SIGKILL after `grace` s) and keep the exit code."""
        if not self.alive():
            return
        self.terminate()
        assert self.proc is not None
        try:
            self.exit_codes.append(self.proc.wait(timeout=grace))
        except subprocess.TimeoutExpired:
            self.kill()
            self.exit_codes.append(self.proc.returncode)


class Broker(Protocol):
    """What the soak does with either broker: start it, bring it down by a signal, stop it."""

    port: int
    url: str
    started: float

    def start(self) -> None: ...
    def alive(self) -> bool: ...
    def down(self, sig: int) -> None: ...
    def stop(self) -> None: ...
    def logs(self) -> list[Path]: ...
    def exit_codes(self) -> list[int]: ...


class AmqttBroker:
    """`homenet broker run` as its own process."""

    def __init__(self, tmp: Path, config: Path) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.started = 0.0
        self.program = Program([console_script("homenet"), "broker", "run", "--config", str(config),
                                "--listen", f"127.0.0.1:{self.port}"], tmp / "broker.log")

    def start(self) -> None:
        self.program.start()
        wait_listening(self.port, timeout=60)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.program.alive()

    def down(self, sig: int) -> None:
        if sig == signal.SIGKILL:
            self.program.kill()
        else:
            self.program.stop()

    def stop(self) -> None:
        self.program.stop()

    def logs(self) -> list[Path]:
        return [self.program.log]

    def exit_codes(self) -> list[int]:
        return self.program.exit_codes


class MosquittoBroker:
    """Debian's Mosquitto through homenet.brokers.Mosquitto, restarted on the same port."""

    def __init__(self) -> None:
        self.handle = Mosquitto()
        self.port, self.url = self.handle.port, self.handle.url
        self.started = 0.0
        self._codes: list[int] = []

    def start(self) -> None:
        self.handle.start()  # writes its config again into its own dir, which `down` keeps
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.handle.proc is not None and self.handle.proc.poll() is None

    def down(self, sig: int) -> None:
        proc = self.handle.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            code = proc.wait(timeout=30)
            if sig == signal.SIGTERM:
                self._codes.append(code)

    def stop(self) -> None:
        self.down(signal.SIGTERM)
        self.handle.stop()  # also removes its dir

    def logs(self) -> list[Path]:
        return []  # Mosquitto's own log has no Python tracebacks to look for

    def exit_codes(self) -> list[int]:
        return self._codes


@dataclass
class Device:
    """One simulated device: its agent process and what the soak has done to it."""

    device_id: str
    device_type: str
    data: Path
    program: Program
    state: str = "running"
    """running, down (SIGKILLed, to be restarted), stalled (SIGSTOPped) or forgotten."""
    since: float = field(default_factory=time.monotonic)
    """When it last became `running`."""

    def set_running(self) -> None:
        self.state, self.since = "running", time.monotonic()


# --- reading the state -------------------------------------------------------------------------


def load_records(data: Path) -> dict[str, DeviceRecord]:
    """The configurator's database as a fresh reader sees it (read-only, beside the writer)."""
    store = SqliteStore(db_path(data), read_only=True)
    try:
        return {r.device_id: r for r in store.all()}
    finally:
        store.close()


def retained_messages(port: int, login: tuple[str, str] | None, quiet: float = 1.5,
                      timeout: float = 15.0) -> dict[str, bytes] | None:
    """What a newcomer gets from the broker: every retained message under the root (topic ->
    payload), once nothing more has arrived for `quiet` seconds. None: broker unreachable."""
    found: dict[str, bytes] = {}
    last = [time.monotonic()]
    subscribed = threading.Event()
    client = make_client(f"soak-reader-{os.getpid()}", clean_session=True,
                         username=login[0] if login else None, password=login[1] if login else None)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        last[0] = time.monotonic()
        if msg.retain and msg.payload:
            found[msg.topic] = bytes(msg.payload)

    def on_subscribe(*_: Any) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    client.on_connect = lambda c, *_: c.subscribe(TOPICS.all, qos=1)
    client.on_subscribe, client.on_message = on_subscribe, on_message
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except OSError:
        return None
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        if not subscribed.wait(timeout):
            return None
        while time.monotonic() - last[0] < quiet and time.monotonic() < deadline:
            time.sleep(0.1)
        return found
    finally:
        client.disconnect()
        client.loop_stop()


def body_of(payload: bytes | None) -> dict[str, Any]:
    return json.loads(payload).get("body", {}) if payload else {}


def tracebacks(logs: list[Path]) -> tuple[list[str], Counter[str]]:
    """Tracebacks in the logs: one line each (log, and the exception that ends it) for those
    that pass through homenet's code; a count by exception of those entirely inside libraries
    (amqtt logs one each time it gives up waiting for a PUBACK)."""
    ours: list[str] = []
    libraries: Counter[str] = Counter()
    for log in logs:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        for i, line in enumerate(lines):
            if not line.startswith("Traceback (most recent call last)"):
                continue
            block = list(itertools.takewhile(lambda l: l.startswith(" "), lines[i + 1:]))
            end = lines[i + 1 + len(block)] if i + 1 + len(block) < len(lines) else "?"
            frames = [l.split('"')[1] for l in block if l.startswith('  File "')]
            if any(_homenet_code(path) for path in frames):
                ours.append(f"{log.name}: {end[:160]}")
            else:
                where = frames[0] if frames else "?"  # the outermost frame: whose loop or callback it was
                library = where.split("site-packages/")[1].split("/")[0] if "site-packages/" in where else where
                libraries[f"{library}: {re.sub(r'[0-9]+', 'N', end)[:100]}"] += 1
    return ours, libraries


def _homenet_code(path: str) -> bool:
    """A source file of this project (an editable install: the repo; else site-packages/homenet)."""
    return "site-packages/homenet/" in path or ("site-packages/" not in path and path.startswith(str(REPO)))


# --- the soak ----------------------------------------------------------------------------------


@dataclass
class Action:
    """One line of the timeline: a fault, a join or leave, or the undoing of a fault."""

    t: float
    kind: str
    target: str
    detail: str = ""


class Soak:
    """The processes, the device pool, the timeline and the faults still to be undone."""

    def __init__(self, args: argparse.Namespace, tmp: Path, note: Line) -> None:
        self.args = args
        self.tmp = tmp
        self.note = note
        self.rng = random.Random(args.seed)
        self.data = tmp / "gateway"
        config = tmp / "soak.toml"
        accounts = self.data / "broker-accounts.json"
        if args.broker == "amqtt":  # both read it: the broker its [broker], the configurator the rest
            config.write_text(f'[broker]\naccounts_file = "{accounts}"\n\n[configurator]\n'
                              f'accounts_file = "{accounts}"\ngateway_driver = "memory"\nenrollment = "auto"\n')
            self.broker: Broker = AmqttBroker(tmp, config)
        else:
            config.write_text('[configurator]\ngateway_driver = "memory"\nenrollment = "auto"\n')
            self.broker = MosquittoBroker()
        self.configurator = Program([console_script("homenet"), "configurator", "run", "--config", str(config),
                                     "--data-dir", str(self.data), "--broker", self.broker.url],
                                    tmp / "configurator.log")
        self.devices: dict[str, Device] = {}
        self.joined = 0
        self.actions: list[Action] = []
        self.failures: list[str] = []
        self._pending: list[tuple[float, int, str, str, Callable[[], str]]] = []
        self._order = itertools.count()
        self.leftover_status: list[str] = []
        """Forgotten devices that still have a retained `status` (see check_retained)."""
        self._t0 = time.monotonic()
        self.observer: Observer | None = None

    # --- setting up ----------------------------------------------------------------------

    def login(self) -> tuple[str, str] | None:
        """The gateway's local operator (amqtt only: Mosquitto here lets anyone in)."""
        if self.args.broker != "amqtt":
            return None
        secret = self.data / ADMIN_SECRET
        deadline = time.monotonic() + 60
        while not (secret.exists() and secret.read_text().strip()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {secret} after 60 s")
            time.sleep(0.1)
        return ADMIN, secret.read_text().strip()

    def start(self) -> float:
        """Broker, configurator, observer, the first devices; seconds until all were configured."""
        self.broker.start()
        self.configurator.start()
        self.observer = Observer(self.broker.port, TOPICS, self.login())
        if not self.observer.online.wait(60):
            raise RuntimeError(f"the configurator was not online after 60 s: {self.configurator.log}")
        began = time.monotonic()
        for _ in range(self.args.devices):
            self.join()
            time.sleep(0.2)
        while time.monotonic() - began < self.args.settle:
            records = load_records(self.data)
            if all(d in records and records[d].state == State.CONFIGURED for d in self.devices):
                return time.monotonic() - began
            time.sleep(1)
        raise RuntimeError(f"the first {self.args.devices} devices were not all configured after "
                           f"{self.args.settle:.0f} s (try fewer --devices or a longer --settle)")

    # --- actions -------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self._t0

    def record(self, kind: str, target: str, detail: str = "") -> None:
        self.actions.append(Action(self.now(), kind, target, detail))

    def later(self, delay: float, kind: str, target: str, undo: Callable[[], str]) -> None:
        heapq.heappush(self._pending, (time.monotonic() + delay, next(self._order), kind, target, undo))

    def run_due(self, everything: bool = False) -> None:
        while self._pending and (everything or self._pending[0][0] <= time.monotonic()):
            _, _, kind, target, undo = heapq.heappop(self._pending)
            self.record(kind, target, undo())

    def running(self) -> list[Device]:
        return [d for d in self.devices.values() if d.state == "running"]

    def leavable(self) -> list[Device]:
        """Running devices that are through their (re)connection and registration: forgetting a
        device while it registers lets it straight back in (as it should), which is not what
        `leave` means to test."""
        return [d for d in self.running() if time.monotonic() - d.since > RECONNECTED]

    def possible(self, kind: str) -> bool:
        live = sum(d.state != "forgotten" for d in self.devices.values())
        # an operator command reaches only a configurator that is subscribed, and devices
        # register again after either restarts: give them time (paho's backoff after a 5 s
        # broker outage is 1 + 2 + 4 s)
        settled = time.monotonic() - max(self.broker.started, self.configurator.started) > RECONNECTED
        gateway_up = self.broker.alive() and self.configurator.alive() and settled
        return {"join": live < self.args.devices * 3 // 2,
                "leave": gateway_up and bool(self.leavable()) and len(self.running()) > max(1, self.args.devices // 2),
                "flap": bool(self.running()), "stall": bool(self.running()),
                "broker": self.broker.alive(), "configurator": self.configurator.alive(),
                # amqtt only: this Mosquitto lets anyone in under any id (docs/security.md)
                "attack": self.args.broker == "amqtt" and gateway_up and bool(self.running())}[kind]

    def act(self) -> None:
        kinds = [k for k in WEIGHTS if self.possible(k)]
        kind = self.rng.choices(kinds, [WEIGHTS[k] for k in kinds])[0]
        if kind == "join":
            device = self.join()
            self.record("join", device.device_id, device.device_type)
        elif kind == "broker":
            self.restart_broker()
        elif kind == "configurator":
            self.restart_configurator()
        elif kind == "attack":
            self.attack(self.rng.choice(sorted(self.running(), key=lambda d: d.device_id)))
        else:
            pool = self.leavable() if kind == "leave" else self.running()
            device = self.rng.choice(sorted(pool, key=lambda d: d.device_id))
            {"leave": self.leave, "flap": self.flap, "stall": self.stall}[kind](device)

    def join(self) -> Device:
        device_id, device_type = f"soak-{self.joined:03d}", self.rng.choice(DEVICE_TYPES)
        self.joined += 1
        data = self.tmp / "agents" / device_id
        program = Program([console_script("homenet-agent"), "run", "--broker", self.broker.url,
                           "--collector", "simulated", "--executor", "simulated", "--device-type", device_type,
                           "--device-id", device_id, "--model", f"Soak {device_type}", "--data-dir", str(data)],
                          self.tmp / "agents" / f"{device_id}.log")
        data.mkdir(parents=True)
        program.start()
        self.devices[device_id] = device = Device(device_id, device_type, data, program)
        return device

    def leave(self, device: Device) -> None:
        cmd = [console_script("homenet"), "devices", "forget", device.device_id, "--data-dir", str(self.data),
               "--broker", self.broker.url]
        with open(self.tmp / "commands.log", "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=60)
        if done.returncode != 0:
            self.failures.append(f"t={self.now():.1f} s: forget {device.device_id} exited {done.returncode} "
                                 f"(commands.log); the device stays")
            self.record("leave.failed", device.device_id, f"forget exited {done.returncode}")
            return
        device.program.stop()
        device.state = "forgotten"
        self.record("leave", device.device_id, f"forgotten; agent exited {device.program.exit_codes[-1]}")

    def flap(self, device: Device) -> None:
        device.program.kill()
        device.state = "down"
        delay = self.rng.uniform(2, 20)
        self.record("flap", device.device_id, f"SIGKILL; back in {delay:.1f} s")

        def back() -> str:
            device.program.start()
            device.set_running()
            return "restarted, same data dir"
        self.later(delay, "flap.back", device.device_id, back)

    def stall(self, device: Device) -> None:
        device.program.signal(signal.SIGSTOP)
        device.state = "stalled"
        delay = self.rng.uniform(5, 60)
        self.record("stall", device.device_id, f"SIGSTOP; SIGCONT in {delay:.1f} s")

        def resume() -> str:
            device.program.signal(signal.SIGCONT)
            device.set_running()
            return "SIGCONT"
        self.later(delay, "stall.cont", device.device_id, resume)

    def restart_broker(self) -> None:
        sig = self.rng.choice([signal.SIGTERM, signal.SIGKILL])
        delay = self.rng.uniform(0.5, 5)
        self.broker.down(sig)
        self.record("broker", self.args.broker, f"{sig.name}; up again in {delay:.1f} s")

        def up() -> str:
            self.broker.start()
            return f"listening on {self.broker.port}"
        self.later(delay, "broker.up", self.args.broker, up)

    def restart_configurator(self) -> None:
        delay = self.rng.uniform(0.5, 5)
        self.configurator.kill()
        self.record("configurator", "configurator", f"SIGKILL; started again in {delay:.1f} s")

        def up() -> str:
            self.configurator.start()
            return "started"
        self.later(delay, "configurator.up", "configurator", up)

    def attack(self, victim: Device) -> None:
        """Issue 11's attacks from the LAN (docs/security.md): CONNECTs naming the victim and
        the configurator, wills on the gateway state and on operator commands, and 200
        connections that never send CONNECT (half closed at once, half held for a while)."""
        will = ["-c", "--will-payload", ATTACK_MARK.decode(), "--will-retain"]
        tries = [["-i", victim.device_id], ["-i", "homenet-configurator"],
                 ["-i", victim.device_id, *will, "--will-topic", TOPICS.gateway_state],
                 ["-i", f"stranger-{self.rng.randrange(10**6)}", *will, "--will-topic", TOPICS.command]]
        for args in tries:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.broker.port), "-t", "x", "-m", "x",
                            "-q", "1", *args], capture_output=True, timeout=30)
        held = []
        for n in range(200):
            try:
                sock = socket.create_connection(("127.0.0.1", self.broker.port), timeout=5,
                                                source_address=(f"127.0.3.{n % 20 + 1}", 0))
            except OSError:
                continue
            if n % 2:
                sock.close()
            else:
                held.append(sock)
        delay = self.rng.uniform(1, 15)
        self.record("attack", victim.device_id, f"{len(tries)} CONNECTs, {len(held)} held open for {delay:.1f} s")

        def end() -> str:
            for sock in held:
                sock.close()
            return f"{len(held)} connections closed"
        self.later(delay, "attack.end", victim.device_id, end)

    def faults(self) -> None:
        """The random schedule, for --duration seconds."""
        end = time.monotonic() + self.args.duration
        next_action, next_note = time.monotonic() + self.gap(), time.monotonic() + 60
        while time.monotonic() < end:
            self.run_due()
            if time.monotonic() >= next_action:
                self.act()
                next_action = time.monotonic() + self.gap()
            if time.monotonic() >= next_note:
                next_note += 60
                states = Counter(d.state for d in self.devices.values())
                self.note(f"{len(self.actions)} timeline entries; devices {dict(states)}")
            time.sleep(0.1)

    def gap(self) -> float:
        return self.rng.uniform(1, 2 * self.args.interval)

    # --- the end -------------------------------------------------------------------------

    def settle(self) -> tuple[float | None, dict[str, list[str]]]:
        """Undo every pending fault at once, then check until all holds or --settle is over."""
        self.run_due(everything=True)
        began = time.monotonic()
        while True:
            problems = self.check()
            if not any(problems.values()):
                return time.monotonic() - began, problems
            if time.monotonic() - began > self.args.settle:
                return None, problems
            time.sleep(2)

    def check(self) -> dict[str, list[str]]:
        """Every invariant that can be checked while running -> what breaks it (empty: holds)."""
        records = load_records(self.data)
        expected = {d.device_id: d for d in self.devices.values() if d.state != "forgotten"}
        forgotten = {d for d, dev in self.devices.items() if dev.state == "forgotten"}
        out: dict[str, list[str]] = {name: [] for name in (
            "broker and configurator running", "every running device in the database and online",
            "no device stuck unconfirmed", "every agent applied its latest version",
            "no two devices share an address", "forgotten devices are gone",
            "retained state matches the database")}
        out["broker and configurator running"] = [f"{name} is not running" for name, up in (
            ("broker", self.broker.alive()), ("configurator", self.configurator.alive())) if not up]
        present = out["every running device in the database and online"]
        applied = out["every agent applied its latest version"]
        holders: dict[str, list[str]] = {}
        for device_id, device in sorted(expected.items()):
            if not device.program.alive():
                present.append(f"{device_id}: its agent is not running (exit {device.program.proc and device.program.proc.returncode})")
            record = records.get(device_id)
            if record is None:
                present.append(f"{device_id} ({device.device_type}): not in the database")
                continue
            if not record.online:
                present.append(f"{device_id}: offline in the database")
            state = AgentState.model_validate(read_json(device.data / "state.json", {}))
            address = SimulatedExecutor(device.data).in_force().get("ipv4", {}).get("address", "")
            if address:
                holders.setdefault(address, []).append(f"{device_id} (agent)")
            if state.applied_version != record.version or address != record.address:
                applied.append(f"{device_id}: agent applied version {state.applied_version} and holds {address or '-'}, "
                               f"the database has version {record.version}, {record.address or '-'}")
        out["no device stuck unconfirmed"] = [
            f"{r.device_id}: {r.state.value} at version {r.version}{f' ({r.error})' if r.error else ''}"
            for r in records.values() if r.state != State.CONFIGURED]
        for r in records.values():
            if r.address:
                holders.setdefault(r.address, []).append(f"{r.device_id} (database)")
        out["no two devices share an address"] = [
            f"{address}: {', '.join(sorted(who))}" for address, who in sorted(holders.items())
            if len({w.split()[0] for w in who}) > 1]
        gone = out["forgotten devices are gone"]
        gone += [f"{d}: still in the database ({records[d].state.value})" for d in sorted(forgotten & set(records))]
        gone += [f"{d}: in the database, never started by the soak" for d in sorted(set(records) - set(self.devices))]
        if not any(out.values()):  # the database is right: now what the broker hands a newcomer
            self.check_retained(expected, forgotten, records, out)
        return out

    def check_retained(self, expected: dict[str, Device], forgotten: set[str], records: dict[str, DeviceRecord],
                       out: dict[str, list[str]]) -> None:
        retained = retained_messages(self.broker.port, self.login())
        wrong = out["retained state matches the database"]
        if retained is None:
            wrong.append("the broker did not answer a subscription")
            return
        if any(ATTACK_MARK in payload for payload in retained.values()):
            wrong.append("an attacker's will was retained")
        if body_of(retained.get(TOPICS.configurator_state)).get("state") != "online":
            wrong.append("configurator/state is not `online`")
        for device_id in sorted(expected):
            record = records[device_id]
            if retained.get(TOPICS.device(device_id, "config"), b"").decode() != record.config_payload:
                wrong.append(f"{device_id}: retained config is not the one in the database (version {record.version})")
            result = body_of(retained.get(TOPICS.device(device_id, "config/result")))
            if (result.get("version"), result.get("status")) != (record.version, "ok"):
                wrong.append(f"{device_id}: retained config/result is {result.get('version')}/{result.get('status')}, "
                             f"not {record.version}/ok")
            if retained.get(TOPICS.device(device_id, "status")) != b'{"state":"online"}':
                wrong.append(f"{device_id}: retained status is {retained.get(TOPICS.device(device_id, 'status'))!r}")
        for device_id in sorted(forgotten):
            left = [c for c in FORGOTTEN_CHANNELS if TOPICS.device(device_id, c) in retained]
            if left:
                out["forgotten devices are gone"].append(f"{device_id}: retained {', '.join(left)} left")
        self.leftover_status = sorted(d for d in forgotten if TOPICS.device(d, "status") in retained)

    def shutdown(self) -> None:
        """SIGTERM to everything (agents all at once), each exit code kept."""
        for device in self.devices.values():
            device.program.terminate()
        for device in self.devices.values():
            device.program.stop()
        self.configurator.stop()
        self.broker.stop()

    def emergency_stop(self) -> None:
        """On Ctrl-C, SIGTERM or a failure: nothing we started may outlive the soak."""
        if self.observer is not None:
            self.observer.close()
        self.shutdown()

    def clean_exits(self) -> list[str]:
        """Exit codes after SIGTERM other than 0, or -15 (terminated before its handler was set)."""
        programs = [(d.device_id, d.program.exit_codes) for d in self.devices.values()]
        programs += [("configurator", self.configurator.exit_codes), ("broker", self.broker.exit_codes())]
        return [f"{name}: exit {code} after SIGTERM" for name, codes in programs for code in codes
                if code not in (0, -signal.SIGTERM)]

    def logs(self) -> list[Path]:
        return [self.configurator.log, self.tmp / "commands.log", self.tmp / "soak.log", *self.broker.logs(),
                *sorted((self.tmp / "agents").glob("*.log"))]


# --- the report --------------------------------------------------------------------------------


def summary(soak: Soak, warmup: float, converged: float | None, invariants: dict[str, list[str]],
            library_tracebacks: Counter[str], timeline: int) -> str:
    args = soak.args
    states = Counter(d.state for d in soak.devices.values())
    done = Counter(a.kind for a in soak.actions if a.kind not in RECOVERIES)
    undone = Counter(a.kind for a in soak.actions if a.kind in RECOVERIES)
    broker_signals = Counter(a.detail.split(";")[0] for a in soak.actions if a.kind == "broker")
    lines = [f"warm-up: the first {args.devices} devices configured in {warmup:.1f} s",
             f"actions in {args.duration:.0f} s: {sum(done.values())} ("
             + ", ".join(f"{k} {n}" for k, n in sorted(done.items())) + "); undone later: "
             + ", ".join(f"{k} {n}" for k, n in sorted(undone.items())),
             "broker restarts by signal: " + (", ".join(f"{s} {n}" for s, n in sorted(broker_signals.items()))
                                              or "none"),
             f"devices: {len(soak.devices)} started in all, {states['forgotten']} forgotten, "
             f"{len(soak.devices) - states['forgotten']} running at the end"]
    if soak.observer is not None:
        other = soak.observer.other
        lines.append("events other than the routine ones (observer, while connected): " + (", ".join(
            f"{e} {n}" for e, n in other.most_common() if e not in ROUTINE_EVENTS) or "none"))
        lines += [f"  e.g. {e}: {s}" for e, s in sorted(soak.observer.samples.items()) if e not in ROUTINE_EVENTS]
    lines += [f"failed action: {f}" for f in soak.failures]
    shown = soak.actions[max(0, len(soak.actions) - timeline):]
    lines.append(f"last {len(shown)} of {len(soak.actions)} timeline entries (t: seconds since the soak started):")
    lines += [f"  {a.t:7.1f} s  {a.kind:<16} {a.target:<14} {a.detail}" for a in shown]
    lines.append(f"settle: every invariant held within {converged:.1f} s after the last fault was undone (at the end "
                 "of a check; checks run back to back and take 2-4 s)" if converged is not None
                 else f"settle: NOT converged within {args.settle:.0f} s")
    if soak.leftover_status:
        lines.append(f"note: {len(soak.leftover_status)} forgotten devices keep a retained `status` (their "
                     f"agent's offline message, sent after the forget): {', '.join(soak.leftover_status[:8])}")
    if library_tracebacks:
        lines.append("tracebacks entirely inside libraries (not counted as broken): " + "; ".join(
            f"{n} x {what}" for what, n in library_tracebacks.most_common()))
    lines.append("invariants:")
    for name, problems in invariants.items():
        lines.append(f"  {'OK    ' if not problems else 'BROKEN'}  {name}")
        lines += [f"          - {p}" for p in problems[:12]]
        if len(problems) > 12:
            lines.append(f"          ... and {len(problems) - 12} more")
    broken = sum(bool(p) for p in invariants.values())
    lines.append(f"result: {'OK' if not broken else f'BROKEN ({broken} invariants)'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", choices=["amqtt", "mosquitto"], default="amqtt")
    parser.add_argument("--duration", type=float, default=600, help="Seconds of faults (default 600).")
    parser.add_argument("--devices", type=int, default=24,
                        help="Devices at the start (default 24); joins and leaves keep between half and 1.5 times that.")
    parser.add_argument("--interval", type=float, default=4.0,
                        help="Mean seconds between actions (default 4: one every 1 to 8 s).")
    parser.add_argument("--settle", type=float, default=90.0,
                        help="Seconds the warm-up and the settle phase may take (default 90).")
    parser.add_argument("--seed", type=int, help="Replay the schedule of an earlier run.")
    parser.add_argument("--timeline", type=int, default=25, help="Timeline entries printed (the last N).")
    parser.add_argument("--keep", action="store_true", help="Keep the temp dir (database, every log).")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(2**32)
    if args.broker == "mosquitto" and Mosquitto.binary() is None:
        parser.error("mosquitto is not installed (Debian package 'mosquitto')")

    replay = (f"bench/soak.py --broker {args.broker} --duration {args.duration:g} --devices {args.devices} "
              f"--interval {args.interval:g} --settle {args.settle:g} --seed {args.seed}")
    print(f"homenet soak on {args.broker}: seed {args.seed}; {platform.node()}, {platform.system()} "
          f"{platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"replay: {replay}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"homenet-soak-{args.broker}-"))
    note = Line()
    # this process's own clients (observer, reader) log their reconnects to a file, not the summary
    logging.basicConfig(filename=tmp / "soak.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, terminated)
    soak = Soak(args, tmp, note)
    try:
        try:
            warmup = soak.start()
            note(f"warm-up done in {warmup:.1f} s; faults for {args.duration:.0f} s")
            soak.faults()
            note("settling")
            converged, invariants = soak.settle()
        except (RuntimeError, TimeoutError) as exc:
            print(f"soak could not run: {exc}")
            return 2
        load = os.getloadavg()
        note("stopping")
        soak.shutdown()
        invariants["no tracebacks through homenet code in the logs"], library_tracebacks = tracebacks(soak.logs())
        invariants["every SIGTERM stopped its process cleanly within 20 s"] = soak.clean_exits()
        print(summary(soak, warmup, converged, invariants, library_tracebacks, args.timeline))
        print(f"load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
        print(f"replay: {replay}")
        return 1 if any(invariants.values()) else 0
    finally:
        soak.emergency_stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
