"""`homenet`: the gateway side (broker, configurator, operator commands, demo, bench)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import click

from homenet import logs
from homenet.settings import (ConfiguratorSettings, GatewaySettings, SettingsError, load)

from .app import db_path
from .table import device_detail, device_table

CONFIG = click.option("--config", "-c", type=click.Path(path_type=Path, dir_okay=False),
                      help="TOML settings file.")
DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False),
                        help="Directory of the configuration database.")
VERBOSE = click.option("--verbose", "-v", is_flag=True)


def _load(model: Any, config: Path | None, **flags: object) -> Any:
    try:
        return load(model, config, flags)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def local_url(bind: str) -> str:
    """The URL a co-located process uses to reach a listener bound to `bind` (host:port)."""
    host, port = bind.rsplit(":", 1)
    return f"mqtt://[::1]:{port}" if ":" in host else f"mqtt://127.0.0.1:{port}"


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _until_signal_or(died: Any, message: str) -> None:
    """Until SIGINT/SIGTERM or until `died` (a child the gateway needs) returns; then a
    ClickException with `message` formatted with what it returned."""
    signalled = asyncio.ensure_future(_until_signal())
    child = asyncio.ensure_future(died)
    done, _ = await asyncio.wait({signalled, child}, return_when=asyncio.FIRST_COMPLETED)
    for task in (signalled, child):
        task.cancel()
    if child in done and not child.cancelled():
        raise click.ClickException(message.format(child.result()))


@click.group()
@click.version_option(package_name="homenet")
def main() -> None:
    """homenet gateway: IEC 62608 configurator and embedded MQTT broker."""


@main.group()
def gateway() -> None:
    """The home gateway appliance: broker and configurator together."""


@gateway.command("run")
@CONFIG
@DATA_DIR
@click.option("--listen", multiple=True, help="Plain MQTT listener bind, e.g. ':::1883' (repeatable).")
@click.option("--tls-listen", "tls_listen", multiple=True,
              help="TLS listener bind, e.g. '0.0.0.0:8883' (repeatable); certificate made on first start.")
@click.option("--no-plain", is_flag=True, help="No plain-TCP listener: TLS only.")
@click.option("--beacon-interface", "beacon", multiple=True,
              help="LAN interface to send the Layer-2 beacon on, e.g. br0 (repeatable).")
@VERBOSE
def gateway_run(config: Path | None, data_dir: Path | None, listen: tuple[str, ...], tls_listen: tuple[str, ...],
                no_plain: bool, beacon: tuple[str, ...], verbose: bool) -> None:
    """Run the broker (embedded amqtt, or Mosquitto as a child: `[broker] engine`) and the
    configurator (and the beacon) until SIGINT/SIGTERM."""
    from homenet.broker.beacon import BeaconSender
    from homenet.broker.mosquitto import EngineMissing, MosquittoEngine, choose_engine
    from homenet.broker.server import EmbeddedBroker
    from homenet.l2 import NoRawSocket

    from .app import build, identity

    logs.setup(verbose)
    settings: GatewaySettings = _load(GatewaySettings, config, **{
        "configurator.data_dir": data_dir, "broker.listeners": [] if no_plain else (list(listen) or None),
        "broker.tls_listeners": list(tls_listen) or None, "beacon.interfaces": list(beacon) or None})
    try:
        engine = choose_engine(settings.broker)
        broker_settings, conf_settings, fingerprint = _secure_gateway(settings)
    except (ValueError, EngineMissing) as exc:
        raise click.ClickException(str(exc)) from None
    plain, tls = settings.broker.listeners, settings.broker.tls_listeners
    child = MosquittoEngine(broker_settings, conf_settings.data_dir, _topics(conf_settings)) \
        if engine == "mosquitto" else None
    if child is not None:
        conf_settings = child.configurator_settings(conf_settings)

    async def serve() -> None:
        broker = EmbeddedBroker(broker_settings, _topics(conf_settings)) if child is None else None
        if broker is not None:
            await broker.start()
        elif child is not None:
            try:
                child.start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                raise click.ClickException(f"broker: {exc}") from None
        try:
            configurator = build(conf_settings, identity(conf_settings, child.accounts) if child else None)
        except BaseException:
            if child is not None:
                child.stop()
            raise
        sender = None
        try:
            if settings.beacon.interfaces:
                tls_port = _port(tls[0]) if tls else None
                loop = asyncio.get_running_loop()

                def renumbered() -> None:  # a LAN interface's address changed; the beacon says so next
                    if broker is not None:  # Mosquitto has no take-over trap to clear (amqtt-notes.md)
                        asyncio.run_coroutine_threadsafe(broker.drop_orphans(), loop).result(10)
                    configurator.lan_watch.poke()

                sender = BeaconSender(settings.beacon.interfaces, configurator.key, configurator.epoch,
                                      _port((plain or tls)[0]), conf_settings.root, settings.beacon.ethertype,
                                      tls=(tls_port, bytes.fromhex(fingerprint)) if tls_port else None,
                                      renumbered=renumbered)
                sender.start()
            configurator.start()
            if child is None:
                await _until_signal()
            else:
                await _until_signal_or(child.exited(), "mosquitto exited with status {}; stopping")
        except (NoRawSocket, OSError) as exc:
            raise click.ClickException(f"beacon: {exc}") from None
        finally:
            if sender:
                sender.stop()
            await asyncio.to_thread(configurator.stop)
            if broker is not None:
                await broker.stop()
            if child is not None:
                child.stop()

    asyncio.run(serve())


def _port(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


def _secure_gateway(settings: GatewaySettings) -> tuple[Any, ConfiguratorSettings, str]:
    """Broker and configurator settings for the appliance: every client authenticated against
    the accounts the configurator issues; TLS with the gateway's own certificate when asked."""
    from homenet.tls import ensure_certificate, fingerprint

    if settings.configurator.dynsec_admin:
        raise ValueError("gateway run embeds its own broker: dynsec_admin is for a configurator "
                         "in front of an external Mosquitto (homenet configurator run)")
    data = settings.configurator.data_dir
    data.mkdir(parents=True, exist_ok=True)
    broker = settings.broker.model_copy(update={
        "accounts_file": settings.broker.accounts_file or data / "broker-accounts.json"})
    if not broker.listeners and not broker.tls_listeners:
        raise ValueError("no listener: give --listen or --tls-listen")
    cert = ""
    if broker.tls_listeners:
        broker = broker.model_copy(update={"certfile": broker.certfile or data / "broker-cert.pem",
                                           "keyfile": broker.keyfile or data / "broker-key.pem"})
        cert = fingerprint(ensure_certificate(broker.certfile, broker.keyfile))
    local = (local_url(broker.listeners[0]) if broker.listeners
             else local_url(broker.tls_listeners[0]).replace("mqtt://", "mqtts://"))
    configurator = settings.configurator.model_copy(update={
        "broker": local, "accounts_file": broker.accounts_file,
        "broker_cafile": broker.certfile if not broker.listeners else None})
    return broker, configurator, cert


def _topics(settings: ConfiguratorSettings) -> Any:
    from homenet.schemas import Topics

    return Topics(settings.root)


@main.group()
def broker() -> None:
    """The embedded amqtt broker alone."""


@broker.command("run")
@CONFIG
@click.option("--listen", multiple=True, help="Listener bind, e.g. ':::1883' (repeatable).")
@VERBOSE
def broker_run(config: Path | None, listen: tuple[str, ...], verbose: bool) -> None:
    """Run only the broker (the configurator can then run elsewhere)."""
    from homenet.broker.server import EmbeddedBroker

    logs.setup(verbose)
    settings: GatewaySettings = _load(GatewaySettings, config, **{"broker.listeners": list(listen) or None})

    async def serve() -> None:
        embedded = EmbeddedBroker(settings.broker, _topics(settings.configurator))
        await embedded.start()
        try:
            await _until_signal()
        finally:
            await embedded.stop()

    asyncio.run(serve())


@main.group()
def configurator() -> None:
    """The configurator alone, against any MQTT 3.1.1 broker."""


@configurator.command("run")
@CONFIG
@DATA_DIR
@click.option("--broker", help="Broker URL, e.g. mqtt://127.0.0.1:1883.")
@click.option("--standby", is_flag=True, help="Start as a standby: give a primary standby_grace seconds to "
              "appear before taking over (docs/reliability.md).")
@VERBOSE
def configurator_run(config: Path | None, data_dir: Path | None, broker: str | None, standby: bool,
                     verbose: bool) -> None:
    """Run the configurator until SIGINT/SIGTERM; while another configurator on the same data
    directory is online, stand by and take over when it goes offline."""
    from homenet.accounts import AccountError

    from .standby import Standby

    logs.setup(verbose)
    settings: GatewaySettings = _load(GatewaySettings, config, **{
        "configurator.data_dir": data_dir, "configurator.broker": broker})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        Standby(settings.configurator, standby=standby).run(stop)
    except (OSError, AccountError) as exc:
        raise click.ClickException(f"configurator: {exc}") from None


@main.group()
def devices() -> None:
    """Read the configuration database."""


def _store(config: Path | None, data_dir: Path | None) -> Any:
    from .store import SqliteStore

    settings: GatewaySettings = _load(GatewaySettings, config, **{"configurator.data_dir": data_dir})
    path = db_path(settings.configurator.data_dir)
    if not path.exists():
        raise click.ClickException(f"no configuration database at {path} (use --data-dir or --config)")
    return SqliteStore(path, read_only=True)


@devices.command("list")
@CONFIG
@DATA_DIR
def devices_list(config: Path | None, data_dir: Path | None) -> None:
    """One line per device: state, address, QoS, port mappings."""
    click.echo(device_table(_store(config, data_dir).all()))


@devices.command("show")
@click.argument("device_id")
@CONFIG
@DATA_DIR
def devices_show(device_id: str, config: Path | None, data_dir: Path | None) -> None:
    """Everything known about one device."""
    record = _store(config, data_dir).get(device_id)
    if record is None:
        raise click.ClickException(f"no device {device_id!r} in the database")
    click.echo(device_detail(record))


BROKER = click.option("--broker", help="Broker of the running configurator (default: this gateway's).")


def _device_command(op: str, done: str, help_text: str) -> None:
    """`homenet devices OP DEVICE_ID`, sent to the running configurator."""

    @devices.command(op, help=help_text)
    @click.argument("device_id")
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


@devices.command("pair")
@click.argument("code")
@CONFIG
@DATA_DIR
@BROKER
def devices_pair(code: str, config: Path | None, data_dir: Path | None, broker: str | None) -> None:
    """Let in the waiting device that shows this pairing code (enrollment 'pairing-code')."""
    from homenet.schemas.messages import Command

    reply = _command(config, data_dir, broker, Command(op="pair", code=code))
    click.echo(f"paired {reply.result['device_id']}")


@main.group()
def users() -> None:
    """Operator accounts on the gateway's broker (e.g. for mosquitto_sub)."""


@users.command("add")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="May read the whole tree, publish nothing.")
@CONFIG
@DATA_DIR
@BROKER
def users_add(name: str, read_only: bool, config: Path | None, data_dir: Path | None, broker: str | None) -> None:
    """Create (or renew) an operator account; prints its password once."""
    from homenet.schemas.messages import Command

    reply = _command(config, data_dir, broker, Command(op="user.add", user=name, read_only=read_only))
    click.echo(f"{reply.result['role']} account {name}, password: {reply.result['password']}")


@users.command("remove")
@click.argument("name")
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
    from .operator import send_command

    settings: GatewaySettings = _load(GatewaySettings, config, **{"configurator.broker": broker,
                                                                  "configurator.data_dir": data_dir})
    url = broker or local_url(settings.broker.listeners[0])
    secret = settings.configurator.data_dir / ADMIN_SECRET  # present on the gateway itself
    login = (ADMIN, secret.read_text().strip()) if secret.exists() else None
    try:
        reply = send_command(url, command, settings.configurator.root, login,
                             cafile=settings.configurator.data_dir / "broker-cert.pem")
    except (ConnectionError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    if not reply.ok:
        raise click.ClickException(f"{command.op} {command.device_id or command.user or command.code}: {reply.error}")
    return reply


@main.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for every device.")
@VERBOSE
def demo(timeout: float, verbose: bool) -> None:
    """Onboard one simulated device of each built-in type; exit 0 when all confirmed."""
    from .demo import run_demo

    logs.setup(verbose)
    if not run_demo(timeout):
        raise SystemExit(1)


@main.group()
def bench() -> None:
    """Benchmarks: print medians and p99 against a floor measured in the same run."""


@bench.command("onboard")
@click.option("--count", default=200, show_default=True, help="Sequential onboardings per broker.")
@click.option("--broker", "brokers", multiple=True, type=click.Choice(["amqtt", "mosquitto"]),
              help="Brokers to measure (default: both).")
def bench_onboard(count: int, brokers: tuple[str, ...]) -> None:
    """Time from an agent's CONNACK to its confirmed config, against a trivial responder."""
    from homenet.bench.onboard import run_onboard

    run_onboard(count, list(brokers) or ["amqtt", "mosquitto"])


@bench.command("storm")
@click.option("--agents", "counts", multiple=True, type=click.IntRange(min=1),
              help="Agents that connect and register at once (repeatable; default 250, 1000, 5000).")
@click.option("--broker", "brokers", multiple=True, type=click.Choice(["amqtt", "gw-mosquitto", "mosquitto"]),
              help="amqtt: `gateway run` (broker and configurator in one process); gw-mosquitto: `gateway run` "
              "with engine mosquitto (its child); mosquitto: Mosquitto and `configurator run` (default: all).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds one run may take; then it stops.")
@click.option("--processes", default=2, show_default=True, help="Load generator processes.")
@click.option("--profile", type=click.Path(path_type=Path, dir_okay=False),
              help="py-spy the configurator process during each run; collapsed stacks to FILE-<broker>-<N>.txt.")
@click.option("--footprint/--no-footprint", default=True, show_default=True,
              help="Also measure an agent (start to CONNECT, RSS once configured) and the configurator "
              "at rest on a database of 1,000 and of 5,000 devices (up to 3 min each).")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), help="All results as JSON.")
@click.option("--keep", is_flag=True, help="Keep each run's temp dir (database, configurator log).")
@click.option("--renumber/--no-renumber", default=True, show_default=True,
              help="After each storm, restart the configurator with the LAN moved to another subnet and "
              "time until every device confirmed its new config.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1),
              help="Run every storm this many times; then, per broker, in how many every device was confirmed.")
def bench_storm(counts: tuple[int, ...], brokers: tuple[str, ...], timeout: float, processes: int,
                profile: Path | None, footprint: bool, json_out: Path | None, keep: bool, renumber: bool,
                repeat: int) -> None:
    """N new agents at once against a fresh configurator: time until all confirmed, CPU, RSS.
    Exit status 1 when a device was not confirmed in some run."""
    from homenet.bench.storm import BROKERS, run_storm

    if not run_storm(list(counts) or [250, 1000, 5000], list(brokers) or BROKERS, timeout, processes,
                     profile, footprint, json_out, keep, renumber, repeat):
        raise SystemExit(1)
