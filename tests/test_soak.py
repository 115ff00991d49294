"""bench/soak.py keeps working: a short soak on the embedded broker, with a fixed seed so that
CI sees the same schedule every time. The real run is 10 minutes (docs/soak.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_a_short_soak_runs_its_faults_and_holds_its_invariants() -> None:
    done = subprocess.run([sys.executable, str(SOAK), "--duration", "15", "--devices", "3", "--interval", "1.5",
                           "--settle", "45", "--seed", "11", "--timeline", "0"],
                          capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "result: OK" in done.stdout
    assert "actions in 15 s: 0 " not in done.stdout, done.stdout
