"""Nothing is lost across restarts: the configurator's database and the agent's state persist,
versions continue, and a device that was away gets its config when it comes back."""

from __future__ import annotations

from homenet.configurator.lifecycle import State
from homenet.configurator.store import StoreError
from homenet.settings import LanSettings

from .harness import Gateway, wait_until


def test_configurator_restart_mid_way_loses_nothing(gateway: Gateway) -> None:
    gateway.agent("nas")
    before = gateway.wait_configured("test-nas")
    epoch = gateway.configurator.epoch

    gateway.stop()
    late = gateway.agent("camera")  # arrives while no configurator is online: it waits
    wait_until(lambda: late.client.is_connected(), what="late agent connected")
    assert not late.registered.is_set()

    gateway.start()
    assert gateway.configurator.epoch == epoch + 1
    gateway.wait_configured("test-camera")
    after = gateway.record("test-nas")
    assert (after.version, after.address, after.state) == (before.version, before.address, State.CONFIGURED)
    assert after.first_seen == before.first_seen


def test_agent_restart_keeps_its_state_and_does_not_reapply(gateway: Gateway) -> None:
    agent = gateway.agent("iptv-stb")
    record = gateway.wait_configured("test-iptv-stb")
    seq_before = agent.state.state.seq_reserved
    gateway.stop_agent(agent)
    wait_until(lambda: not gateway.record("test-iptv-stb").online, what="offline status")

    again = gateway.agent("iptv-stb")
    wait_until(again.registered.is_set, what="re-registration")
    wait_until(lambda: gateway.record("test-iptv-stb").online, what="online status")
    assert again.state.state.applied_version == 1
    assert again.state.state.seq_reserved > seq_before, "sequence numbers continue, never reused"
    after = gateway.record("test-iptv-stb")
    assert (after.version, after.address, after.state) == (1, record.address, State.CONFIGURED)
    assert not [e for e in gateway.watcher.events() if e["event"] == "message.rejected"]


def test_an_agent_that_was_offline_gets_its_new_config_on_reconnect(gateway: Gateway) -> None:
    agent = gateway.agent("game-console")
    first = gateway.wait_configured("test-game-console")
    gateway.stop_agent(agent)

    # The gateway comes back with another LAN while the device is away: it is re-planned.
    gateway.stop()
    gateway.lan = LanSettings(subnet="10.20.0.0/24", gateway="10.20.0.1",
                              pool_start="10.20.0.100", pool_end="10.20.0.200")
    gateway.start()
    replanned = wait_until(lambda: (r := gateway.record("test-game-console")).version == 2 and r,
                           what="version 2 planned")
    assert replanned.state == State.CONFIGURING and replanned.address.startswith("10.20.0.")

    back = gateway.agent("game-console")
    record = gateway.wait_configured("test-game-console", version=2)
    assert back.executor.in_force()["ipv4"]["address"] == record.address != first.address


def test_while_the_database_cannot_be_written_nothing_is_answered_and_nothing_is_lost(gateway: Gateway) -> None:
    """A full disk: the batch is not committed, so no reply, config or PUBACK leaves; once the
    disk is back the same messages are handled and the device is configured."""
    configurator = gateway.configurator
    real_write = configurator.store._write
    disk = {"full": True}

    def write(devices, meta_keys):
        if disk["full"] and devices:
            raise StoreError(f"cannot write {configurator.store.path}: database or disk is full")
        real_write(devices, meta_keys)

    configurator.store._write = write
    gateway.agent("nas")
    gateway.watcher.wait_event("store.failed", reason="disk is full")
    gateway.watcher.wait_event("store.failed", reason="retrying in 1.0 s")  # the same batch, again
    assert gateway.record("test-nas") is None
    sent = [t for t, _, _ in gateway.watcher.messages if "/device/test-nas/" in t]
    assert not [t for t in sent if t.endswith(("/register/reply", "/config"))], sent

    disk["full"] = False
    record = gateway.wait_configured("test-nas")
    assert record.address and record.version == 1
