"""The broker's trust boundary (issue 11): what a client on the home LAN can do with nothing
but an MQTT connection, before and without an account.

Each attack is made with raw clients (mosquitto_pub, hand-built packets) against a gateway
with two enrolled agents and a watcher logged in as the local operator. For each: the attack
is refused, the victim still receives what the configurator sends it, no retained message
changed, the configurator still answers a newcomer, and an `auth.*` or `broker.*` event names
the source and the reason. `secure` runs a test on the embedded broker and on Mosquitto with
dynamic security; `secure_amqtt` is for what only our broker does.
"""

from __future__ import annotations

import importlib.metadata
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from homenet.accounts import Accounts
from homenet.agent.service import Agent
from homenet.brokers import Embedded, Mosquitto, wait_listening
from homenet.configurator.operator import operator_key, send_command
from homenet.keys import KeyPair
from homenet.mqtt import make_client
from homenet.netutil import free_port
from homenet.schemas import encode
from homenet.schemas.messages import Command, DeviceInfo, Interface, Rpc
from homenet.schemas.signing import b64

from . import rawmqtt
from .conftest import require_program
from .harness import Gateway, retained, wait_until
from .processes import Process
from .test_embedded_broker import Client
from .test_security import enrolled, secure, secure_amqtt  # noqa: F401 (fixtures)

class Home:
    """Two enrolled agents, the retained messages as they stand, and the checks after an attack."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.victims: list[Agent] = [enrolled(gateway, "nas", "r-a1")[0], enrolled(gateway, "camera", "r-a2")[0]]
        time.sleep(0.5)  # let the gateway state settle before the snapshot
        self.before = self.retained()

    def retained(self) -> dict[str, bytes]:
        return retained(self.gw.broker.url, 1, login=self.gw.admin)

    def receives(self, agent: Agent) -> None:
        """A signed rpc from the configurator reaches the agent (its session is intact). Asked
        again each second: an agent whose connection was taken over may be between its new
        CONNACK and its SUBSCRIBE, when a live rpc has no subscription to reach it by."""
        assert self.gw.configurator is not None
        reply = self.gw.topics.device(agent.device_id, "rpc/reply")
        asked: list[bytes] = []

        def answered() -> bool:
            if any(t == reply and any(m in p for m in asked) for t, p, _ in self.gw.watcher.messages):
                return True
            asked.append(self.gw.configurator.publisher.publish(self.gw.topics.device(agent.device_id, "rpc"), "rpc",
                                                       Rpc(method="ping")).encode())
            time.sleep(1)
            return False
        wait_until(answered, timeout=10, what=f"{agent.device_id} answering the configurator")

    def unharmed(self, newcomer: str | None = None, taken_over: bool = False,
                 own_wills: frozenset[str] = frozenset()) -> None:
        """`taken_over`: the test logged in with a victim's own account and id, which ends the
        victim's connection (MQTT's take-over); it must be back by itself. `own_wills`: topics
        where an admitted client's will may rightly have landed (its own status)."""
        for agent in self.victims:
            if taken_over:
                wait_until(agent.client.is_connected, timeout=10, what=f"{agent.device_id} back")
            assert agent.client.is_connected(), f"{agent.device_id} was disconnected"
            self.receives(agent)
            assert self.gw.record(agent.device_id) is not None, f"{agent.device_id} forgotten"
        after = self.retained()
        assert after.keys() >= self.before.keys()
        # an agent that logs in again re-sends its result in a fresh envelope (docs/amqtt-notes.md)
        changed = sorted(t for t in self.before if after[t] != self.before[t] and not t.endswith("config/result"))
        assert not changed, f"retained messages changed: {changed}"
        assert not any(b"PWNED" in p for t, p in after.items() if t not in own_wills)
        if newcomer:  # the configurator still answers a registration
            enrolled(self.gw, "printer", newcomer)

    def event(self, name: str, reason: str) -> dict[str, Any]:
        event = self.gw.watcher.wait_event(name, reason=reason)
        assert event["detail"]["source"], event
        return event


def publish_as(gateway: Gateway, client_id: str, *args: str, topic: str = "x", payload: str = "x",
               login: tuple[str, str] | None = None) -> int:
    """mosquitto_pub's exit code (5: refused by the broker)."""
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(gateway.broker.port), "-i", client_id, "-t", topic,
           "-s", "-q", "1", *args, *(["-u", login[0], "-P", login[1]] if login else [])]
    return subprocess.run(cmd, input=payload.encode(), capture_output=True, timeout=15).returncode


def test_amqtt_is_the_version_the_broker_adapter_was_written_for() -> None:
    """broker/connect.py and routing.py replace private amqtt methods: a new amqtt needs them
    read again (docs/amqtt-notes.md), so an upgrade must fail here first."""
    assert importlib.metadata.version("amqtt") == "0.12.1"


def test_an_anonymous_client_cannot_take_the_configurators_client_id(secure: Gateway, mosquitto_pub: str) -> None:
    """Attack 1. On amqtt the CONNECT is refused and names the reserved id. Mosquitto admits
    it with an unknown device's rights (docs/security.md): the configurator is pushed off
    and logs in again, still answering."""
    home = Home(secure)
    rc = publish_as(secure, "homenet-configurator", topic=secure.topics.device("homenet-configurator", "status"),
                          payload='{"state":"online"}')
    if secure.broker.name == "amqtt":
        assert rc != 0
        home.event("auth.failed", "client id 'homenet-configurator' is reserved for configurator accounts")
    wait_until(secure.configurator.connected.is_set, what="the configurator connected")
    home.unharmed(newcomer="r-new")


def test_a_refused_connect_leaves_the_session_it_names_alone(secure_amqtt: Gateway, mosquitto_pub: str) -> None:
    """Attack 2: amqtt wiped r-a1's session (clean session) before the refusal."""
    home = Home(secure_amqtt)
    assert publish_as(secure_amqtt, "r-a1") == 5
    home.event("auth.failed", "device r-a1 is enrolled and must log in")
    home.unharmed()


@pytest.mark.parametrize("will_topic", ["homenet/v1/gateway/state", "homenet/v1/device/r-a1/config"])
def test_a_will_on_a_topic_the_client_may_not_publish_is_refused(secure: Gateway, mosquitto_pub: str,
                                                                  will_topic: str) -> None:
    """Attack 3, as a refused client (r-a1's id) and as an admitted unknown device: amqtt
    took over r-a1's session and its will, then published PWNED retained on gateway/state."""
    home = Home(secure)
    will = ["--will-topic", will_topic, "--will-payload", "PWNED", "--will-retain", "--will-qos", "1"]
    for client_id in ("r-a1", "stranger"):
        rc = publish_as(secure, client_id, "-c", *will)
        if secure.broker.name == "amqtt":
            assert rc == 5, client_id
    if secure.broker.name == "amqtt":
        home.event("auth.failed", f"a will on {will_topic}, which stranger may not publish")
    time.sleep(1.0)
    assert not any(b"PWNED" in p for _, p, _ in secure.watcher.messages)
    # Mosquitto admits an anonymous client under r-a1's id (it ties no login to a client id,
    # docs/security.md), which throws r-a1 off for a moment: it must come back by itself
    home.unharmed(taken_over=secure.broker.name == "mosquitto")


def test_operator_commands_never_come_from_a_will_nor_from_a_device(secure: Gateway, mosquitto_pub: str) -> None:
    """Attack 4: a will on configurator/command made the configurator forget r-a2. Refused
    for an unknown device, for r-a1 logged in with its own account, and for the operator
    itself on amqtt (a will is no one's signed intent; Mosquitto lets an operator's will through,
    as it may publish commands). A device's plain PUBLISH there is refused too."""
    home = Home(secure)
    command = secure.topics.command
    _, forget = encode("command", Command(op="forget", device_id="r-a2"), sender="operator-x", seq=int(time.time() * 1000))
    will = ["--will-topic", command, "--will-payload", forget.decode(), "--will-qos", "1"]
    a1 = home.victims[0].state.state
    tries = [("stranger", None), ("r-a1", (a1.username, a1.password))]
    if secure.broker.name == "amqtt":  # Mosquitto judges a will by its client's publish rights (docs/security.md)
        tries.append(("operator-w", secure.admin))
    for client_id, login in tries:
        rc = subprocess.run(["timeout", "-s", "KILL", "2", "mosquitto_sub", "-h", "127.0.0.1", "-p",
                             str(secure.broker.port), "-i", client_id, "-t", "homenet/v1/configurator/state",
                             *will, *(["-u", login[0], "-P", login[1]] if login else [])],
                            capture_output=True, timeout=10).returncode
        if secure.broker.name == "amqtt":
            assert rc != -9 and rc != 137, f"{client_id} was admitted with a will on {command}"
    assert publish_as(secure, "r-a1", topic=command, payload=forget.decode(), login=(a1.username, a1.password)) \
        in (0, 5)
    if secure.broker.name == "amqtt":
        home.event("auth.failed", "operator commands never come from a will")
        home.event("auth.denied", f"publish on {command} refused to device r-a1")
    time.sleep(1.0)
    home.unharmed(taken_over=True)


def test_a_re_login_while_the_old_connection_is_held_open_is_not_deaf(tmp_path: Path) -> None:
    """amqtt's take-over race, made certain: the first connection of `dev-x` stays open and
    silent (a device whose link died), the device logs in again with the same id. The old
    connection is ended without its will; the new one gets its retained config and what is
    published after. Before: the old connection's end disconnected the shared session."""
    broker = Embedded()
    broker.start()
    old = rawmqtt.open_connection(broker.port)
    config, status = "homenet/v1/device/dev-x/config", "homenet/v1/device/dev-x/status"
    try:
        old.sendall(rawmqtt.connect("dev-x", clean=False, will=(status, b"WILL-OF-THE-OLD", True)))
        assert rawmqtt.connack(old) == 0
        old.sendall(rawmqtt.subscribe(config))
        publisher = make_client("configurator-probe", clean_session=True)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        publisher.publish(config, b"config v1", qos=1, retain=True).wait_for_publish(5)

        again = Client(broker.port, "dev-x", config)  # a persistent session, as agents have
        wait_until(lambda: (config, b"config v1") in again.received, timeout=10,
                   what="the retained config on the new connection")
        publisher.publish(config, b"config v2", qos=1, retain=True).wait_for_publish(5)
        wait_until(lambda: (config, b"config v2") in again.received, timeout=10,
                   what="a live config on the new connection")
        assert again.client.is_connected()
        watcher = Client(broker.port, "status-watcher", status)
        wait_until(watcher.subscribed.is_set, what="the watcher subscribed")
        time.sleep(0.5)
        assert not any(p == b"WILL-OF-THE-OLD" for _, p in watcher.received), "the superseded connection's will"
        again.close()
        watcher.close()
        publisher.disconnect()
        publisher.loop_stop()
    finally:
        old.close()
        broker.stop()


VARIANT_IDS = ["homenet-configurator", "homenet-configurator-standby-1", "operator-1234", "r-a1", "", "x" * 10_000,
               "stranger-9", "../#", "amqtt/forged"]


def test_connect_variants_keep_every_invariant(secure_amqtt: Gateway) -> None:
    """Fuzz-style: every client id (the configurator's, an operator's, an enrolled device's,
    empty, 10 kB, odd) x clean or persistent x no will / own status / another's config /
    gateway state / commands x no login / a wrong one / the operator's, all at once; then the
    invariants. Accepted ones must be allowed by the rules (an unknown device under its own id,
    the operator under a non-device id)."""
    home = Home(secure_amqtt)
    port = secure_amqtt.broker.port
    topics = secure_amqtt.topics
    wills = [None, "status", "device/r-a2/config", "gateway/state", "configurator/command"]
    logins = [None, ("admin", "wrong"), secure_amqtt.admin, ("r-a1", "guess")]
    variants = [(cid, clean, w, login) for cid in VARIANT_IDS for clean in (True, False) for w in wills
                for login in logins]

    def attempt(variant: tuple[str, bool, str | None, Any]) -> tuple[Any, int | None]:
        cid, clean, w, login = variant
        will = None
        if w is not None:
            topic = f"{topics.root}/device/{cid}/status" if w == "status" else f"{topics.root}/{w}"
            will = (topic, b"PWNED", True)
        return variant, rawmqtt.try_connect(port, rawmqtt.connect(cid, clean=clean, will=will, login=login))

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(attempt, variants))
    accepted = [v for v, rc in outcomes if rc == 0]
    for cid, _clean, w, login in accepted:
        if login is None:
            assert cid == "stranger-9" and w in (None, "status"), (cid, w)
        else:
            assert login == secure_amqtt.admin and w in (None, "status") and cid not in ("r-a1", "homenet-configurator"), \
                (cid, w, login)
    assert len(accepted) >= 4
    time.sleep(1.0)
    # a will fires only where its client may publish: the one accepted unknown device's own
    # status (when its connection ends without a DISCONNECT reaching the broker first)
    own = frozenset({f"{topics.root}/device/stranger-9/status"})
    pwned = {t for t, p, _ in secure_amqtt.watcher.messages if b"PWNED" in p}
    assert pwned <= own, pwned
    home.unharmed(newcomer="r-new", own_wills=own)
    failed = [e for e in secure_amqtt.watcher.events() if e["event"] == "auth.failed"]
    assert failed and all(e["detail"]["source"] == "127.0.0.1" for e in failed)


def broker_sockets(port: int) -> dict[str, int]:
    """The broker's side of its TCP connections on `port` that still hold a descriptor
    (ESTABLISHED, CLOSE_WAIT), by state (from /proc/net/tcp)."""
    states = {"01": "ESTABLISHED", "08": "CLOSE_WAIT"}
    counts: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] in states:
            counts[states[fields[3]]] = counts.get(states[fields[3]], 0) + 1
    return counts


FLOOD = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, held = int(sys.argv[1]), []
def conn(source):
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
for n in range(2000):  # from 40 LAN addresses, under the per-source cap; half closed at once
    sock = conn(f"127.0.1.{n % 40 + 1}")
    sock.close() if n % 2 else held.append(sock)
held += [conn("127.0.2.1") for _ in range(70)]  # one address over its cap of 64
print("flooding", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def gateway_fd_limit() -> Iterator[None]:
    """Room for 2,000 connections in the broker this test starts, as the gateway unit's
    LimitNOFILE gives it (a shell's soft limit of 1,024 would make the broker's total cap bite)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = max(hard, 16384) if os.geteuid() == 0 else hard  # root may raise the hard limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(16384, raised), raised))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_flood_of_half_open_connections_is_shed_and_the_gateway_recovers(tmp_path: Path,
                                                                           gateway_fd_limit: None) -> None:
    """Attack 5: 2,000 connections that never send CONNECT, half closed at once (left in
    CLOSE_WAIT by the broker before), half held open, and one address over its cap. The
    broker runs as `homenet broker run` and the flood as another process, as on a gateway.
    Agents keep onboarding; within 5 s of the flood's end no flood socket is left."""
    accounts = tmp_path / "gateway" / "broker-accounts.json"
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[broker]\naccounts_file = "{accounts}"\nconnect_timeout = 30.0\n')
    broker = Process(tmp_path / "broker.log", str(Path(sys.executable).parent / "homenet"), "broker", "run",
                     "--config", str(config), "--listen", f"127.0.0.1:{port}")
    handle = External(port)
    flood = None
    gateway = Gateway(handle, tmp_path, accounts_file=accounts)
    try:
        wait_listening(port, timeout=30)
        gateway.start()
        first, _ = enrolled(gateway, "nas", "r-a1")
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(port)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert flood.stdout is not None and flood.stdout.readline().strip() == "flooding"
        enrolled(gateway, "camera", "r-a2")  # onboards during the flood
        gateway.watcher.wait_event("broker.limit", reason="127.0.2.1: connection refused: 64 connections open")
        assert sum(broker_sockets(port).values()) > 1000, "the flood is held"
        assert broker_sockets(port).get("CLOSE_WAIT", 0) < 10, "closed connections are closed by the broker too"
        assert first.client.is_connected()
        flood.communicate("end\n", timeout=30)
        ended = time.monotonic()
        wait_until(lambda: sum(broker_sockets(port).values()) <= 6, timeout=5,
                   what=f"every flood socket closed by the broker ({broker_sockets(port)})")
        assert time.monotonic() - ended < 5
        enrolled(gateway, "printer", "r-a3")
        assert first.client.is_connected()
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        gateway.close()
        broker.terminate()


class External:
    """A broker another process runs, as the harness's Gateway needs to know it."""

    name = "amqtt"
    cafile = None
    fingerprint = None

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"mqtt://127.0.0.1:{port}"


def test_a_silent_connection_is_closed_at_the_connect_deadline() -> None:
    broker = Embedded(connect_timeout=1.0)
    broker.start()
    try:
        silent = rawmqtt.open_connection(broker.port, source="127.0.1.1")
        silent.settimeout(5)
        started = time.monotonic()
        assert silent.recv(1) == b""  # the broker closed it
        assert 0.8 < time.monotonic() - started < 3
        silent.close()
    finally:
        broker.stop()


def test_an_oversized_publish_closes_the_connection_before_it_is_read(secure_amqtt: Gateway) -> None:
    """Attack 8: a PUBLISH announcing 32 MiB is refused from its header; the broker reads
    none of it (it holds nothing more than before)."""
    home = Home(secure_amqtt)
    sock = rawmqtt.open_connection(secure_amqtt.broker.port)
    try:
        sock.sendall(rawmqtt.connect("stranger-big"))
        assert rawmqtt.connack(sock) == 0
        sock.sendall(rawmqtt.publish_header(secure_amqtt.topics.device("stranger-big", "register"), 32 << 20))
        sock.settimeout(5)
        try:
            sock.sendall(b"\0" * (1 << 20))
            closed = sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        assert closed
    finally:
        sock.close()
    home.event("broker.too_large", "over the")
    home.unharmed()


def test_an_unknown_device_may_not_retain_large_messages(secure_amqtt: Gateway) -> None:
    home = Home(secure_amqtt)
    status = secure_amqtt.topics.device("stranger-r", "status")
    assert publish_as(secure_amqtt, "stranger-r", "-r", topic=status, payload="s" * 250_000) == 0
    home.event("auth.denied", "an unknown device may retain at most")
    assert status not in home.retained()
    home.unharmed()


def test_an_unknown_devices_session_is_dropped_when_it_leaves(secure_amqtt: Gateway) -> None:
    """Attack 8: 2,000 distinct ids kept 43 MiB; an unknown device keeps no session."""
    server = secure_amqtt.broker._thread._broker._broker
    before = len(server._sessions)

    def visit(n: int) -> int | None:
        return rawmqtt.try_connect(secure_amqtt.broker.port, rawmqtt.connect(f"visitor-{n}", clean=False))

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(visit, range(200))) == {0}
    wait_until(lambda: len(server._sessions) <= before, timeout=5, what="the visitors' sessions dropped")


def test_an_enrolled_device_publishing_on_another_devices_topic_is_reported(secure_amqtt: Gateway) -> None:
    """Point 10: ACL refusals were silent."""
    home = Home(secure_amqtt)
    a1 = home.victims[0].state.state
    assert publish_as(secure_amqtt, "r-a1", topic=secure_amqtt.topics.device("r-a2", "info"),
                            login=(a1.username, a1.password)) in (0, 5)
    event = home.event("auth.denied", "publish on homenet/v1/device/r-a2/info refused to device r-a1")
    assert event["sender"] == "r-a1"
    home.unharmed(taken_over=True)


def test_a_connection_closed_before_connect_is_closed_by_the_broker_too(secure_amqtt: Gateway) -> None:
    """Half-open before CONNECT: a peer that closes is closed at once (no CLOSE_WAIT)."""
    for _ in range(50):
        rawmqtt.open_connection(secure_amqtt.broker.port).close()
    wait_until(lambda: broker_sockets(secure_amqtt.broker.port).get("CLOSE_WAIT", 0) == 0, timeout=3,
               what="no CLOSE_WAIT left")


def test_the_mosquitto_recipe_keeps_every_account_across_a_mosquitto_restart(tmp_path: Path) -> None:
    """docs/security.md: Mosquitto as Debian runs it (dropping to user `mosquitto`), its
    dynsec.json handed to that user. Without the `chown` every account the configurator made,
    its own included, was lost at the next restart and the configurator looped on "Not
    authorized"."""
    if os.geteuid() != 0:
        pytest.skip("Mosquitto drops to its own user only when started as root (CI runs as root)")
    missing = Mosquitto.dynsec_missing()
    if missing:
        require_program(missing)
    broker = Mosquitto(dynsec=True, user="mosquitto")
    broker.start()
    gateway = Gateway(broker, tmp_path, dynsec_admin=broker.admin)
    try:
        gateway.start()
        agent, _ = enrolled(gateway, "nas", "r-a1")
        broker.halt()
        broker.start()
        saved = broker.dynsec_file.read_text()
        assert '"r-a1"' in saved and '"configurator"' in saved
        wait_until(lambda: agent.client.is_connected() and agent.state.state.username == "r-a1",
                   timeout=20, what="r-a1 logged in again with its account")
        wait_until(gateway.configurator.connected.is_set, timeout=20, what="the configurator logged in again")
        enrolled(gateway, "camera", "r-a2")
    finally:
        gateway.close()
        broker.stop()


def fake_register(port: int, device_id: str) -> None:
    """A register as a fake device sends it: its own key, correctly signed, never confirmed."""
    key = KeyPair.generate()
    info = DeviceInfo(device_id=device_id, device_type="nas", interfaces=[Interface(name="eth0", mac="02:00:00:00:00:42")],
                      public_key=b64(key.public), needs_credentials=True)
    _, payload = encode("register", info, sender=device_id, seq=1, sign=key.sign)
    client = make_client(device_id, clean_session=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(f"homenet/v1/device/{device_id}/register", payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_a_registration_flood_gets_no_more_than_the_budget_of_new_devices(tmp_path: Path) -> None:
    """Point 7: 30 fake devices register (signed, each with its own key) and never confirm.
    Only `max_new_devices` of them get a record and an account; the rest are dropped with a
    `registration.limited` event. A real device that comes meanwhile is dropped too, and gets
    in by itself (it registers again) once a place is free: here the owner forgets a fake."""
    accounts = tmp_path / "gateway" / "broker-accounts.json"
    broker = Embedded(accounts_file=accounts)
    broker.start()
    gateway = Gateway(broker, tmp_path, accounts_file=accounts, max_new_devices=6)
    try:
        gateway.start()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: fake_register(broker.port, f"fake-{n:02d}"), range(30)))
        event = gateway.watcher.wait_event("registration.limited", reason="register(s) of new devices dropped")
        assert "max_new_devices" in event["reason"]
        real = gateway.agent("nas", "r-real", info_interval=0.5, register_retry=1.0)
        wait_until(lambda: real._register_sent and time.monotonic() - real._register_sent > 0.5,
                   what="the real device's register sent")
        assert gateway.record("r-real") is None
        enrolled_fakes = sorted(r.device_id for r in gateway.configurator.store.all())
        assert len(enrolled_fakes) == 6 and all(d.startswith("fake-") for d in enrolled_fakes)
        fake_accounts = [a.name for a in Accounts(accounts).all() if a.name.startswith("fake-")]
        assert len(fake_accounts) == 6
        send_command(broker.url, Command(op="forget", device_id=enrolled_fakes[0]), "homenet/v1", gateway.admin,
                     key=operator_key(gateway.data_dir))
        gateway.wait_configured("r-real", timeout=20)
    finally:
        gateway.close()
        broker.stop()


def test_an_operator_command_counts_only_signed_by_the_gateways_operator_key_and_only_once(secure: Gateway) -> None:
    """An operator account's password is not enough: a command unsigned, signed by another key,
    or sent again as a reader saw it is refused with a reason, an event names it, and the
    device stays. Also where Mosquitto lets an operator's will through (docs/security.md)."""
    home = Home(secure)
    key = operator_key(secure.data_dir)
    forget = Command(op="forget", device_id="r-a2")
    for signer, why in ((None, "not signed by the gateway's operator key"),
                        (KeyPair.generate(), "not signed by the gateway's operator key")):
        reply = send_command(secure.broker.url, forget, "homenet/v1", secure.admin, key=signer)
        assert not reply.ok and why in reply.error
        secure.watcher.wait_event("command.refused")
    assert secure.record("r-a2") is not None
    # the same signed bytes twice: the second is a replay
    seq = time.time_ns() // 1000
    harmless = Command(op="approve", device_id="r-a2")  # refused by the handler: r-a2 is not pending
    _, signed = encode("command", harmless, sender="operator-r", seq=seq, sign=key.sign)
    client = make_client("operator-r", clean_session=True, username=secure.admin[0], password=secure.admin[1])
    client.connect("127.0.0.1", secure.broker.port)
    client.loop_start()
    try:
        for _ in range(2):
            client.publish(secure.topics.command, signed, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
    event = secure.watcher.wait_event("command.refused", reason=f"operator-r: replayed (seq {seq} is not above {seq})")
    assert event["severity"] == "warning"
    signed_reply = send_command(secure.broker.url, harmless, "homenet/v1", secure.admin, key=key)
    assert "r-a2 is configured, not pending" in signed_reply.error, "a signed command reaches its handler"
    home.unharmed()
