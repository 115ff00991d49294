"""The cost of RFC 8785 signing bytes (rfc8785, pure Python) against the json.dumps form they
replaced, per message kind, in this process: `python bench/canonical.py`.

Each figure is the time of one call, from batches of 100 calls (median and p99 of 300
batches), with the load average beside it; docs/performance.md records a run.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from homenet.schemas import canonical, encode
from homenet.schemas.messages import BODIES
from homenet.schemas.testvectors import valid_cases

BATCH, BATCHES = 100, 300


def per_call(fn) -> tuple[float, float]:
    times = []
    for _ in range(BATCHES):
        start = time.perf_counter()
        for _ in range(BATCH):
            fn()
        times.append((time.perf_counter() - start) / BATCH * 1e6)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.2f}; microseconds per call, median / p99")
    for case in valid_cases():
        if case["name"] not in ("register", "config", "config.result"):
            continue
        obj = {k: v for k, v in json.loads(case["payload"]).items() if k != "sig"}
        old = per_call(lambda: json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
        new = per_call(lambda: canonical(obj))
        body = BODIES[case["name"]].model_validate(obj["body"])
        sent = per_call(lambda: encode(case["name"], body, sender="bench", seq=1, sign=lambda b: b"\0" * 64))
        print(f"{case['name']:14} {len(case['canonical']):4} B  json.dumps {old[0]:5.1f} / {old[1]:5.1f}   "
              f"RFC 8785 {new[0]:5.1f} / {new[1]:5.1f} ({new[0] / old[0]:.1f}x)   whole encode {sent[0]:5.1f} / "
              f"{sent[1]:5.1f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
