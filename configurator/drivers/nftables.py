"""homenet's rules in nftables: table `inet homenet`, rendered from the desired state, applied whole.

Every rule homenet makes lives in its own table, so the gateway's other tables (its firewall,
its NAT) are never read, changed or flushed. A change is one `nft -f` transaction that creates
the table if missing, deletes it and defines it anew: the kernel commits all of it or none, so
a refused rule leaves the previous rule set in force, never half of the new one. Each rule's
comment names the device and the config item it comes from (`homenet <device> <item>`).

- port mapping: DNAT in `prerouting` on the WAN, and the matching accept in `forward`;
- QoS: in `postrouting` towards the WAN, the device's DSCP and its htb class (`htb.py`).

nftables ends a packet's fate only within one base chain: a drop in another table's forward
chain still drops a forwarded port. The gateway's own firewall must accept `ct status dnat`
traffic, as OpenWrt's and most default firewalls do (docs/gateway.md).
"""

from __future__ import annotations

from homenet.schemas.messages import GatewayState, PortMapping, QosRule

from . import htb, run

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

