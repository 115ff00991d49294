"""Device tables and detail views an operator can read in a terminal."""

from __future__ import annotations

from typing import Any

from homenet.schemas.messages import IgmpItem, ItemResult, ItemStatus, PortMappingItem, QosItem

from .records import DeviceRecord

COLUMNS = ("DEVICE", "TYPE", "STATE", "ONLINE", "VER", "ADDRESS", "QOS", "PORTS", "IGMP", "GATEWAY")


def _row(r: DeviceRecord) -> tuple[str, ...]:
    items = r.config.items if r.config else []
    qos = next((f"{i.qos_class.value}/{i.dscp}" for i in items if isinstance(i, QosItem)), "-")
    ports = ",".join(f"{i.protocol}/{i.external_port}->{i.internal_port}"
                     for i in items if isinstance(i, PortMappingItem)) or "-"
    failed = [x.item for x in r.gateway if x.status == ItemStatus.FAILED]
    igmp = "on" if any(isinstance(i, IgmpItem) and i.enabled for i in items) else "-"
    if igmp == "on" and "igmp" in failed:
        igmp = "failed"
    gateway = f"failed: {','.join(failed)}" if failed else ("ok" if r.gateway else "-")
    return (r.device_id, r.info.device_type, r.state.value, "yes" if r.online else "no",
            str(r.version or "-"), r.address or "-", qos, ports, igmp, gateway)


def render(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in (header, *rows))


def device_table(records: list[DeviceRecord]) -> str:
    if not records:
        return "no devices registered yet"
    return render([_row(r) for r in records], COLUMNS)


def _item_lines(results: list[ItemResult]) -> list[str]:
    return [f"  {x.item:<24} {x.status.value}{' - ' + x.detail if x.detail else ''}" for x in results]


def device_json(r: DeviceRecord) -> dict[str, Any]:
    """The record for scripts: everything but the raw signed config payload (the config is there parsed)."""
    return {**r.model_dump(mode="json", exclude={"config_payload"}), "address": r.address or None,
            "version": r.version}


def device_detail(r: DeviceRecord) -> str:
    lines = [
        f"device      {r.device_id}",
        f"type        {r.info.device_type} (profile {r.profile or '-'})",
        f"model       {r.info.model or '-'}",
        f"hostname    {r.info.hostname or '-'}",
        f"state       {r.state.value}{' - ' + r.error if r.error else ''}",
        f"online      {'yes' if r.online else 'no'}",
        f"first seen  {r.first_seen}",
        f"updated     {r.updated}",
        "interfaces",
        *(f"  {i.name:<10} {i.mac or '-':<17} {'up' if i.up else 'down':<4} {' '.join(i.addresses)}"
          for i in r.info.interfaces),
    ]
    if r.config:
        lines.append(f"config      version {r.config.version}")
        lines += [f"  {i.target.value:<8} {i.model_dump_json(exclude={'target'})}" for i in r.config.items]
    if r.result:
        lines.append(f"result      version {r.result.version}: {r.result.status.value}")
        lines += _item_lines(r.result.items)
    if r.gateway:
        lines.append("gateway     " + ("failed" if any(x.status == ItemStatus.FAILED for x in r.gateway) else "ok"))
        lines += _item_lines(r.gateway)
    return "\n".join(lines)
