"""The agent's memory footprint (docs/performance.md, Footprint), guarded by what it imports.

An RSS number depends on the machine; which libraries a plain `homenet-agent run` loads does
not. Each of these cost the agent megabytes it has no use for unless its settings ask for them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NOT_LOADED = {"pyroute2", "psutil", "cryptography", "amqtt", "tinydb", "async_upnp_client", "asyncio"}


def loaded_after(code: str) -> set[str]:
    """Top-level packages imported in a fresh interpreter after running `code`."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_importing_the_agent_loads_no_heavy_library_it_may_not_need() -> None:
    loaded = loaded_after("import homenet.agent.cli, homenet.agent.service")
    assert not loaded & NOT_LOADED, f"loaded by importing the agent: {sorted(loaded & NOT_LOADED)}"


@pytest.mark.parametrize("collector", ["simulated", "linux"])
def test_an_agent_given_a_broker_loads_none_of_them_until_it_applies_something(tmp_path: Path,
                                                                               collector: str) -> None:
    """Building the whole agent as `run` does: key made, state opened, executor chosen (`auto`:
    iproute2 or NetworkManager for `linux`, inside the UPnP wrapper). Only the linux collector
    needs psutil; pyroute2 and asyncio wait for the first item to apply."""
    loaded = loaded_after(
        "from pathlib import Path\nfrom homenet.settings import AgentSettings\nfrom homenet.agent.app import build\n"
        f"build(AgentSettings(broker='mqtt://127.0.0.1:1', collector={collector!r}, device_id='fp-1', "
        f"data_dir=Path({str(tmp_path)!r})))")
    unexpected = loaded & (NOT_LOADED - {"psutil"} if collector == "linux" else NOT_LOADED)
    assert not unexpected, f"loaded by building a {collector} agent: {sorted(unexpected)}"
