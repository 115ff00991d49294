"""`homenet-agent status`: what this device's agent has applied, its broker, the configurator
key it pins and whether it is connected. Only reads: it creates no directory, no key, no file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from homenet.durable import read_json
from homenet.schemas.signing import fingerprint, unb64
from homenet.settings import AgentSettings

from . import presence
from .cli import _settings, main


def agent_status(settings: AgentSettings) -> dict[str, Any]:
    data = Path(settings.data_dir)
    if not (data / "state.json").exists():
        raise click.ClickException(f"no agent state in {data} (has `homenet-agent run` used it? see --data-dir)")
    state = read_json(data / "state.json", {})
    key_file = settings.configurator_key_file or data / "configurator.pub"
    key = unb64(key_file.read_text().strip()) if key_file.exists() else None
    result = state.get("last_result") or {}
    link = presence.read(data)
    return {
        "device_id": state.get("device_id"),
        "data_dir": str(data),
        "enrolled": bool(state.get("username")),
        "applied": {"version": state.get("applied_version", 0), "epoch": state.get("config_epoch", 0),
                    "result": result.get("status"), "in_force": result.get("in_force", {})},
        "applying": bool(state.get("applying")),
        "broker": settings.broker or link["broker"],
        "configurator_key": {"fingerprint": fingerprint(key) if key else None, "file": str(key_file),
                             "provisioned": settings.configurator_key_file is not None},
        "running": link["running"], "connected": link["connected"], "since": link["since"], "pid": link["pid"],
    }


def _text(s: dict[str, Any]) -> str:
    applied = s["applied"]
    link = ("connected" if s["connected"] else "running, not connected" if s["running"] else "not running")
    lines = [
        f"device      {s['device_id'] or '-'}",
        f"agent       {link}{' since ' + s['since'] if s['since'] and s['running'] else ''}"
        f"{' (pid ' + str(s['pid']) + ')' if s['pid'] else ''}",
        f"broker      {s['broker'] or '- (found by the beacon when it runs)'}",
        f"enrolled    {'yes (own broker account)' if s['enrolled'] else 'no'}",
        f"configurator key  {s['configurator_key']['fingerprint'] or 'none pinned yet'}"
        f"{' (provisioned)' if s['configurator_key']['provisioned'] else ''}",
        f"applied     version {applied['version']}" + (f": {applied['result']}" if applied["result"] else "")
        + (" (an apply was interrupted: it resumes at start)" if s["applying"] else ""),
    ]
    lines += [f"  {k:<10} {json.dumps(v)}" for k, v in applied["in_force"].items()]
    return "\n".join(lines)


@main.command()
@click.option("--config", "-c", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def status(config: Path | None, as_json: bool, **flags: object) -> None:
    """What the agent has applied, its broker, its pinned key, whether it is connected (reads only)."""
    s = agent_status(_settings(config, **flags))
    click.echo(json.dumps(s, indent=2) if as_json else _text(s))
