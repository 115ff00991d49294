"""homenet's rules in nftables: table `inet homenet`, rendered from the desired state, applied whole.

Every rule homenet makes lives in its own table, so the gateway's other tables (its firewall,
its NAT) are never read, changed or flushed. A change is one `nft -f` transaction that creates
the table if missing, deletes it and defines it anew: the kernel commits all of it or none, so
a refused rule leaves the previous rule set in force, never half of the new one. Each rule's
comment names the device and the config item it comes from (`homenet <device> <item>`).

- port mapping: DNAT in `prerouting` on the WAN, and the matching accept in `forward`;
- QoS: in `postrouting` towards the WAN, the device's DSCP and its htb class (`htb.py`).

`listed` reads the table back (`nft -j`) for reconciliation: what is really in force, whoever
changed it since.

nftables ends a packet's fate only within one base chain: a drop in another table's forward
chain still drops a forwarded port. The gateway's own firewall must accept `ct status dnat`
traffic, as OpenWrt's and most default firewalls do (docs/gateway.md).
"""

from __future__ import annotations

import json
from typing import Any

from homenet.schemas.messages import DSCP, GatewayState, PortMapping, QosClass, QosRule

from . import GatewayError, htb, run

FAMILY, TABLE = "inet", "homenet"


def _comment(device_id: str, item: str) -> str:
    return f'comment "homenet {device_id} {item}"'


def _dnat(m: PortMapping, wan: str) -> str:
    return (f'iifname "{wan}" {m.protocol} dport {m.external_port} counter '
            f'dnat ip to {m.internal_address}:{m.internal_port} '
            + _comment(m.device_id, f"port_mapping:{m.protocol}/{m.external_port}"))


def _forward(m: PortMapping, wan: str) -> str:
    return (f'iifname "{wan}" ip daddr {m.internal_address} {m.protocol} dport {m.internal_port} '
            f'ct status dnat counter accept ' + _comment(m.device_id, f"port_mapping:{m.protocol}/{m.external_port}"))


def _mark(q: QosRule, wan: str) -> str:
    return (f'oifname "{wan}" ip saddr {q.address} counter ip dscp set {q.dscp} '
            f'meta priority set {htb.classid(q.qos_class)} ' + _comment(q.device_id, "qos"))


def _chain(name: str, kind: str, hook: str, priority: str, rules: list[str]) -> str:
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return f"\tchain {name} {{\n\t\ttype {kind} hook {hook} priority {priority}; policy accept;\n{body}\t}}\n"


def render(state: GatewayState, wan: str) -> str:
    """The whole `nft -f` transaction for `state`; with nothing to set, the table is removed."""
    script = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
    mappings, qos = state.port_mappings, state.qos
    if not mappings and not qos:
        return script
    chains = []
    if mappings:
        chains.append(_chain("port_forward", "nat", "prerouting", "dstnat", [_dnat(m, wan) for m in mappings]))
        chains.append(_chain("port_accept", "filter", "forward", "filter", [_forward(m, wan) for m in mappings]))
    if qos:
        chains.append(_chain("qos_mark", "filter", "postrouting", "mangle", [_mark(q, wan) for q in qos]))
    return script + f"table {FAMILY} {TABLE} {{\n{''.join(chains)}}}\n"


def apply(script: str) -> None:
    """One atomic transaction; GatewayError with nft's message when it is refused."""
    run("nft", "-f", "-", input=script)


def listed(wan: str) -> tuple[list[PortMapping], list[QosRule]]:
    """The port mappings and QoS rules in force now; none when the table is gone."""
    try:
        listing = _json("list", "table", FAMILY, TABLE)
    except GatewayError:
        if any(e.get("table", {}).get("name") == TABLE for e in _json("list", "tables", FAMILY)):
            raise
        return [], []
    return read([e["rule"] for e in listing if "rule" in e], wan)


def _json(*args: str) -> list[dict[str, Any]]:
    out = run("nft", "-j", *args)
    try:
        return json.loads(out)["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise GatewayError(f"unreadable output of `nft -j {' '.join(args)}`: {exc}") from None


def read(rules: list[dict[str, Any]], wan: str) -> tuple[list[PortMapping], list[QosRule]]:
    """Parse the rules of `nft -j list table` back into what `render` writes. A port mapping is
    in force when its DNAT and its accept both are; a QoS mark when its DSCP selects the
    matching htb class. A rule of any other shape (edited by hand) is not one of homenet's."""
    dnats: list[PortMapping] = []
    accepts: set[tuple[str, str, str, int]] = set()
    qos: list[QosRule] = []
    for rule in rules:
        try:
            words = rule.get("comment", "").split()
            device = words[1] if len(words) == 3 and words[0] == "homenet" else None
            facts = _facts(rule["expr"])
            protocol = next((p for p in ("tcp", "udp") if f"{p} dport" in facts), None)
            to_wan = facts.get("oifname" if rule["chain"] == "qos_mark" else "iifname") == wan
            if device is None or not to_wan:
                continue
            if rule["chain"] == "port_forward" and protocol and "dnat" in facts:
                address, port = facts["dnat"]
                dnats.append(PortMapping(device_id=device, protocol=protocol, external_port=facts[f"{protocol} dport"],
                                         internal_address=address, internal_port=port))
            elif rule["chain"] == "port_accept" and protocol and "accept" in facts:
                accepts.add((device, protocol, facts.get("ip daddr"), facts[f"{protocol} dport"]))
            elif rule["chain"] == "qos_mark" and (qos_class := _CLASS.get(_dscp(facts.get("ip dscp")))):
                if facts.get("priority") == htb.classid(qos_class):
                    qos.append(QosRule(device_id=device, address=facts["ip saddr"], qos_class=qos_class,
                                       dscp=DSCP[qos_class]))
        except (KeyError, TypeError, ValueError):  # pydantic's ValidationError is a ValueError
            continue
    return [m for m in dnats if (m.device_id, m.protocol, str(m.internal_address), m.internal_port) in accepts], qos


_CLASS: dict[int, QosClass] = {dscp: qos_class for qos_class, dscp in DSCP.items()}


def _facts(expr: list[dict[str, Any]]) -> dict[str, Any]:
    """A rule's matches and statements by name: `iifname`, `tcp dport`, `ip daddr`, `dnat`,
    `ip dscp`, `priority`, `accept`."""
    facts: dict[str, Any] = {}
    for statement in expr:
        for verb, arg in statement.items():
            if verb == "match":
                facts[_name(arg["left"])] = arg["right"]
            elif verb == "mangle":
                facts[_name(arg["key"])] = arg["value"]
            elif verb == "dnat":
                facts["dnat"] = (arg.get("addr"), arg.get("port"))
            elif verb == "accept":
                facts["accept"] = True
    return facts


def _name(expr: dict[str, Any]) -> str:
    if "meta" in expr:
        return expr["meta"]["key"]
    if "payload" in expr:
        return f'{expr["payload"]["protocol"]} {expr["payload"]["field"]}'
    return json.dumps(expr, sort_keys=True)


def _dscp(value: Any) -> int | None:
    """nft prints well-known code points by name: `cs4`, `af41`, `ef`."""
    if isinstance(value, int):
        return value
    text = str(value)
    if text == "ef":
        return 46
    if text.startswith("cs") and text[2:].isdigit():
        return 8 * int(text[2:])
    if text.startswith("af") and len(text) == 4 and text[2:].isdigit():
        return 8 * int(text[2]) + 2 * int(text[3])
    return None
