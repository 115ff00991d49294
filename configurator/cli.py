"""`homenet`: the gateway side (gateway, broker, configurator, demo, bench, conformance); the
owner's `devices` and `users` commands are in cli_operator.py, the read-only ones in cli_read.py,
`bench` and `conformance` in cli_tools.py. Over 350 lines because `gateway run` (a third of it)
wires the broker, the configurator, the beacon and the watchdog in one process, and reads best whole."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from collections.abc import Callable
from typing import Any

import click

from homenet import DISTRIBUTION, logs, sdnotify
from homenet.settings import BrokerSettings, ConfiguratorSettings, GatewaySettings, SettingsError, load


CONFIG = click.option("--config", "-c", type=click.Path(path_type=Path, dir_okay=False),
                      help="TOML settings file.")
DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False, readable=False),
                        help="Directory of the configuration database.")


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
@click.version_option(package_name=DISTRIBUTION)
def main() -> None:
    """homenet gateway: IEC 62608 configurator and embedded MQTT broker."""


def _cloud_commands() -> None:
    """`homenet cloud …` (cloud/cli.py): its heavy imports load only when a cloud command runs."""
    from homenet.cloud.cli import cloud

    main.add_command(cloud)


_cloud_commands()


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
@logs.options
def gateway_run(config: Path | None, data_dir: Path | None, listen: tuple[str, ...], tls_listen: tuple[str, ...],
                no_plain: bool, beacon: tuple[str, ...]) -> None:
    """Run the broker (embedded amqtt, or Mosquitto as a child: `[broker] engine`) and the
    configurator (and the beacon) until SIGINT/SIGTERM. Under systemd (Type=notify) READY=1 is
    sent once the broker listens and the configurator is online on it, and the watchdog is
    pinged while both answer. When another configurator on the same data directory fences this
    one, it says so and stands by (the broker and the beacon go on) until that one goes offline."""
    settings: GatewaySettings = _load(GatewaySettings, config, **{
        "configurator.data_dir": data_dir, "broker.listeners": [] if no_plain else (list(listen) or None),
        "broker.tls_listeners": list(tls_listen) or None, "beacon.interfaces": list(beacon) or None})
    _preflight("homenet gateway run", settings)

    from subprocess import SubprocessError

    from amqtt.errors import BrokerError

    from homenet.broker.beacon import BeaconSender
    from homenet.broker.mosquitto import EngineMissing, MosquittoEngine, choose_engine
    from homenet.broker.server import EmbeddedBroker
    from homenet.l2 import NoRawSocket

    from .app import GatewayRunning, hold_gateway, identity
    from .extensions import Extensions
    from .extensions.http import HttpError
    from .service import Configurator
    from .standby import Standby

    try:
        engine = choose_engine(settings.broker)
        broker_settings, conf_settings, fingerprint = _secure_gateway(settings)
        held = hold_gateway(conf_settings.data_dir)
    except (ValueError, EngineMissing, GatewayRunning) as exc:
        raise click.ClickException(str(exc)) from None
    plain, tls = settings.broker.listeners, settings.broker.tls_listeners
    child = MosquittoEngine(broker_settings, conf_settings.data_dir, _topics(conf_settings, settings.homeassistant.prefix)) \
        if engine == "mosquitto" else None
    if child is not None:
        conf_settings = child.configurator_settings(conf_settings)

    # the accounts (the configurator's, the local operator's) exist before the broker takes a login
    ident = identity(conf_settings, child.accounts if child else None)

    async def serve() -> None:
        broker = EmbeddedBroker(broker_settings, _topics(conf_settings, settings.homeassistant.prefix)) if child is None else None
        try:
            if broker is not None:
                await broker.start()
            elif child is not None:
                child.start()
        except (BrokerError, RuntimeError, OSError, SubprocessError) as exc:  # a bind that failed after the
            # preflight's (a race for the port: amqtt's BrokerError wraps the OSError), or Mosquitto's start
            raise click.ClickException(f"broker: {exc}") from None
        loop = asyncio.get_running_loop()
        sender: BeaconSender | None = None
        extensions: Extensions | None = None
        """Those of the configurator serving now (each turn as the primary has its own)."""

        def renumbered() -> None:  # a LAN interface's address changed; the beacon says so next
            if broker is not None:  # Mosquitto has no take-over trap to clear (amqtt-notes.md)
                asyncio.run_coroutine_threadsafe(broker.drop_orphans(), loop).result(10)
            if standby.primary is not None:
                standby.primary.lan_watch.poke()

        def close_session(client_id: str) -> None:  # a revoked account's connection
            assert broker is not None
            asyncio.run_coroutine_threadsafe(broker.kick(client_id), loop).result(5)

        def primary(configurator: Configurator) -> None:
            """Before the configurator starts: its extensions (nothing it commits is missed),
            and with the first turn the beacon, with the epoch claimed then (a new epoch in the
            beacon tells the devices that the gateway restarted)."""
            nonlocal sender, extensions
            if broker is not None:  # Mosquitto's dynamic security closes a deleted client itself
                configurator.close_session = close_session
            extensions = Extensions(configurator, settings.model_copy(update={"configurator": conf_settings}))
            extensions.start()
            if sender is None and settings.beacon.interfaces:
                tls_port = _port(tls[0]) if tls else None
                sender = BeaconSender(settings.beacon.interfaces, configurator.key, configurator.epoch,
                                      _port((plain or tls)[0]), conf_settings.root, settings.beacon.ethertype,
                                      tls=(tls_port, bytes.fromhex(fingerprint)) if tls_port else None,
                                      renumbered=renumbered)
                sender.start()

        def retired(_configurator: Configurator) -> None:
            nonlocal extensions
            if extensions is not None:
                extensions.stop()
                extensions = None

        standby = Standby(conf_settings, ident=ident, on_primary=primary, on_retire=retired)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watchdog = sdnotify.Watchdog(lambda: _gateway_problem(loop, standby.primary))
        turns = asyncio.ensure_future(asyncio.to_thread(standby.run, stop, wait_first=False))
        ready = asyncio.ensure_future(_ready_when(
            lambda: standby.primary is not None and standby.primary.connected.is_set(),
            f"serving on {', '.join(plain + tls)}"))
        died = asyncio.ensure_future(child.exited()) if child is not None else None
        watchdog.start()
        try:
            done, _ = await asyncio.wait({turns, *([died] if died else [])}, return_when=asyncio.FIRST_COMPLETED)
            if died is not None and died in done:
                stop.set()
                await turns
                raise click.ClickException(f"mosquitto exited with status {died.result()}; stopping")
            turns.result()
        except HttpError as exc:
            raise click.ClickException(str(exc)) from None
        except (NoRawSocket, OSError) as exc:
            raise click.ClickException(f"beacon: {exc}") from None
        finally:
            sdnotify.notify("STOPPING=1")
            watchdog.stop()
            ready.cancel()
            if died is not None:
                died.cancel()
            stop.set()
            if not turns.done():
                await asyncio.wait({turns})
            if sender:
                sender.stop()
            if broker is not None:
                await broker.stop()
            if child is not None:
                child.stop()

    try:
        asyncio.run(serve())
    finally:
        held.close()


def _preflight(command: str, settings: GatewaySettings, data: bool = True) -> None:
    """Everything that can be checked before anything is made (configurator/preflight.py);
    `data`: the command writes the data directory."""
    from . import preflight

    try:
        preflight.need_gateway_extra(command)
        preflight.check_binds(settings.broker.listeners + settings.broker.tls_listeners)
        preflight.check_beacon(settings.beacon.interfaces, settings.beacon.ethertype)
        if data:
            preflight.check_writable(settings.configurator.data_dir)
    except preflight.PreflightError as exc:
        raise click.ClickException(str(exc)) from None


async def _ready_when(online: Callable[[], bool], status: str) -> None:
    """READY=1 once the configurator is online on the broker: agents can then be served."""
    while not online():
        await asyncio.sleep(0.05)
    sdnotify.notify("READY=1", f"STATUS={status}")


def _gateway_problem(loop: asyncio.AbstractEventLoop, configurator: Any) -> str | None:
    """For the watchdog: the broker's event loop answers and the configurator's threads run
    (none runs while this gateway stands by for another configurator: the broker still serves)."""
    try:
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=5)
    except (TimeoutError, RuntimeError):
        return "the broker's event loop did not answer within 5 s"
    return configurator.problem() if configurator is not None else None


def _port(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


def _secure_gateway(settings: GatewaySettings) -> tuple[Any, ConfiguratorSettings, str]:
    """Broker and configurator settings for the appliance: every client authenticated against
    the accounts the configurator issues; TLS with the gateway's own certificate when asked."""
    from homenet.tls import ensure_certificate, fingerprint

    if settings.configurator.dynsec_admin:
        raise ValueError("gateway run embeds its own broker: dynsec_admin is for a configurator "
                         "in front of an external Mosquitto (homenet configurator run)")
    if not settings.broker.listeners and not settings.broker.tls_listeners:
        raise ValueError("no listener: give --listen or --tls-listen")
    data = settings.configurator.data_dir
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"data directory {data}: cannot be made: {exc.strerror}") from None
    broker = settings.broker.model_copy(update={
        "accounts_file": settings.broker.accounts_file or data / "broker-accounts.json"})
    cert = ""
    if broker.tls_listeners:
        broker = broker.model_copy(update={"certfile": broker.certfile or data / "broker-cert.pem",
                                           "keyfile": broker.keyfile or data / "broker-key.pem"})
        cert = fingerprint(ensure_certificate(broker.certfile, broker.keyfile))
    configurator = settings.configurator.model_copy(update={
        "broker": _local_broker(broker), "accounts_file": broker.accounts_file,
        "broker_cafile": broker.certfile if not broker.listeners else None})
    return broker, configurator, cert


def _local_broker(broker: BrokerSettings) -> str:
    """The URL the gateway's own configurator (and the operator commands) use for the embedded
    broker: the first plain listener, else the first TLS one."""
    if broker.listeners:
        return local_url(broker.listeners[0])
    if broker.tls_listeners:
        return local_url(broker.tls_listeners[0]).replace("mqtt://", "mqtts://")
    raise click.ClickException("no listener: give --listen or --tls-listen")


def _topics(settings: ConfiguratorSettings, discovery: str = "homeassistant") -> Any:
    """The topics the broker's ACL is written for: the root, and Home Assistant's prefix."""
    from homenet.schemas import Topics

    return Topics(settings.root, discovery)


@main.group()
def broker() -> None:
    """The embedded amqtt broker alone."""


@broker.command("run")
@CONFIG
@click.option("--listen", multiple=True, help="Listener bind, e.g. ':::1883' (repeatable).")
@logs.options
def broker_run(config: Path | None, listen: tuple[str, ...]) -> None:
    """Run only the broker (the configurator can then run elsewhere)."""
    settings: GatewaySettings = _load(GatewaySettings, config, **{"broker.listeners": list(listen) or None})
    _preflight("homenet broker run", settings, data=False)

    from homenet.broker.server import EmbeddedBroker

    async def serve() -> None:
        embedded = EmbeddedBroker(settings.broker, _topics(settings.configurator, settings.homeassistant.prefix))
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
@logs.options
def configurator_run(config: Path | None, data_dir: Path | None, broker: str | None, standby: bool) -> None:
    """Run the configurator until SIGINT/SIGTERM; while another configurator on the same data
    directory is online, stand by and take over when it goes offline."""
    from homenet.accounts import AccountError

    from .standby import Standby

    settings: GatewaySettings = _load(GatewaySettings, config, **{
        "configurator.data_dir": data_dir, "configurator.broker": broker})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        Standby(settings.configurator, standby=standby).run(stop)
    except (OSError, AccountError) as exc:
        raise click.ClickException(f"configurator: {exc}") from None


@main.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for every device.")
@logs.options
def demo(timeout: float) -> None:
    """Onboard one simulated device of each built-in type; exit 0 when all confirmed."""
    from .demo import run_demo

    if not run_demo(timeout):
        raise SystemExit(1)


from . import cli_operator, cli_read, cli_tools  # noqa: E402,F401  (register devices, users, watch, bench, conformance)
