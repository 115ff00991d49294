"""The agent's own state, kept across restarts and power cuts (atomic JSON file)."""

from __future__ import annotations

import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from homenet.durable import read_json, write_json_atomic


class AgentState(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device_id: str | None = None
    seq_reserved: int = 0
    applied_version: int = 0
    applied_config_id: str = ""
    config_epoch: int = 0
    """The epoch of the configurator that made the applied config: a config from an older
    epoch comes from a configurator fenced since, and is refused."""
    username: str | None = None
    password: str | None = None
    """Broker account issued at enrollment (this file is owner-only)."""
    configurator_seq: int = 0
    """The newest `seq` accepted in a live (not retained) message from the configurator."""
    beacon_epoch: int = 0
    beacon_counter: int = 0
    """The newest beacon accepted: an older (epoch, counter) is a replay and is ignored."""
    last_result: dict | None = None
    """The last `config.result` body (of the applied version, or of a version that was rolled
    back), re-sent in a fresh envelope (a new seq, so not a replay) on every connect, since
    the broker may have lost it."""
    applying: dict | None = None
    """The apply journal: written before a config's items are applied, dropped in the write that
    saves its result. `{"config_id", "config" (the config body), "checkpoint" (the executor's
    snapshot from before, safeapply.save_checkpoint)}`. Found at start, it means the agent
    stopped mid-apply: the apply is resumed, completed or rolled back (agent/service.py)."""


class StateFile:
    """Load once, then every `update` is one atomic write (two fsyncs: the file, its folder).

    `note` is for a change whose loss in a power cut is harmless: it is in `state` at once and
    reaches the disk with the next `update`, which then costs no write of its own. The
    onboarding's writes are ~1-2 ms each and most of what a new device waits for beyond the
    floor (docs/performance.md, "Single onboarding")."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "state.json"
        self._lock = threading.Lock()
        self.state = AgentState.model_validate(read_json(self.path, {}))

    def update(self, **changes: object) -> AgentState:
        with self._lock:
            state = self.state.model_copy(update=changes)
            write_json_atomic(self.path, state.model_dump(mode="json"))
            self.state = state
            return state

    def note(self, **changes: object) -> AgentState:
        with self._lock:
            self.state = self.state.model_copy(update=changes)
            return self.state
