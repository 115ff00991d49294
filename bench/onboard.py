"""`homenet bench onboard`: how long a new device waits for its configuration, against a floor.

What one sample is (both paths, onboardings strictly one after another):
  start  the device-side client's CONNACK: `time.perf_counter()` at the top of its paho
         `on_connect` (for the real agent, a wrapper around `Agent._on_connect`).
  end    a separate observer client receives the `config.applied` event naming that device on
         `events`. The configurator publishes that event only after the device's `configured`
         state is committed to its database, so `end` is "the gateway has recorded the
         confirmation", seen from the wire.

Paths, each run on a fresh broker of its own (neither inherits the other's retained messages
or sessions; Mosquitto's CPU then belongs to one path):
  homenet  the real configurator (started once, its database in a temp dir) and, per sample, a
           fresh real agent (simulated collector and executor, its own state dir), stopped once
           the configurator has marked it offline, so the next sample starts on a quiet system.
  floor    the same wire exchange with canned payloads of the same kinds and sizes and no
           processing: the device side subscribes like the agent, registers on the retained
           `configurator/state`, answers `config` with `config.result`; a responder answers
           `register` with `register.reply` and `config` (the configurator's order) and
           `config.result` with the `config.applied` event. What homenet adds on top of the floor is its own work:
           validation, planning, durable writes.
  fsync    the floor with one durable write (append + fsync) per side: the device before its
           `config.result`, the responder before `config.applied`. The least a confirmation
           that survives a power cut at either end costs; the plain floor writes nothing.

A few warm-up onboardings per path are not counted (first use of lazily built pydantic
validators, paho and broker code paths). Every paho client here sets TCP_NODELAY on connect.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, Protocol

import click
import paho.mqtt.client as paho

from homenet import __version__, logs
from homenet.agent.app import build as build_agent
from homenet.brokers import BrokerHandle, Embedded, Mosquitto
from homenet.mqtt import BrokerUrl, make_client, set_nodelay
from homenet.schemas import Topics, encode
from homenet.schemas.messages import (Config, ConfigResult, ConfiguratorState, DeviceInfo, Event, Interface,
                                      ItemResult, ItemStatus, RegisterReply, RegisterStatus, ResultStatus,
                                      Target, item_key)
from homenet.settings import AgentSettings, ConfiguratorSettings, LanSettings

from homenet.configurator.app import build as build_configurator, lan_plan
from homenet.configurator.policy import NetworkView, evaluate

WARMUP = 5
TIMEOUT = 15.0
"""Seconds one onboarding may take before the benchmark gives up and says where it stopped."""
DEVICE_TYPE = "iptv-stb"  # the first acceptance scenario: address, video QoS, IGMP proxy
MODEL = "Bench STB"
# Room for the 50k static addresses below the DHCP pool: the planner never runs out.
LAN = LanSettings(subnet="10.0.0.0/16", gateway="10.0.0.1", pool_start="10.0.200.0",
                  pool_end="10.0.255.254")
_ID_TEMPLATE = "bench-00000"
BROKERS: dict[str, Callable[[], BrokerHandle]] = {"amqtt": Embedded, "mosquitto": Mosquitto}


def device_id(index: int) -> str:
    """Same length as `_ID_TEMPLATE`, so a canned payload keeps its size when the id is swapped in."""
    return f"bench-{index:05d}"


class Device(Protocol):
    connack: float | None

    def start(self) -> None: ...
    def stop(self) -> None: ...


DeviceFactory = Callable[[str], Device]
"""Makes a fresh, not yet started device from its id."""

# --- clients shared by both paths --------------------------------------------------------


def _connect_subscribed(client: paho.Client, url: str, subscriptions: list[tuple[str, int]],
                        timeout: float = 10.0) -> None:
    """Connect, subscribe on every connect (paho does not restore subscriptions), wait for the SUBACK."""
    ready = threading.Event()

    def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            set_nodelay(c)
            c.subscribe(subscriptions)

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: ready.set()
    broker = BrokerUrl.parse(url)
    client.connect_async(broker.host, broker.port, keepalive=30)
    client.loop_start()
    if not ready.wait(timeout):
        client.loop_stop()
        raise TimeoutError(f"no SUBACK from {url} after {timeout}s")


def _disconnect(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()


class Observer:
    """Notes when each awaited event arrives on `events`, on a connection of its own."""

    WATCHED = ("config.applied", "device.offline")

    def __init__(self, url: str, topics: Topics) -> None:
        self._seen: dict[tuple[str, str | None], float] = {}
        self._cond = threading.Condition()
        self.client = make_client("bench-observer", clean_session=True)
        self.client.on_message = self._on_message
        _connect_subscribed(self.client, url, [(topics.events, 1)])

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        arrived = time.perf_counter()  # before parsing: the observer's own cost is not timed
        body = json.loads(msg.payload)["body"]
        if body["event"] in self.WATCHED:
            with self._cond:
                self._seen[(body["event"], body.get("device_id"))] = arrived
                self._cond.notify_all()

    def wait(self, event: str, device: str) -> float:
        """perf_counter() at the arrival of `event` for `device`."""
        key = (event, device)
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._seen, TIMEOUT):
                raise TimeoutError(f"no {event} event for {device} within {TIMEOUT}s")
            return self._seen.pop(key)

    def close(self) -> None:
        _disconnect(self.client)


# --- homenet: the real configurator and agents --------------------------------------------


class TimedAgent:
    """A real agent whose CONNACK time is noted before the agent's own on_connect runs."""

    def __init__(self, url: str, device: str, data_dir: Path) -> None:
        self.connack: float | None = None
        self.agent = build_agent(AgentSettings(broker=url, device_id=device, device_type=DEVICE_TYPE,
                                               model=MODEL, collector="simulated", data_dir=data_dir))
        inner = self.agent.client.on_connect

        def on_connect(*args: Any) -> None:
            if self.connack is None:
                self.connack = time.perf_counter()
            inner(*args)

        self.agent.client.on_connect = on_connect

    def start(self) -> None:
        self.agent.start()

    def stop(self) -> None:
        self.agent.stop()


@contextmanager
def homenet_devices(url: str, tmp: Path) -> Iterator[DeviceFactory]:
    """Run the configurator; yield a factory of fresh agents."""
    configurator = build_configurator(ConfiguratorSettings(broker=url, data_dir=tmp / "gateway", lan=LAN))
    configurator.start()
    try:
        if not configurator.connected.wait(TIMEOUT):
            raise TimeoutError(f"configurator not connected to {url} after {TIMEOUT}s")
        yield lambda device: TimedAgent(url, device, tmp / "agents" / device)
    finally:
        configurator.stop()


# --- floor: the same exchange, canned ------------------------------------------------------


def canned_payloads() -> dict[str, bytes]:
    """One payload per kind, made by the real encoder from what the real code would send."""
    dev = _ID_TEMPLATE
    info = DeviceInfo(device_id=dev, device_type=DEVICE_TYPE, model=MODEL, hostname=dev,
                      agent_version=__version__, capabilities=["executor:simulated"],
                      interfaces=[Interface(name="sim0", mac="02:5a:3b:1c:9d:7e")])
    plan = evaluate(info, NetworkView(lan_plan(LAN)))
    config = Config(device_id=dev, version=1, epoch=1, profile=plan.profile.name, items=plan.items)
    mine = [item for item in plan.items if item.target == Target.AGENT]
    register_id, register = encode("register", info, sender=dev, seq=1)
    config_id, config_payload = encode("config", config, sender="configurator", seq=3)
    result = ConfigResult(re=config_id, version=1, status=ResultStatus.OK,
                          items=[ItemResult(item=item_key(i), status=ItemStatus.APPLIED) for i in mine],
                          in_force={item_key(i): i.model_dump(mode="json", exclude={"kind", "target"})
                                    for i in mine})
    reply = RegisterReply(re=register_id, status=RegisterStatus.ACCEPTED, config_version=1)
    state = ConfiguratorState(state="online", configurator_id="configurator", epoch=1)
    return {
        "register": register,
        "register.reply": encode("register.reply", reply, sender="configurator", seq=2)[1],
        "config": config_payload,
        "config.result": encode("config.result", result, sender=dev, seq=2)[1],
        "event": encode("event", Event(event="config.applied", device_id=dev, detail={"version": 1}),
                        sender="configurator", seq=4)[1],
        "configurator.state": encode("configurator.state", state, sender="configurator", seq=0)[1],
    }


def _for(payload: bytes, device: str) -> bytes:
    return payload.replace(_ID_TEMPLATE.encode(), device.encode())


def _synced(log: Path | None, record: bytes) -> None:
    """The fsync floor's one durable write per side: `record` appended to `log` and fsynced."""
    if log is not None:
        with open(log, "ab") as out:
            out.write(record)
            out.flush()
            os.fsync(out.fileno())


class Responder:
    """The configurator's side of the floor: answers at once with canned payloads, keeps
    nothing; with `log`, one fsync before it confirms a device (the configurator commits the
    device's `configured` state before its `config.applied` event)."""

    def __init__(self, url: str, topics: Topics, canned: dict[str, bytes], log: Path | None = None) -> None:
        self.topics = topics
        self.canned = canned
        self.log = log
        self.client = make_client("bench-responder", clean_session=True)
        self.client.on_message = self._on_message
        _connect_subscribed(self.client, url, [(topics.device_filter("register"), 1),
                                               (topics.device_filter("config/result"), 1)])
        self.client.publish(topics.configurator_state, canned["configurator.state"], qos=1,
                            retain=True).wait_for_publish(timeout=TIMEOUT)

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        topic = self.topics.parse_device(msg.topic)
        device = topic.device_id
        if topic.channel == "register":
            client.publish(self.topics.device(device, "register/reply"),
                           _for(self.canned["register.reply"], device), qos=1)
            client.publish(self.topics.device(device, "config"), _for(self.canned["config"], device),
                           qos=1, retain=True)
        else:
            _synced(self.log, msg.payload)
            client.publish(self.topics.events, _for(self.canned["event"], device), qos=1)

    def close(self) -> None:
        _disconnect(self.client)


class FloorDevice:
    """The agent's side of the floor: the agent's session, subscriptions and publishes, canned;
    with `log`, one fsync before its `config.result` (the agent saves the result first)."""

    def __init__(self, url: str, topics: Topics, device: str, canned: dict[str, bytes],
                 log: Path | None = None) -> None:
        self.connack: float | None = None
        self.log = log
        self.broker = BrokerUrl.parse(url)
        self.topics = topics
        self.device = device
        self.canned = canned
        self.client = make_client(device, clean_session=False,
                                  will=(self._topic("status"), b'{"state":"offline"}'))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _topic(self, channel: str) -> str:
        return self.topics.device(self.device, channel)

    def start(self) -> None:
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        if self.client.is_connected():
            self.client.publish(self._topic("status"), b'{"state":"offline"}', qos=1,
                                retain=True).wait_for_publish(timeout=5)
        _disconnect(self.client)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if self.connack is None:
            self.connack = time.perf_counter()
        if reason.is_failure:
            return
        set_nodelay(client)
        client.subscribe([(self.topics.configurator_state, 1), (self._topic("register/reply"), 1),
                          (self._topic("config"), 1), (self._topic("rpc"), 1)])
        client.publish(self._topic("status"), b'{"state":"online"}', qos=1, retain=True)

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.topics.configurator_state:
            client.publish(self._topic("register"), _for(self.canned["register"], self.device), qos=1)
        elif msg.topic == self._topic("config"):
            _synced(self.log, msg.payload)
            client.publish(self._topic("config/result"), _for(self.canned["config.result"], self.device),
                           qos=1, retain=True)


@contextmanager
def floor_devices(url: str, tmp: Path, fsync: bool = False) -> Iterator[DeviceFactory]:
    """Run the responder; yield a factory of fresh floor devices (`fsync`: one durable write
    per side and onboarding, in files of `tmp`)."""
    topics = Topics()
    canned = canned_payloads()
    responder = Responder(url, topics, canned, tmp / "responder.log" if fsync else None)
    try:
        yield lambda device: FloorDevice(url, topics, device, canned, tmp / f"{device}.log" if fsync else None)
    finally:
        responder.close()


def fsync_floor_devices(url: str, tmp: Path) -> AbstractContextManager[DeviceFactory]:
    return floor_devices(url, tmp, fsync=True)


PATHS: dict[str, Callable[[str, Path], AbstractContextManager[DeviceFactory]]] = {
    "floor": floor_devices, "fsync": fsync_floor_devices, "homenet": homenet_devices}
FLOORS = ("floor", "fsync")


# --- measuring -----------------------------------------------------------------------------


@dataclass
class Run:
    broker: str
    path: str
    samples_ms: list[float]
    cpu_s: float
    """User + system CPU of this process (for amqtt: the broker thread included)."""
    child_cpu_s: float | None
    """User + system CPU of the Mosquitto process; None for the in-process broker."""
    wall_s: float

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.samples_ms, n=100, method="inclusive")[98]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms)

    def p50_of_tenth(self, which: int) -> float:
        """Median of the first (0) or last (-1) tenth: shows how cost grows with the home's size."""
        tenth = max(1, len(self.samples_ms) // 10)
        return statistics.median(self.samples_ms[:tenth] if which == 0 else self.samples_ms[-tenth:])


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def onboard(new_device: DeviceFactory, observer: Observer, count: int, settle: bool) -> list[float]:
    """`count` sequential onboardings after the warm-up; milliseconds from CONNACK to `config.applied`."""
    samples = []
    for index in range(WARMUP + count):
        device_name = device_id(index)
        device = new_device(device_name)
        try:
            device.start()
            applied = observer.wait("config.applied", device_name)
        finally:
            device.stop()
        if settle:  # the configurator has handled the agent's last message: the system is quiet
            observer.wait("device.offline", device_name)
        if device.connack is None:
            raise RuntimeError(f"{device_name} confirmed without a CONNACK noted")
        if index >= WARMUP:
            samples.append((applied - device.connack) * 1000)
    return samples


def measure(broker_name: str, path: str, count: int) -> Run:
    """One path on a broker started for it alone; everything started here is stopped here."""
    cpu, child_cpu, wall = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.monotonic()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"homenet-bench-{path}-")))
        broker = BROKERS[broker_name]()
        stack.callback(broker.stop)  # also removes Mosquitto's temp dir if start fails
        broker.start()
        observer = Observer(broker.url, Topics())
        stack.callback(observer.close)
        new_device = stack.enter_context(PATHS[path](broker.url, tmp))
        samples = onboard(new_device, observer, count, settle=path == "homenet")
    # Mosquitto has been waited for by now, so its CPU is in RUSAGE_CHILDREN.
    return Run(broker_name, path, samples, _cpu(resource.RUSAGE_SELF) - cpu,
               _cpu(resource.RUSAGE_CHILDREN) - child_cpu if broker_name == "mosquitto" else None,
               time.monotonic() - wall)


def table(runs: list[Run]) -> str:
    """One line per path; homenet's p50 against each floor of its broker (the plain floor writes
    nothing; the fsync floor makes one durable write per side, the least a confirmation that
    survives a power cut on both ends costs)."""
    floors = {(r.broker, r.path): r for r in runs if r.path in FLOORS}
    lines = [f"{'broker':<10} {'path':<8} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} "
             f"{'p50/floor':>9} {'p50/fsync':>9} {'p50 1st10%':>10} {'p50 last10%':>11} {'cpu s':>6} "
             f"{'broker cpu s':>12} {'wall s':>6}"]
    for r in runs:
        ratios = [f"{r.p50 / base.p50:.1f}x" if r.path == "homenet" and (base := floors.get((r.broker, f))) else "-"
                  for f in FLOORS]
        child = f"{r.child_cpu_s:.2f}" if r.child_cpu_s is not None else "(in cpu s)"
        lines.append(f"{r.broker:<10} {r.path:<8} {len(r.samples_ms):>4} {r.p50:>8.2f} {r.p99:>8.2f} "
                     f"{r.mean:>8.2f} {ratios[0]:>9} {ratios[1]:>9} {r.p50_of_tenth(0):>10.2f} {r.p50_of_tenth(-1):>11.2f} "
                     f"{r.cpu_s:>6.2f} {child:>12} {r.wall_s:>6.1f}")
    return "\n".join(lines)


def _terminated(signum: int, _frame: Any) -> NoReturn:
    raise SystemExit(128 + signum)


def run_onboard(count: int, brokers: list[str]) -> None:
    """Measure both paths on each broker and print the table."""
    if count < 2:
        raise click.BadParameter("at least 2 onboardings are needed for a p99", param_hint="--count")
    if "mosquitto" in brokers and Mosquitto.binary() is None:
        raise click.ClickException("mosquitto is not installed (Debian package 'mosquitto')")
    logs.setup()
    logging.getLogger("homenet").setLevel(logging.WARNING)  # INFO lines per message would be timed too
    click.echo(f"homenet {__version__} bench onboard: {count} sequential onboardings per path "
               f"(+{WARMUP} warm-up), device type {DEVICE_TYPE}; "
               f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
               f"Python {platform.python_version()}")
    click.echo("sample: agent CONNACK -> observer receives config.applied for that device\n")
    runs = []
    # A plain `kill` then unwinds like Ctrl-C: brokers, clients and temp dirs are cleaned up.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for name in brokers:
            for path in PATHS:
                runs.append(measure(name, path, count))
                click.echo(f"  {name} {path}: done in {runs[-1].wall_s:.1f}s", err=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(table(runs))
