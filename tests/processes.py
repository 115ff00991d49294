"""Programs a test runs as real processes: output in a file, stopped by PID whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


class Process:
    """One program started by a test, its output in a file; killed by its PID at the end."""

    def __init__(self, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or said goodbye to."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def output(self) -> str:
        return self.log.read_text(errors="replace")
