"""Whether the running agent is connected, for `homenet-agent status` (which only reads).

The agent writes `connection.json` in its data directory when it starts connecting, on every
connect and on every disconnect: its pid and the process's start time, the broker, connected
or not, since when. A reader checks that this very process still runs (a reused pid has
another start time), so an agent killed while connected is reported as not running rather
than as connected.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from homenet.durable import read_json, write_json_atomic

FILE = "connection.json"


def _started(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); read from
    /proc rather than with psutil, which the agent does not load for this."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def record(data_dir: Path, broker: str, connected: bool) -> None:
    write_json_atomic(Path(data_dir) / FILE, {
        "pid": os.getpid(), "started": _started(os.getpid()), "broker": broker, "connected": connected,
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def read(data_dir: Path) -> dict[str, Any]:
    """{"running", "connected", "broker", "since", "pid"}: what is true now, not what was written."""
    seen = read_json(Path(data_dir) / FILE, {})
    running = bool(seen.get("pid")) and _started(int(seen["pid"])) == seen.get("started")
    return {"running": running, "connected": running and bool(seen.get("connected")),
            "broker": seen.get("broker"), "since": seen.get("since"), "pid": seen.get("pid") if running else None}
