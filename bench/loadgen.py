"""Load generator: thousands of simulated agents per process, speaking the real wire contract.

The half of `homenet bench storm` (bench/storm.py) that plays the devices.

One agent here is what `homenet-agent run --collector simulated` is on the wire, without its
cost: the same client id, session (clean_session false, keepalive 30, retained `offline` will),
subscriptions, retained `online` status, and the same messages in the same order, each in a real
envelope signed with the agent's own Ed25519 key (`homenet.keys.KeyPair`, `schemas.encode(...,
sign=key.sign)`): `register` when the retained `configurator/state` says online (again on every
new epoch or connection), a login with the broker account a `register.reply` hands out (then
register again, as the agent does), `config.result` (retained) for every new `config` version,
and `info` (retained) with the new address once registered and configured. After an IPv4 item
it opens and closes one TCP connection to the broker, as the agent's safe-apply check does.

What it leaves out, to stay cheap: it verifies no signature (the real agent checks the
configurator's on every message), validates nothing with pydantic on the way in (json.loads
only), writes no state file, and runs no thread per agent: one asyncio loop per process drives
a minimal MQTT 3.1.1 client (CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK, PINGREQ, DISCONNECT)
for all of its agents. `register` payloads are signed before the storm starts (their `time` is
then a little old: device clocks may be wrong anyway, and `seq` is what protects);
`config.result` and `info` are built and signed when they are sent, since they carry what
arrived.

Times are `time.monotonic()`, which is one clock for every process on Linux, so the
coordinator can subtract them from what its own observer saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from homenet import __version__
from homenet.keys import KeyPair, b64
from homenet.schemas import Topics, encode
from homenet.schemas.messages import ConfigResult, DeviceInfo, Interface, ItemResult, ItemStatus, ResultStatus

KEEPALIVE = 30
RECONNECT_MIN, RECONNECT_MAX = 1.0, 30.0
"""paho's backoff as the agent sets it (`homenet.mqtt.make_client`)."""
SIMULATED_KINDS = ("ipv4", "qos")
"""What the simulated executor applies; anything else it reports unsupported."""


def device_id(index: int) -> str:
    return f"storm-{index:05d}"


def _mac(device: str) -> str:
    import hashlib

    digest = hashlib.sha256(device.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))  # as SimulatedCollector does


# --- MQTT 3.1.1, the few packets an agent needs ------------------------------------------------


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    length, out = len(body), bytearray([first])
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + body


def connect_packet(client_id: str, will: tuple[str, bytes], username: str | None, password: str | None) -> bytes:
    flags = 0x20 | 0x08 | 0x04  # will retain, will QoS 1, will flag; clean session off
    payload = _str(client_id) + _str(will[0]) + _str(will[1])
    if username:
        flags |= 0x80 | (0x40 if password is not None else 0)
        payload += _str(username) + (_str(password) if password is not None else b"")
    return _packet(0x10, _str("MQTT") + bytes([4, flags]) + struct.pack("!H", KEEPALIVE) + payload)


def publish_packet(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int) -> bytes:
    head = _str(topic) + (struct.pack("!H", packet_id) if qos else b"")
    return _packet(0x30 | (qos << 1) | int(retain), head + payload)


def subscribe_packet(packet_id: int, filters: list[str], qos: int = 1) -> bytes:
    return _packet(0x82, struct.pack("!H", packet_id) + b"".join(_str(f) + bytes([qos]) for f in filters))


PINGREQ, DISCONNECT = b"\xc0\x00", b"\xe0\x00"


class MqttConnection(asyncio.Protocol):
    """One TCP connection of one agent: frames packets, answers QoS 1, hands PUBLISHes up."""

    def __init__(self, agent: "SimAgent") -> None:
        self.agent = agent
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.next_id = 0
        self.last_sent = self.last_in = time.monotonic()
        self.ping_sent = 0.0
        self.acked = False
        self.closed = False

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
            self.last_sent = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.agent.current = self
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as homenet.mqtt.set_nodelay
        self.send(self.agent.connect_bytes())

    def data_received(self, data: bytes) -> None:
        self.last_in = time.monotonic()
        buf = self.buf
        buf += data
        while len(buf) >= 2:
            length, multiplier, pos = 0, 1, 1
            while True:
                if pos >= len(buf):
                    return
                byte = buf[pos]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                pos += 1
                if not byte & 0x80:
                    break
            if len(buf) < pos + length:
                return
            first, body = buf[0], bytes(buf[pos:pos + length])
            del buf[:pos + length]
            self._dispatch(first, body)

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:  # PUBLISH
            qos = (first >> 1) & 3
            tlen = struct.unpack_from("!H", body)[0]
            topic = body[2:2 + tlen].decode()
            pos = 2 + tlen
            if qos:
                pid = body[pos:pos + 2]
                pos += 2
                self.send((b"\x40\x02" if qos == 1 else b"\x50\x02") + pid)
            self.agent.on_publish(self, topic, body[pos:])
        elif kind == 2:  # CONNACK
            self.agent.on_connack(self, body[1])
        elif kind == 6:  # PUBREL (QoS 2 is never asked for, but answer it)
            self.send(b"\x70\x02" + body[:2])
        elif kind == 13:  # PINGRESP
            self.ping_sent = 0.0
        # PUBACK, SUBACK: nothing to do

    def keepalive(self, now: float) -> None:
        """paho's rule (`Client._check_keepalive`): PINGREQ after KEEPALIVE s without a packet
        out or in; no answer within another KEEPALIVE s: drop the connection and reconnect."""
        if not self.acked:  # no CONNACK: paho gives up on the connection after the keepalive too
            if now - max(self.last_sent, self.last_in) >= KEEPALIVE:
                self.agent.on_lost(self, TimeoutError("no CONNACK within the keepalive"))
                self.close()
        elif self.ping_sent and now - self.ping_sent >= KEEPALIVE:
            self.agent.on_lost(self, TimeoutError("no PINGRESP within the keepalive"))
            self.close()
        elif not self.ping_sent and (now - self.last_sent >= KEEPALIVE or now - self.last_in >= KEEPALIVE):
            self.send(PINGREQ)
            self.ping_sent = now

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.send(DISCONNECT)
            self.closed = True
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        if not was_closed:
            self.agent.on_lost(self, exc)


# --- one simulated agent ----------------------------------------------------------------------


@dataclass
class Timings:
    connect: float = 0.0       # first CONNECT written (first attempt's TCP connect started)
    connack: float = 0.0       # first CONNACK accepted
    register: float = 0.0      # first register sent
    result: float = 0.0        # config.result sent
    connections: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)


class SimAgent:
    def __init__(self, gen: "Generator", device: str, key: KeyPair, device_type: str, model: str) -> None:
        self.gen = gen
        self.device = device
        self.key = key
        self.device_type = device_type
        self.model = model
        self.mac = _mac(device)
        self.topic = {c: gen.topics.device(device, c) for c in
                      ("status", "register", "register/reply", "config", "config/result", "info", "rpc")}
        self.seq = 0
        self.username: str | None = None
        self.password: str | None = None
        self.conn: MqttConnection | None = None
        """The connection with a CONNACK."""
        self.current: MqttConnection | None = None
        """The newest TCP connection, acknowledged or not."""
        self.registered_epoch: int | None = None
        self.register_id = ""
        self.registered = False
        self.applied = 0
        self.address: tuple[str, int] | None = None
        self.last_result: bytes | None = None
        self.last_info: DeviceInfo | None = None
        self.presigned: tuple[str, bytes] | None = None
        self.delay = RECONNECT_MIN
        self.t = Timings()
        self.stopping = False

    def info(self) -> DeviceInfo:
        addresses = [f"{self.address[0]}/{self.address[1]}"] if self.address else []
        return DeviceInfo(device_id=self.device, device_type=self.device_type, model=self.model,
                          hostname=self.device, agent_version=__version__, capabilities=["executor:simulated"],
                          interfaces=[Interface(name="sim0", mac=self.mac, up=True, addresses=addresses)],
                          applied_version=self.applied, public_key=b64(self.key.public),
                          needs_credentials=self.username is None)

    def _encode(self, kind: str, body: Any) -> tuple[str, bytes]:
        self.seq += 1
        return encode(kind, body, sender=self.device, seq=self.seq, sign=self.key.sign)

    def presign(self) -> None:
        """The first register, signed before the storm (what the agent would send at once)."""
        self.last_info = self.info()
        self.presigned = self._encode("register", self.last_info)

    def connect_bytes(self) -> bytes:
        return connect_packet(self.device, (self.topic["status"], b'{"state":"offline"}'),
                              self.username, self.password)

    def start(self) -> None:
        if not self.t.connect:
            self.t.connect = time.monotonic()
        self.t.connections += 1
        self.gen.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await self.gen.loop.create_connection(lambda: MqttConnection(self), self.gen.host, self.gen.port)
        except OSError as exc:
            self.t.refused += 1
            self._retry(f"connect: {exc}")

    def _retry(self, why: str) -> None:
        if self.stopping:
            return
        if len(self.t.errors) < 5:
            self.t.errors.append(f"{time.monotonic() - self.gen.t0:.2f}s {why}")
        self.gen.loop.call_later(self.delay, self.start)
        self.delay = min(self.delay * 2, RECONNECT_MAX)

    def on_lost(self, conn: MqttConnection, exc: Exception | None) -> None:
        if conn is self.current:
            self.conn = self.current = None
            self._retry(f"connection lost: {exc or 'closed by the broker'}")

    def on_connack(self, conn: MqttConnection, code: int) -> None:
        if code != 0:
            conn.close()
            if self.username and code in (4, 5):  # bad credentials, not authorised: enrol again
                self.username = self.password = None
            self._retry(f"CONNACK refused, code {code}")
            return
        conn.acked = True
        self.conn, self.delay = conn, RECONNECT_MIN
        if not self.t.connack:
            self.t.connack = time.monotonic()
        self.registered_epoch, self.registered = None, False
        t = self.topic
        conn.send(subscribe_packet(conn.packet_id(), [self.gen.topics.configurator_state, t["register/reply"],
                                                      t["config"], t["rpc"]]))
        conn.send(publish_packet(t["status"], b'{"state":"online"}', 1, True, conn.packet_id()))
        if self.last_result is not None:  # the broker may have lost retained messages
            self._publish(conn, "config/result", self.last_result, retain=True)

    def _publish(self, conn: MqttConnection, channel: str, payload: bytes, retain: bool = False) -> None:
        conn.send(publish_packet(self.topic[channel], payload, 1, retain, conn.packet_id()))

    def on_publish(self, conn: MqttConnection, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            if topic == self.gen.topics.configurator_state:
                self._on_state(conn, json.loads(payload)["body"])
            elif topic == self.topic["register/reply"]:
                self._on_reply(conn, json.loads(payload)["body"])
            elif topic == self.topic["config"]:
                self._on_config(conn, json.loads(payload))
        except (ValueError, KeyError, TypeError) as exc:
            if len(self.t.errors) < 5:
                self.t.errors.append(f"bad message on {topic}: {exc!r}")

    def _on_state(self, conn: MqttConnection, body: dict[str, Any]) -> None:
        if body.get("state") != "online" or body.get("epoch") == self.registered_epoch:
            return
        self.registered_epoch = body.get("epoch")
        if self.presigned is not None:
            (self.register_id, payload), self.presigned = self.presigned, None
        else:
            self.last_info = self.info()
            self.register_id, payload = self._encode("register", self.last_info)
        if not self.t.register:
            self.t.register = time.monotonic()
        self._publish(conn, "register", payload)

    def _on_reply(self, conn: MqttConnection, body: dict[str, Any]) -> None:
        if body.get("re") != self.register_id or body.get("status") != "accepted":
            if body.get("status") not in (None, "accepted") and len(self.t.errors) < 5:
                self.t.errors.append(f"register {body.get('status')}: {body.get('reason')}")
            return
        credentials = body.get("credentials")
        if credentials:  # log in with the new account, as Agent._relogin does
            self.username, self.password = credentials["username"], credentials["password"]
            self.conn = self.current = None
            conn.close()
            self.t.connections += 1
            self.gen.loop.create_task(self._connect())
            return
        self.registered = True
        self._send_info(conn)

    def _on_config(self, conn: MqttConnection, envelope: dict[str, Any]) -> None:
        config = envelope["body"]
        if config["device_id"] != self.device or config["version"] <= self.applied:
            return
        mine = [item for item in config["items"] if item["target"] == "agent"]
        results, in_force = [], {}
        for item in mine:
            kind = item["kind"]
            key = f"port_mapping:{item['protocol']}/{item['external_port']}" if kind == "port_mapping" else kind
            if kind in SIMULATED_KINDS:
                in_force[key] = {k: v for k, v in item.items() if k not in ("kind", "target")}
                results.append(ItemResult(item=key, status=ItemStatus.APPLIED))
            else:
                results.append(ItemResult(item=key, status=ItemStatus.UNSUPPORTED,
                                          detail=f"the simulated executor does not apply {kind}"))
            if kind == "ipv4":
                self.address = (item["address"], item["prefix_len"])
                self.gen.loop.create_task(self.gen.reach_check())
        fine = sum(r.status == ItemStatus.APPLIED for r in results)
        status = (ResultStatus.OK if fine == len(results) else ResultStatus.FAILED if fine == 0
                  else ResultStatus.PARTIAL)
        result = ConfigResult(re=envelope["id"], version=config["version"], status=status, items=results,
                              in_force=in_force)
        self.applied = config["version"]
        _, self.last_result = self._encode("config.result", result)
        self._publish(conn, "config/result", self.last_result, retain=True)
        if not self.t.result:
            self.t.result = time.monotonic()
        self._send_info(conn)

    def _send_info(self, conn: MqttConnection) -> None:
        if not self.registered:
            return
        info = self.info()
        if info == self.last_info:
            return
        self.last_info = info
        self._publish(conn, "info", self._encode("info", info)[1], retain=True)

    def stop(self) -> None:
        self.stopping = True
        if self.current is not None:
            self.current.close()


# --- one process of agents ----------------------------------------------------------------------


class Generator:
    def __init__(self, host: str, port: int, devices: list[str], root: str | None, device_type: str,
                 model: str) -> None:
        self.host, self.port = host, port
        self.topics = Topics(root) if root else Topics()
        self.agents = [SimAgent(self, d, KeyPair.generate(), device_type, model) for d in devices]
        for agent in self.agents:
            agent.presign()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.t0 = 0.0
        self.checks = 0

    async def reach_check(self) -> None:
        """The agent's safe-apply check: one TCP connection to the broker, opened and closed."""
        self.checks += 1
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
            writer.close()
        except OSError:
            pass

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(1)
            now = time.monotonic()
            for agent in self.agents:
                if agent.current is not None:
                    agent.current.keepalive(now)

    async def run(self, control: Connection) -> dict[str, Any]:
        """Start every agent at once on "go"; stop them on "stop"; return timings and CPU."""
        self.loop = asyncio.get_running_loop()
        commands: asyncio.Queue[str] = asyncio.Queue()
        # read in the callback itself: the reader is level-triggered and may run once more
        self.loop.add_reader(control.fileno(), lambda: control.poll() and commands.put_nowait(control.recv()))
        await commands.get()  # "go"
        cpu0, self.t0 = _cpu(), time.monotonic()
        for agent in self.agents:
            agent.start()
        keepalive = self.loop.create_task(self._keepalive())
        await commands.get()  # "stop"
        cpu1 = _cpu()
        keepalive.cancel()
        for agent in self.agents:
            agent.stop()
        await asyncio.sleep(0.2)
        return {"pid": os.getpid(), "cpu_s": cpu1 - cpu0, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "t0": self.t0, "checks": self.checks,
                "agents": {a.device: (a.t.connect, a.t.connack, a.t.register, a.t.result, a.t.connections,
                                      a.t.refused, a.t.errors) for a in self.agents}}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(control: Connection, host: str, port: int, devices: list[str], root: str | None,
           device_type: str, model: str) -> None:
    """Entry point of one generator process (multiprocessing, spawn): "ready", "go", "stop"."""
    try:
        gen = Generator(host, port, devices, root, device_type, model)
        control.send(("ready", os.getpid()))
        control.send(("done", asyncio.run(gen.run(control))))
    except BaseException as exc:  # the coordinator must hear about it, not wait for a timeout
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
