"""Where the agent's resident memory goes: RSS of one interpreter as its libraries load, layer by layer.

    .venv/bin/python bench/agent_memory.py

`homenet bench storm` measures the whole agent (VmRSS 3 s after it confirmed its config); this
splits that number by what is imported, in the order the agent needs them, so each line is
what that layer adds on top of the ones above (a library shared with an earlier layer, e.g.
libcrypto for hashlib and ssl, is counted once, where it is first loaded). "file" is the part
mapped from shared libraries (shared with other processes using the same files, but counted in
every process's RSS); "anon" is the process's own memory: Python objects, module code, heaps.
Results are in docs/performance.md (Footprint).
"""

from __future__ import annotations

import re

LAYERS = [
    ("interpreter + site (a venv; an editable install adds its import finder)", ""),
    ("paho-mqtt (+ ssl, urllib.request, http.client, email; libssl, libcrypto)", "import paho.mqtt.client"),
    ("pydantic + pydantic-core", "from pydantic import AwareDatetime, BaseModel, Field, IPvAnyAddress"),
    ("PyNaCl (cffi, libsodium)", "import nacl.signing"),
    ("click", "import click"),
    ("homenet wire contract (homenet.schemas: the models, the envelope)", "import homenet.schemas"),
    ("homenet settings and agent modules", "import homenet.agent.cli, homenet.agent.service"),
]


def memory() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, in kB."""
    status = open("/proc/self/status").read()
    return {key: int(re.search(key + r":\s+(\d+)", status).group(1)) for key in ("VmRSS", "RssAnon", "RssFile")}


def main() -> None:
    before = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    for name, code in LAYERS:
        exec(code)
        now = memory()
        added = {key: now[key] - before[key] for key in now}
        print(f"{name:75s} {added['VmRSS']:+7d} kB (anon {added['RssAnon']:+6d}, file {added['RssFile']:+6d})"
              f"  total {now['VmRSS']} kB")
        before = now


if __name__ == "__main__":
    main()
