"""The agent's state file: every `update` is durable at once; a `note` (a change whose loss in a
power cut is harmless) costs no write and reaches the disk with the next `update`."""

from __future__ import annotations

import json
from pathlib import Path

from homenet.agent.state import StateFile


def test_a_note_is_seen_at_once_and_written_with_the_next_update(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    state.update(device_id="stb-1")
    state.note(configurator_seq=7)
    assert state.state.configurator_seq == 7
    assert json.loads((tmp_path / "state.json").read_text())["configurator_seq"] == 0  # not written
    assert StateFile(tmp_path).state.configurator_seq == 0  # a power cut now: the note is gone

    state.update(applied_version=1)
    on_disk = StateFile(tmp_path).state
    assert (on_disk.configurator_seq, on_disk.applied_version) == (7, 1)
