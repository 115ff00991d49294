"""The WAN's htb priority classes: a fixed tree, one class per traffic class.

The tree does not depend on the devices; nftables puts each device's packets in its class by
setting their priority (`meta priority set 4e48:20`), which htb honours when the major number
is the qdisc's handle. The handle 4e48: marks the root qdisc as homenet's: a root qdisc with
any other explicit handle is someone else's and is left alone.
"""

from __future__ import annotations

import json
import re

from homenet.schemas.messages import QosClass

from . import GatewayError, run

MAJOR = "4e48"
DEFAULT_MINOR = 30

# minor -> (share of the uplink in percent, htb prio: lower is served first)
CLASSES: dict[int, tuple[int, int]] = {0x10: (10, 0), 0x20: (40, 1), 0x30: (40, 2), 0x40: (10, 3)}
MINOR: dict[QosClass, int] = {
    QosClass.VOICE: 0x10, QosClass.VIDEO: 0x20, QosClass.INTERACTIVE: 0x20,
    QosClass.BEST_EFFORT: 0x30, QosClass.BULK: 0x40}


def classid(qos_class: QosClass) -> str:
    return f"{MAJOR}:{MINOR[qos_class]:x}"


def commands(wan: str, rate_kbit: int) -> list[list[str]]:
    """The tc commands that build the tree; `replace` makes each one idempotent."""
    rate = f"{rate_kbit}kbit"
    tree = [["qdisc", "replace", "dev", wan, "root", "handle", f"{MAJOR}:", "htb", "default", f"{DEFAULT_MINOR:x}"],
            ["class", "replace", "dev", wan, "parent", f"{MAJOR}:", "classid", f"{MAJOR}:1",
             "htb", "rate", rate, "ceil", rate]]
    for minor, (share, prio) in CLASSES.items():
        tree.append(["class", "replace", "dev", wan, "parent", f"{MAJOR}:1", "classid", f"{MAJOR}:{minor:x}",
                     "htb", "rate", f"{max(rate_kbit * share // 100, 8)}kbit", "ceil", rate, "prio", str(prio)])
    return tree


def classes(wan: str) -> set[str]:
    """The htb class ids on `wan` (`tc -j class show` prints text for htb in iproute2 6.1)."""
    return set(re.findall(r"^class htb (\S+)", run("tc", "class", "show", "dev", wan), re.MULTILINE))


def ensure(wan: str, rate_kbit: int) -> None:
    """Install the tree on the WAN unless it is there; refuse to replace another root qdisc."""
    try:
        root = next((q for q in json.loads(run("tc", "-j", "qdisc", "show", "dev", wan) or "[]") if q.get("root")), {})
    except ValueError as exc:
        raise GatewayError(f"cannot read the qdiscs of {wan}: {exc}") from None
    handle = root.get("handle", "0:")
    if handle not in ("0:", f"{MAJOR}:"):
        raise GatewayError(f"the root qdisc of {wan} ({root.get('kind')} {handle}) is not homenet's; "
                           "left alone, so traffic is marked but not prioritised")
    if handle == f"{MAJOR}:" and {f"{MAJOR}:1", *(f"{MAJOR}:{m:x}" for m in CLASSES)} <= classes(wan):
        return
    for args in commands(wan, rate_kbit):
        run("tc", *args)
