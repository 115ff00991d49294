"""A standby configurator (IEC 62608-1 Q3): a second `homenet configurator run --standby` on
the same data directory takes over within seconds when the primary's `configurator/state`
goes offline; epochs fence the old primary, which stands by when it comes back; no two
configurators ever publish at once. The split-brain test kills real processes for real.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from homenet.brokers import Embedded, Mosquitto, wait_listening
from homenet.configurator.app import ADMIN, ADMIN_SECRET, KEY_NAME, db_path
from homenet.configurator.lifecycle import State
from homenet.configurator.operator import operator_key, send_command
from homenet.configurator.standby import Standby, Watch
from homenet.mqtt import RECONNECT_MAX_DELAY
from homenet.configurator.store import SqliteStore
from homenet.keys import KeyPair
from homenet.netutil import free_port
from homenet.schemas import Topics, encode
from homenet.schemas.messages import Command, Config
from homenet.settings import ConfiguratorSettings, LanSettings

from .conftest import require_program
from .harness import Gateway, Watcher, load_records, retained, wait_until
from .processes import Process

BIN = Path(sys.executable).parent
HOMENET, AGENT = str(BIN / "homenet"), str(BIN / "homenet-agent")
TOPICS = Topics()
TAKEOVER = 10.0
"""Seconds from the primary's death to the standby's `online`, at most (measured: well under 1)."""


class Home:
    """A broker that authenticates every client, configurator and agent processes on it, and
    an operator's watcher of the whole tree."""

    def __init__(self, tmp: Path, started: list[Process], url: str, settings: str) -> None:
        self.tmp, self.started, self.url = tmp, started, url
        self.data = tmp / "gateway"
        self.config = tmp / "gateway.toml"
        self.config.write_text(settings + f'[configurator]\nbroker = "{url}"\ndata_dir = "{self.data}"\n'
                               + self._access() + "standby_grace = 2\n")
        self.watcher: Watcher | None = None

    def _access(self) -> str:
        return f'accounts_file = "{self.data / "broker-accounts.json"}"\n'

    def configurator(self, *flags: str) -> Process:
        proc = Process(self.tmp / f"configurator-{len(self.started)}.log", HOMENET, "configurator", "run",
                       "--config", str(self.config), *flags)
        self.started.append(proc)
        return proc

    def agent(self, device_id: str, device_type: str = "generic") -> Process:
        proc = Process(self.tmp / f"agent-{device_id}.log", AGENT, "run", "--broker", self.url,
                       "--device-id", device_id, "--device-type", device_type, "--collector", "simulated",
                       "--data-dir", str(self.tmp / "agents" / device_id))
        self.started.append(proc)
        return proc

    @property
    def admin(self) -> tuple[str, str]:
        return ADMIN, (self.data / ADMIN_SECRET).read_text().strip()

    def watch(self) -> Watcher:
        """The operator's view of the tree, from when it is called (the admin account exists
        once a configurator has started)."""
        wait_until(lambda: (self.data / ADMIN_SECRET).exists(), timeout=30, what="the admin account")
        self.watcher = Watcher(self.url, TOPICS, self.admin)
        return self.watcher

    def states(self, since: int = 0) -> list[tuple[str, int]]:
        """(state, epoch) of every `configurator/state` the watcher saw, from message `since` on."""
        assert self.watcher is not None
        with self.watcher._lock:
            messages = self.watcher.messages[since:]
        return [(b["state"], b["epoch"]) for t, p, _ in messages if t == TOPICS.configurator_state and p
                for b in [json.loads(p)["body"]]]

    def seen(self) -> int:
        assert self.watcher is not None
        return len(self.watcher.messages)

    def wait_online(self, epoch: int, since: int = 0, timeout: float = 30) -> None:
        wait_until(lambda: ("online", epoch) in self.states(since), timeout, f"configurator epoch {epoch} online")

    def wait_configured(self, *device_ids: str, timeout: float = 40) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            records = load_records(self.data)
            ok = all(d in records and records[d].state == State.CONFIGURED for d in device_ids)
            return records if ok else None
        return wait_until(done, timeout, f"{', '.join(device_ids)} configured")


class MosquittoHome(Home):
    """Mosquitto with dynamic security: the configurator issues the accounts through its admin."""

    def __init__(self, tmp: Path, started: list[Process], broker: Mosquitto) -> None:
        assert broker.admin is not None
        self.secret = tmp / "dynsec-admin.secret"
        self.secret.write_text(broker.admin[1] + "\n")
        self.dynsec_admin = broker.admin[0]
        super().__init__(tmp, started, broker.url, "")

    def _access(self) -> str:
        return f'dynsec_admin = "{self.dynsec_admin}"\ndynsec_admin_password_file = "{self.secret}"\n'


@pytest.fixture(params=["amqtt", "mosquitto"])
def home(request: pytest.FixtureRequest, tmp_path: Path, started: list[Process]) -> Iterator[Home]:
    """amqtt: `homenet broker run` in a process of its own, reading the configurator's accounts
    file; mosquitto: Debian's Mosquitto with its dynamic-security plugin."""
    if request.param == "mosquitto":
        missing = Mosquitto.dynsec_missing()
        if missing:
            require_program(missing)
        broker = Mosquitto(dynsec=True)
        broker.start()
        try:
            yield MosquittoHome(tmp_path, started, broker)
        finally:
            broker.stop()
        return
    port = free_port()
    accounts = tmp_path / "gateway" / "broker-accounts.json"
    home = Home(tmp_path, started, f"mqtt://127.0.0.1:{port}",
                f'[broker]\nlisteners = ["127.0.0.1:{port}"]\naccounts_file = "{accounts}"\n')
    started.append(Process(tmp_path / "broker.log", HOMENET, "broker", "run", "--config", str(home.config)))
    wait_listening(port, timeout=30)
    yield home


def epoch_on_disk(data_dir: Path) -> int:
    """The highest epoch any configurator on this data directory has claimed."""
    store = SqliteStore(db_path(data_dir), read_only=True)
    try:
        return int(store.meta()["epoch"])
    finally:
        store.close()


def takes_over(proc: Process) -> bool:
    return ": taking over" in proc.output()


def announced_online(proc: Process) -> bool:
    """The configurator in `proc` said `online` (service.py logs "... (epoch N) online at ...")."""
    return ") online at " in proc.output()


# --- when a waiting configurator takes over (the pure decision) -----------------------------

def test_a_waiting_configurator_takes_over_when_the_primary_goes_offline_and_not_before() -> None:
    watch = Watch(patience=1.0)
    assert not watch.take_over(100.0), "not before it could hear anything"
    watch.connected(0.0)
    watch.heard("online", 3, 0.1)
    assert not watch.take_over(100.0), "someone is online: it waits, however long"
    watch.heard("offline", 3, 100.5)
    assert watch.take_over(100.5), "the primary said offline (or its will did): at once"


def test_with_nobody_online_it_takes_over_once_its_patience_has_run_out() -> None:
    for heard in ([], [("offline", 2, 0.0)], [("online", 2, 0.0), (None, 0, 0.5)]):  # nothing, offline, cleared
        watch = Watch(patience=1.0)
        watch.connected(0.0)
        for state, epoch, at in heard:
            watch.heard(state, epoch, at)
        last = max([0.0] + [at for _, _, at in heard])
        assert not watch.take_over(last + 0.9) and watch.take_over(last + 1.0), heard


def test_after_its_own_reconnect_it_gives_the_primary_its_longest_reconnect_backoff() -> None:
    """A restarted broker may have lost the retained state; the primary comes back within that."""
    watch = Watch(patience=1.0)
    watch.connected(0.0)
    watch.heard("online", 2, 0.1)
    watch.connected(10.0)  # nothing retained any more
    assert not watch.take_over(10.0 + RECONNECT_MAX_DELAY - 0.1)
    assert watch.take_over(10.0 + RECONNECT_MAX_DELAY)
    watch.heard("offline", 2, 11.0)  # but an `offline` after the `online` heard before is news
    assert watch.take_over(11.0)


# --- the split-brain test: real processes, killed for real ---------------------------------

def test_primary_killed_the_standby_takes_over_and_the_old_primary_restarted_stays_standby(home: Home) -> None:
    primary = home.configurator()
    wait_until(lambda: announced_online(primary), timeout=30, what="the primary online")
    home.watch()
    standby = home.configurator("--standby")
    wait_until(lambda: "is online at" in standby.output() and "standing by" in standby.output(), timeout=30,
               what="the standby standing by")
    epoch = epoch_on_disk(home.data)
    assert home.states()[-1] == ("online", epoch), "a standby that waits announces nothing"
    for device_id, kind in (("stb-1", "iptv-stb"), ("nas-1", "nas")):
        home.agent(device_id, kind)
    before = home.wait_configured("stb-1", "nas-1")

    # kill -9: the broker publishes the primary's will, `offline`, and the standby takes over
    mark = home.seen()
    killed = time.monotonic()
    primary.kill()
    home.agent("cam-1", "camera")  # a new device, arriving now
    home.wait_online(epoch + 1, mark)
    online_after = time.monotonic() - killed
    records = home.wait_configured("cam-1")
    confirmed_after = time.monotonic() - killed
    print(f"\n{home.url}: standby online {online_after:.2f} s after the kill; "
          f"the new device confirmed {confirmed_after:.2f} s after it")
    assert online_after < TAKEOVER
    assert epoch_on_disk(home.data) == epoch + 1
    assert f"epoch {epoch} went offline: taking over" in standby.output()

    # the devices configured before register with it and keep their configs, retained; nobody
    # shares an address
    records = wait_until(lambda: (r := load_records(home.data)) and all(
        r[d].register_id != before[d].register_id for d in ("stb-1", "nas-1")) and r, timeout=30,
        what="the devices registered with the new primary")
    for device_id in ("stb-1", "nas-1"):
        record = records[device_id]
        assert (record.state, record.version, record.address) == (
            State.CONFIGURED, before[device_id].version, before[device_id].address)
    configs = {t: json.loads(p)["body"] for t, p in retained(home.url, 3 * 3 + 2, timeout=30, login=home.admin).items()
               if t.endswith("/config")}
    assert {t: c["version"] for t, c in configs.items()} == {
        TOPICS.device(d, "config"): records[d].version for d in ("stb-1", "nas-1", "cam-1")}
    addresses = [r.address for r in records.values()]
    assert len(set(addresses)) == len(addresses) == 3

    # the old primary restarted (not even --standby): it sees the new primary and stands by
    mark = home.seen()
    old = home.configurator()
    wait_until(lambda: f"epoch {epoch + 1} is online" in old.output(), timeout=30, what="the old primary standing by")
    time.sleep(3)  # longer than it listens before taking over
    assert not takes_over(old) and not announced_online(old)
    assert epoch_on_disk(home.data) == epoch + 1
    assert home.states(mark) == []
    home.agent("spk-1", "smart-speaker")  # the new primary keeps serving
    records = home.wait_configured("spk-1", "cam-1")
    assert records["spk-1"].config.epoch == epoch + 1

    # and when the new primary dies in turn, the old one takes over
    mark = home.seen()
    standby.kill()
    home.wait_online(epoch + 2, mark)
    assert takes_over(old)
    home.agent("gc-1", "game-console")
    records = home.wait_configured("gc-1", "spk-1", "cam-1", "stb-1", "nas-1")
    assert records["gc-1"].config.epoch == epoch + 2
    addresses = [r.address for r in records.values()]
    assert len(set(addresses)) == len(addresses) == 5
    online = [e for state, e in home.states() if state == "online"]
    assert online == sorted(online), f"epochs only go up: {online}"
    assert old.terminate() == 0
    for proc in home.started:
        assert "Traceback" not in proc.output(), proc.output()


def test_a_command_sent_while_no_configurator_is_connected_is_answered_by_the_next(home: Home) -> None:
    """The primary's session is persistent (clean_session=False, one client id for every
    configurator on the data directory): what arrives while none is connected waits there."""
    first = home.configurator()
    wait_until(lambda: announced_online(first), timeout=30, what="the configurator online")
    home.watch()
    device = home.agent("nas-1", "nas")
    home.wait_configured("nas-1")
    assert device.terminate() == 0  # gone for good: it would register again after the `forget`
    first.kill()
    answers: list[Any] = []
    operator = threading.Thread(target=lambda: answers.append(send_command(
        home.url, Command(op="forget", device_id="nas-1"), TOPICS.root, home.admin, timeout=60,
        key=operator_key(home.data))))
    operator.start()
    wait_until(lambda: any(t == TOPICS.command for t, _, _ in home.watcher.messages), what="the command sent")
    second = home.configurator()
    operator.join(timeout=70)
    assert answers and answers[0].ok, answers
    assert "nas-1" not in load_records(home.data)
    assert takes_over(second)


# --- in one process: the fence, and who wins a simultaneous start -------------------------

def test_two_configurators_started_at_once_end_with_exactly_one_online(embedded: Embedded, tmp_path: Path) -> None:
    for attempt in range(3):
        # The loser, fenced, reconnects with the primary's client id once and throws the
        # winner off for about a second (paho's shortest backoff): a grace above that.
        # The primary also says online at every reconciliation (a will amqtt hands over with the
        # session can land on the retained state after it spoke): each second here.
        settings = ConfiguratorSettings(broker=embedded.url, data_dir=tmp_path / f"gateway-{attempt}",
                                        standby_grace=2, reconcile_interval=1)
        both: list[Standby] = []
        stop = threading.Event()
        at_once = threading.Barrier(2)

        def run() -> None:
            at_once.wait()
            node = Standby(settings)  # on a fresh data directory: both make the key and database
            both.append(node)
            node.run(stop)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            def settled() -> Standby | None:
                primaries = [n for n in both if n.primary and n.primary.connected.is_set()
                             and not n.primary.fenced.is_set()]
                # the one with the highest epoch: an older one may be online until its next batch fences it
                return primaries[0] if len(both) == 2 and len(primaries) == 1 and \
                    primaries[0].primary.epoch == epoch_on_disk(settings.data_dir) else None

            winner = wait_until(settled, timeout=30, what="one primary")
            time.sleep(3)  # longer than a standby waits for a primary to announce itself
            assert settled() is winner, f"attempt {attempt}: the primary changed"
            loser = next(n for n in both if n is not winner)
            assert loser.primary is None
            wait_until(lambda: (s := json.loads(retained(embedded.url, 1)[TOPICS.configurator_state])["body"])
                       and (s["state"], s["epoch"]) == ("online", winner.primary.epoch), 5, "the winner's online")
            assert epoch_on_disk(settings.data_dir) == winner.primary.epoch
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)


def from_configurator(watcher: Watcher, since: int) -> list[str]:
    """Topics of what a configurator published after message `since`."""
    with watcher._lock:
        messages = watcher.messages[since:]
    return [t for t, p, _ in messages if p.startswith(b"{") and json.loads(p).get("from") == "configurator"]


def states_since(watcher: Watcher, since: int) -> list[str]:
    """What the `configurator/state` messages after message `since` said."""
    with watcher._lock:
        messages = watcher.messages[since:]
    return [json.loads(p)["body"]["state"] for t, p, _ in messages if t == TOPICS.configurator_state and p]


@pytest.mark.parametrize("then", ["a new device registers", "a malformed message arrives", "it is stopped"])
def test_a_fenced_configurator_sends_nothing_and_stands_down(then: str, embedded: Embedded, tmp_path: Path) -> None:
    gw = Gateway(embedded, tmp_path)
    try:
        old = gw.start()
        mark = len(gw.watcher.messages)
        SqliteStore(db_path(gw.data_dir)).claim_epoch()  # another configurator took over
        if then == "a new device registers":  # it would commit a record, reply, publish a config
            gw.agent("nas")
        elif then == "a malformed message arrives":  # it would publish only an event: no commit
            client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="prankster")
            client.connect("127.0.0.1", embedded.port)
            client.loop_start()
            client.publish(TOPICS.device("nas-9", "info"), b"not json", qos=1).wait_for_publish(5)
            client.disconnect()
            client.loop_stop()
        else:  # it would say `offline` over the new primary's `online`
            gw.stop()
        wait_until(old.fenced.is_set, what="the old configurator fenced")
        time.sleep(1)
        # nothing but that it stood down: its retained `online` must not outlive it
        assert set(from_configurator(gw.watcher, mark)) <= {TOPICS.configurator_state}
        assert states_since(gw.watcher, mark) in ([], ["offline"])
        assert load_records(gw.data_dir) == {}
    finally:
        gw.close()


def test_an_agent_refuses_a_config_from_an_older_epoch_than_the_one_it_applied(
        embedded: Embedded, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gw = Gateway(embedded, tmp_path)
    try:
        gw.start()
        agent = gw.agent("nas")
        gw.wait_configured("test-nas")
        gw.stop()
        gw.lan = LanSettings(subnet="10.20.0.0/24", gateway="10.20.0.1", pool_start="10.20.0.100",
                             pool_end="10.20.0.200")
        gw.start()  # epoch 2 re-plans the device: version 2
        applied = gw.wait_configured("test-nas", version=2).config
        assert (applied.epoch, agent.state.state.config_epoch) == (2, 2)
        gw.stop()

        key = KeyPair.load_or_create(gw.data_dir / KEY_NAME)
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fenced-one")
        client.connect("127.0.0.1", embedded.port)
        client.loop_start()

        def publish(epoch: int) -> None:
            config = Config(device_id="test-nas", version=3, epoch=epoch, profile=applied.profile, items=applied.items)
            payload = encode("config", config, sender="configurator", seq=10**9 + epoch, sign=key.sign)[1]
            client.publish(TOPICS.device("test-nas", "config"), payload, qos=1, retain=True).wait_for_publish(5)

        publish(epoch=1)  # signed by the real key, but made by a configurator fenced since
        wait_until(lambda: "older than epoch 2 of the config applied" in caplog.text, what="the refusal")
        assert agent.state.state.applied_version == 2
        publish(epoch=2)
        wait_until(lambda: agent.state.state.applied_version == 3, what="the same version from epoch 2 applied")
        client.disconnect()
        client.loop_stop()
    finally:
        gw.close()
