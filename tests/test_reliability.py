"""Reliability with real processes killed for real: a configurator SIGKILLed while devices
register, a broker that dies and comes back, an agent SIGKILLed in the middle of an apply.

The configurator-kill test is randomised: its seed is printed (`pytest -s` shows it) and
`HOMENET_SEED=N` replays it. CI runs a few trials; `HOMENET_LONG=1` runs the long mode
(at least 20 trials, more devices):

    HOMENET_LONG=1 HOMENET_SEED=1234 .venv/bin/python -m pytest tests/test_reliability.py -s
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from homenet.brokers import BrokerHandle, Embedded, Mosquitto
from homenet.configurator.lifecycle import State
from homenet.configurator.standby import SETTLE
from homenet.netutil import free_port
from homenet.schemas import Topics

from .conftest import require_program
from .harness import Gateway, Watcher, load_records, retained, wait_until
from .processes import Process

LONG = os.environ.get("HOMENET_LONG", "").lower() in ("1", "true", "yes")
BIN = Path(sys.executable).parent
HOMENET, AGENT = str(BIN / "homenet"), str(BIN / "homenet-agent")
TOPICS = Topics()


def accepted_replies(watcher: Watcher) -> set[str]:
    """Devices that were sent an accepting `register.reply` (no broker auth here, so no ACL
    keeps the watcher from reading them)."""
    found = set()
    with watcher._lock:
        messages = list(watcher.messages)
    for topic, payload, _ in messages:
        if topic.endswith("/register/reply") and payload:
            body = json.loads(payload)["body"]
            if body["status"] == "accepted":
                found.add(topic.split("/")[-3])
    return found


def broker_for(name: str, port: int | None = None) -> BrokerHandle:
    if name == "mosquitto":
        require_program("mosquitto", Mosquitto.binary())
        return Mosquitto(port=port)
    return Embedded(port=port)


# --- 1. the configurator killed at random moments while agents register -------------------

DEVICE_TYPES = ("iptv-stb", "nas", "media-player", "game-console", "smart-speaker", "camera", "generic")


@pytest.mark.parametrize("broker_name", ["amqtt", "mosquitto"])
def test_configurator_killed_at_random_moments_while_agents_register(broker_name: str, tmp_path: Path,
                                                                      started: list[Process]) -> None:
    seed = int(os.environ.get("HOMENET_SEED", random.randrange(2**32)))
    trials, devices = (20, 20) if LONG else (3, 16)
    print(f"\nconfigurator-kill test on {broker_name}: seed {seed} (HOMENET_SEED={seed} replays it), "
          f"{trials} trials, {devices} devices")
    rng = random.Random(seed)
    broker = broker_for(broker_name)
    broker.start()
    gw = Gateway(broker, tmp_path)  # only for its in-process agents; the configurator is a process
    watcher = Watcher(broker.url, TOPICS)
    data = tmp_path / "gateway"
    ids = [f"dev-{n:02d}" for n in range(devices)]
    batches = [ids[i::trials] for i in range(trials)]  # a few new devices arrive in every trial

    def configurator() -> Process:
        proc = Process(tmp_path / f"configurator-{len(started)}.log", HOMENET, "configurator", "run", "--broker", broker.url, "--data-dir", str(data))
        started.append(proc)
        return proc

    def check_database(when: str) -> dict[str, Any]:
        records = load_records(data)
        missing = accepted_replies(watcher) - set(records)
        assert not missing, f"{when}: accepted but not in the database: {sorted(missing)} (seed {seed})"
        addresses = [r.address for r in records.values() if r.address]
        assert len(addresses) == len(set(addresses)), f"{when}: an address is shared: {addresses} (seed {seed})"
        return records

    try:
        for trial, batch in enumerate(batches):
            proc = configurator()
            for device_id in batch:
                gw.agent(rng.choice(DEVICE_TYPES), device_id)
                time.sleep(rng.uniform(0, 0.05))
            # it listens SETTLE s for another configurator, is online about 0.3 s later, then answers
            # the registrations at once
            pause = SETTLE + (rng.uniform(0.25, 0.8) if rng.random() < 0.6 else rng.uniform(0.05, 2.0))
            time.sleep(pause)
            proc.kill()
            time.sleep(0.2)  # what the broker had already taken reaches the watcher
            records = check_database(f"trial {trial} (killed after {pause:.2f} s)")
            print(f"trial {trial}: killed {pause:.2f} s after start; {len(records)} devices in the database, "
                  f"{sum(r.state == State.CONFIGURED for r in records.values())} configured")

        proc = configurator()
        wait_until(lambda: " online at " in proc.output(), what="the last configurator online")

        def converged() -> bool:
            records = load_records(data)
            return len(records) == devices and all(r.state == State.CONFIGURED and r.online
                                                   for r in records.values())
        try:
            wait_until(converged, timeout=30, what=f"every device configured (seed {seed})")
        except AssertionError:
            print(proc.output()[-3000:])
            for r in load_records(data).values():
                print(r.device_id, r.state.value, r.online, r.version, r.address, r.error)
            raise
        records = check_database("at the end")
        for agent in gw.agents:  # the devices took what the database says
            record = records[agent.device_id]
            assert agent.state.state.applied_version == record.version
            assert agent.executor.in_force()["ipv4"]["address"] == record.address
        events = watcher.events()
        assert not [e for e in events if e["event"] == "internal.error"], events
        rejected = [e["reason"] for e in events if e["event"] == "message.rejected"]
        print(f"{len(rejected)} messages rejected: {sorted(set(r[:60] for r in rejected))}")
        assert proc.terminate() == 0
        for each in started:
            assert "Traceback" not in each.output(), each.output()
    finally:
        gw.close()
        watcher.close()
        broker.stop()


# --- 2. the broker restarts: everything reconnects and the retained state is back ------------

@pytest.mark.parametrize("broker_name", ["amqtt", "mosquitto"])
def test_broker_restart_everything_reconnects_and_retained_state_is_back(broker_name: str, tmp_path: Path) -> None:
    broker = broker_for(broker_name)
    broker.start()
    gw = Gateway(broker, tmp_path)
    ids = [f"dev-{n}" for n in range(6)]
    try:
        gw.start()
        agents = [gw.agent(DEVICE_TYPES[n % len(DEVICE_TYPES)], device_id) for n, device_id in enumerate(ids)]
        for device_id in ids:
            gw.wait_configured(device_id)
        before = {device_id: gw.record(device_id) for device_id in ids}

        # down for real: amqtt shut down, Mosquitto SIGKILLed; a new one on the same port, empty
        if isinstance(broker, Mosquitto):
            assert broker.proc is not None
            os.kill(broker.proc.pid, signal.SIGKILL)
            broker.proc.wait(timeout=10)
            broker.stop()  # its temp dir
        else:
            broker.stop()
        wait_until(lambda: not gw.configurator.connected.is_set(), what="configurator sees the broker gone")
        time.sleep(1.5)  # long enough for the clients to back off
        broker = broker_for(broker_name, port=broker.port)
        broker.start()

        wait_until(gw.configurator.connected.is_set, timeout=40, what="configurator reconnected")
        wait_until(lambda: all(a.client.is_connected() for a in agents), timeout=40, what="agents reconnected")
        # per device: config (from the configurator), config/result and status (from the agent)
        state = retained(broker.url, wanted=3 * len(ids) + 1, timeout=20)
        for device_id in ids:
            config = json.loads(state[TOPICS.device(device_id, "config")])["body"]
            result = json.loads(state[TOPICS.device(device_id, "config/result")])["body"]
            assert config["version"] == result["version"] == before[device_id].version
            assert result["status"] == "ok"
            assert json.loads(state[TOPICS.device(device_id, "status")]) == {"state": "online"}
            record = gw.record(device_id)
            assert (record.state, record.online, record.version, record.address) == (
                State.CONFIGURED, True, before[device_id].version, before[device_id].address)
        assert json.loads(state[TOPICS.configurator_state])["body"]["state"] == "online"
        assert not [e for e in gw.watcher.events() if e["event"] in ("message.rejected", "internal.error")]
    finally:
        gw.close()
        broker.stop()


# --- 3. an agent SIGKILLed in the middle of an apply -----------------------------------------

class Door:
    """A TCP forwarder in front of the broker whose door can be shut: connections already
    through stay up, new ones are refused. An agent connected through it and then given a new
    address cannot verify the broker on it, so it sits inside its apply (safe apply's check)
    until its deadline: a real moment to kill it at, with no hook in the agent."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def shut(self) -> None:
        listener, self._listener = self._listener, None
        if listener:  # from now on: connection refused (shutdown wakes the accept() in progress)
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                inside, _ = listener.accept()
            except OSError:
                return
            outside = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [inside, outside]
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.shut()
        for conn in self._conns:
            conn.close()


@pytest.mark.parametrize("outcome", ["completed", "rolled back"])
def test_agent_killed_mid_apply_completes_or_rolls_back_on_restart(outcome: str, embedded: Embedded,
                                                                   tmp_path: Path,
                                                                   started: list[Process]) -> None:
    door = Door(embedded.port)
    gw = Gateway(embedded, tmp_path)
    gw.watcher = Watcher(embedded.url, TOPICS)
    data = tmp_path / "agent"
    conf = tmp_path / "agent.toml"
    conf.write_text("apply_deadline = 3\n")
    simulated, state_file = data / "simulated.json", data / "state.json"

    def agent() -> Process:
        proc = Process(tmp_path / f"agent-{len(started)}.log", AGENT, "run", "--config", str(conf),
                       "--broker", f"mqtt://127.0.0.1:{door.port}", "--device-id", "stb-1",
                       "--device-type", "iptv-stb", "--collector", "simulated", "--data-dir", str(data))
        started.append(proc)
        return proc

    def in_force() -> dict[str, Any]:
        return json.loads(simulated.read_text()) if simulated.exists() else {}

    try:
        first = agent()  # no configurator yet: it connects and waits
        wait_until(lambda: any(t == TOPICS.device("stb-1", "status") for t, _, _ in gw.watcher.messages),
                   what="agent online")
        door.shut()
        gw.start()  # the agent registers through its open connection and gets version 1
        wait_until(lambda: "ipv4" in in_force(), what="ipv4 applied, being verified")
        first.kill()  # SIGKILL inside the apply: applied, not verified, nothing saved
        state = json.loads(state_file.read_text())
        assert state["applied_version"] == 0 and state["applying"]["config"]["version"] == 1
        assert gw.record("stb-1").state == State.CONFIGURING

        if outcome == "completed":
            door.open()
            second = agent()
            record = gw.wait_configured("stb-1")
            assert record.result.status.value == "ok"
            assert in_force()["ipv4"]["address"] == record.address
        else:  # still unreachable: the restarted agent rolls back before it goes online
            second = agent()
            wait_until(lambda: "ipv4" not in in_force(), timeout=10, what="ipv4 rolled back")
            door.open()
            record = wait_until(lambda: (r := gw.record("stb-1")).state == State.FAILED and r, timeout=15,
                                what="rolled-back result reported")
            assert record.result.status.value == "rolled_back"
        assert all(r.detail.startswith("resumed after the agent stopped while applying version 1")
                   for r in record.result.items), record.result.items
        assert json.loads(state_file.read_text())["applying"] is None
        assert f"config version 1 {outcome}" in second.output()

        if outcome == "rolled back":  # the next start applies the version again, normally
            assert second.terminate() == 0
            third = agent()
            record = gw.wait_configured("stb-1")
            assert in_force()["ipv4"]["address"] == record.address
            assert third.terminate() == 0
        else:
            assert second.terminate() == 0
    finally:
        gw.close()
        door.close()
