"""Read commands for scripts and people: `users list`, `watch` (registered on `homenet`'s groups).

Apart from cli.py so that the commands that change things and the ones that only read stay
small; every read command takes `--json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from homenet.acl import Role
from homenet.settings import GatewaySettings

from .cli import CONFIG, DATA_DIR, _load, local_url, main
from .cli_operator import BROKER, JSON, users


def echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _accounts_file(settings: GatewaySettings) -> Path:
    conf = settings.configurator
    return conf.accounts_file or settings.broker.accounts_file or conf.data_dir / "broker-accounts.json"


@users.command("list")
@CONFIG
@DATA_DIR
@JSON
def users_list(config: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """The operator accounts (operator: may act; reader: read-only), from the accounts file."""
    from homenet.accounts import Accounts

    settings: GatewaySettings = _load(GatewaySettings, config, **{"configurator.data_dir": data_dir})
    if settings.configurator.dynsec_admin:
        raise click.ClickException("the accounts are in Mosquitto's dynamic security: "
                                   "mosquitto_ctrl dynsec listClients")
    path = _accounts_file(settings)
    if not path.exists():
        raise click.ClickException(f"no accounts file at {path} (use --data-dir or --config)")
    people = [a for a in Accounts(path).all() if a.role in (Role.OPERATOR, Role.READER)]
    if as_json:
        echo_json([{"name": a.name, "role": a.role.value, "read_only": a.role == Role.READER} for a in people])
    elif not people:
        click.echo("no operator accounts yet: homenet users add NAME [--read-only]")
    else:
        from .table import render

        click.echo(render([(a.name, a.role.value, "yes" if a.role == Role.READER else "no") for a in people],
                          ("NAME", "ROLE", "READ-ONLY")))


@main.command("watch")
@CONFIG
@DATA_DIR
@BROKER
@click.option("--raw", is_flag=True, help="One JSON object per line (topic, retained, payload), for jq.")
@click.option("--device", "device_id", help="Only this device's topics (and events about it).")
@click.option("--count", type=click.IntRange(min=0), default=0, help="Stop after N messages (0: never).")
@click.option("--user", help="Log in as this operator account (default: the gateway's local one).")
@click.option("--password", envvar="HOMENET_PASSWORD", help="Its password (or $HOMENET_PASSWORD).")
@click.option("--color/--no-color", default=None, help="Colour (default: when writing to a terminal).")
def watch_command(config: Path | None, data_dir: Path | None, broker: str | None, raw: bool, device_id: str | None,
                  count: int, user: str | None, password: str | None, color: bool | None) -> None:
    """Every message of the homenet tree as it arrives, readable: kind, device, body (no signatures)."""
    from .app import ADMIN, ADMIN_SECRET
    from .watch import format_line, raw_line, watch

    settings: GatewaySettings = _load(GatewaySettings, config, **{"configurator.data_dir": data_dir})
    root = settings.configurator.root
    url = broker or local_url(settings.broker.listeners[0])
    secret = settings.configurator.data_dir / ADMIN_SECRET
    login = (user, password or "") if user else (ADMIN, secret.read_text().strip()) if secret.exists() else None
    colour = sys.stdout.isatty() if color is None else color
    tree = f"{root}/#"

    def show(topic: str, payload: bytes, retained: bool) -> bool:
        if device_id and f"/device/{device_id}/" not in topic + "/" and device_id.encode() not in payload:
            return False
        click.echo(raw_line(topic, payload, retained) if raw else format_line(topic, payload, retained, root, colour),
                   color=colour)
        return True

    try:
        watch(url, tree, login, settings.configurator.data_dir / "broker-cert.pem", show, count)
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
