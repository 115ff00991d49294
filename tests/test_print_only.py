"""Commands that only print write nothing: no directory, no key, no state file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .test_cli import AGENT


def test_agent_info_creates_no_data_directory_key_or_state(tmp_path: Path) -> None:
    missing, empty = tmp_path / "never-made", tmp_path / "empty"
    empty.mkdir()
    for data_dir in (missing, empty):
        out = subprocess.run([AGENT, "info", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["device_id"].startswith("hn-") or info["device_id"]
        assert info["public_key"] is None, "no key exists before the first run"
    assert not missing.exists()
    assert list(empty.iterdir()) == []


def test_agent_info_shows_the_key_a_run_made(tmp_path: Path) -> None:
    from homenet.keys import KeyPair, b64

    key = KeyPair.load_or_create(tmp_path / "agent.key")
    out = subprocess.run([AGENT, "info", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["public_key"] == b64(key.public)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.key"]
