"""The owner's commands (registered on `homenet`): `devices list/show` read the configuration
database; `devices approve/reject/pair/reset/forget/replace` and `users add/remove` go to the
running configurator on its command channel (configurator/commands.py) and print its reply.

Apart from cli.py, which runs the gateway's processes: these only talk to what is running.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from homenet.settings import GatewaySettings

from .app import db_path
from .cli import CONFIG, DATA_DIR, _load, _local_broker, main
from .table import device_detail, device_json, device_table


@main.group()
def devices() -> None:
    """Read the configuration database."""


def _store(config: Path | None, data_dir: Path | None) -> Any:
    from .store import SqliteStore, StoreError

    settings: GatewaySettings = _load(GatewaySettings, config, **{"configurator.data_dir": data_dir})
    path = db_path(settings.configurator.data_dir)
    try:
        if not path.exists():
            raise click.ClickException(f"no configuration database at {path} (use --data-dir or --config)")
        return SqliteStore(path, read_only=True)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except PermissionError:  # exists() itself fails in a directory one may not enter
        raise _unreadable(path) from None


def _unreadable(path: Path) -> click.ClickException:
    return click.ClickException(f"cannot read {path}: permission denied (run it as the gateway's user or root)")


JSON = click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")


@devices.command("list")
@CONFIG
@DATA_DIR
@JSON
def devices_list(config: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """One line per device: state, address, QoS, port mappings."""
    records = _store(config, data_dir).all()
    click.echo(json.dumps([device_json(r) for r in records], indent=2) if as_json else device_table(records))


@devices.command("show")
@click.argument("device_id")
@CONFIG
@DATA_DIR
@JSON
def devices_show(device_id: str, config: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Everything known about one device."""
    from .cloudstate import cloud_detail

    store = _store(config, data_dir)
    record = store.get(device_id)
    if record is None:
        raise click.ClickException(f"no device {device_id!r} in the database")
    if as_json:
        click.echo(json.dumps(device_json(record), indent=2))
        return
    click.echo(device_detail(record))
    if cloud := cloud_detail(store.path.parent, device_id):
        click.echo(cloud)


BROKER = click.option("--broker", help="Broker of the running configurator (default: from the settings, "
                      "as the configurator finds it).")


def _checked(what: str) -> Any:
    """A click callback: the argument is a safe topic level (device ids and user names are)."""

    def check(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
        from homenet.schemas.topics import TopicError, check_device_id

        try:
            return check_device_id(value)
        except TopicError:
            raise click.ClickException(f"{what} {value!r} is not valid: 1-63 of A-Z a-z 0-9 . _ -, "
                                       "starting with a letter or digit") from None

    return check


def _device_command(op: str, done: str, help_text: str) -> None:
    """`homenet devices OP DEVICE_ID`, sent to the running configurator."""

    @devices.command(op, help=help_text)
    @click.argument("device_id", callback=_checked("device id"))
    @CONFIG
    @DATA_DIR
    @BROKER
    def run(device_id: str, config: Path | None, data_dir: Path | None, broker: str | None) -> None:
        from homenet.schemas.messages import Command

        reply = _command(config, data_dir, broker, Command(op=op, device_id=device_id))
        address = reply.result.get("address")
        click.echo(f"{done} {device_id}" + (f" ({address})" if address else ""))


_device_command("forget", "forgot", "Remove a device and everything set for it on the gateway.")
_device_command("approve", "approved", "Let a device waiting for approval in (enrollment 'approve').")
_device_command("reject", "rejected", "Refuse a device waiting for approval; it stays refused.")
_device_command("reset", "reset", "Unbind a device's key (e.g. reinstalled): its next registration binds a new one.")


@devices.command("replace")
@click.argument("device_id", callback=_checked("device id"))
@click.argument("predecessor", callback=_checked("device id"))
@CONFIG
@DATA_DIR
@BROKER
def devices_replace(device_id: str, predecessor: str, config: Path | None, data_dir: Path | None,
                    broker: str | None) -> None:
    """DEVICE_ID, a new unit of the same model, takes the place of PREDECESSOR (forgotten):
    its address and port forwards."""
    from homenet.schemas.messages import Command

    reply = _command(config, data_dir, broker, Command(op="replace", device_id=device_id, predecessor=predecessor))
    click.echo(f"{device_id} took the place of {predecessor} ({reply.result.get('address') or 'no address'})")


@devices.command("pair")
@click.argument("code")
@CONFIG
@DATA_DIR
@BROKER
def devices_pair(code: str, config: Path | None, data_dir: Path | None, broker: str | None) -> None:
    """Let in the waiting device that shows this pairing code (enrollment 'pairing-code'):
    229-670 or 229670."""
    from homenet.schemas.messages import Command
    from homenet.schemas.signing import canonical_pairing_code

    try:
        code = canonical_pairing_code(code)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    reply = _command(config, data_dir, broker, Command(op="pair", code=code))
    click.echo(f"paired {reply.result['device_id']}")


@main.group()
def users() -> None:
    """Operator accounts on the gateway's broker (e.g. for mosquitto_sub)."""


@users.command("add")
@click.argument("name", callback=_checked("user name"))
@click.option("--read-only", is_flag=True, help="Publishes nothing; reads every topic under the root but the "
              "devices' register/reply and the command replies (they carry passwords).")
@CONFIG
@DATA_DIR
@BROKER
def users_add(name: str, read_only: bool, config: Path | None, data_dir: Path | None, broker: str | None) -> None:
    """Create (or renew) an operator account; prints its password once."""
    from homenet.schemas.messages import Command

    reply = _command(config, data_dir, broker, Command(op="user.add", user=name, read_only=read_only))
    click.echo(f"{reply.result['role']} account {name}, password: {reply.result['password']}")


@users.command("remove")
@click.argument("name", callback=_checked("user name"))
@CONFIG
@DATA_DIR
@BROKER
def users_remove(name: str, config: Path | None, data_dir: Path | None, broker: str | None) -> None:
    """Remove an operator account."""
    from homenet.schemas.messages import Command

    _command(config, data_dir, broker, Command(op="user.remove", user=name))
    click.echo(f"removed {name}")


def _command(config: Path | None, data_dir: Path | None, broker: str | None, command: Any) -> Any:
    from .app import ADMIN, ADMIN_SECRET
    from .operator import operator_key, send_command

    settings: GatewaySettings = _load(GatewaySettings, config, **{"configurator.broker": broker,
                                                                  "configurator.data_dir": data_dir})
    conf = settings.configurator
    # where the configurator itself connects: `configurator run` to its `broker`, `gateway run`
    # to its own first listener
    url = conf.broker if "broker" in conf.model_fields_set else _local_broker(settings.broker)
    secret = conf.data_dir / ADMIN_SECRET  # present on the gateway itself
    try:
        login = (ADMIN, secret.read_text().strip()) if secret.exists() else None
    except PermissionError:
        raise _unreadable(secret) from None
    try:
        key = operator_key(conf.data_dir)
    except PermissionError as exc:
        raise _unreadable(Path(exc.filename or conf.data_dir)) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        reply = send_command(url, command, conf.root, login, key=key,
                             cafile=conf.broker_cafile or conf.data_dir / "broker-cert.pem")
    except (ConnectionError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    if not reply.ok:
        raise click.ClickException(f"{command.op} {command.device_id or command.user or command.code}: {reply.error}")
    return reply
