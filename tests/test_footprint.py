"""The agent's memory footprint (docs/performance.md, Footprint), guarded by what it imports.

An RSS number depends on the machine; which libraries a plain `homenet-agent run` loads does
not. Each of these cost the agent megabytes it has no use for unless its settings ask for them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

NOT_LOADED = {"pyroute2", "psutil", "cryptography", "amqtt", "tinydb", "async_upnp_client", "asyncio"}


def loaded_after(code: str) -> set[str]:
    """Top-level packages imported in a fresh interpreter after running `code`."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_importing_the_agent_loads_no_heavy_library_it_may_not_need() -> None:
    loaded = loaded_after("import homenet.agent.cli, homenet.agent.service")
    assert not loaded & NOT_LOADED, f"loaded by importing the agent: {sorted(loaded & NOT_LOADED)}"


def test_a_simulated_agent_given_a_broker_loads_none_of_them_either(tmp_path: Path) -> None:
    """Building the whole agent (key made, state opened, simulated executor) as `run` does."""
    loaded = loaded_after(
        "from pathlib import Path\nfrom homenet.settings import AgentSettings\nfrom homenet.agent.app import build\n"
        f"build(AgentSettings(broker='mqtt://127.0.0.1:1', collector='simulated', device_id='fp-1', "
        f"data_dir=Path({str(tmp_path)!r})))")
    assert not loaded & NOT_LOADED, f"loaded by building a simulated agent: {sorted(loaded & NOT_LOADED)}"
