"""Whether the running agent is connected, for `homenet-agent status` (which only reads).

The agent writes `connection.json` in its data directory when it starts connecting, on every
connect and on every disconnect: its pid, the broker, connected or not, since when. A reader
checks the pid is still an agent, so an agent killed while connected is reported as not
running rather than as connected.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from homenet.durable import read_json, write_json_atomic

FILE = "connection.json"


def record(data_dir: Path, broker: str, connected: bool) -> None:
    write_json_atomic(Path(data_dir) / FILE, {"pid": os.getpid(), "broker": broker, "connected": connected,
                                             "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _running(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"homenet" in cmdline or b"python" in cmdline


def read(data_dir: Path) -> dict[str, Any]:
    """{"running", "connected", "broker", "since", "pid"}: what is true now, not what was written."""
    seen = read_json(Path(data_dir) / FILE, {})
    running = bool(seen.get("pid")) and _running(int(seen["pid"]))
    return {"running": running, "connected": running and bool(seen.get("connected")),
            "broker": seen.get("broker"), "since": seen.get("since"), "pid": seen.get("pid") if running else None}
