"""`homenet-agent`: the device side."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from homenet import DISTRIBUTION, logs, sdnotify
from homenet.settings import AgentSettings, SettingsError, load

from .app import Device, build, open_device
from .instance import DuplicateAgent, claim

if TYPE_CHECKING:  # imported when discovery runs: an agent given --broker never loads psutil for it
    from .bootstrap import BeaconListener, Discovery
    from .service import Agent


@click.group()
@click.version_option(package_name=DISTRIBUTION)
def main() -> None:
    """homenet configured agent (IEC 62608): registers this device and applies its configuration."""


def _settings(config: Path | None, **flags: object) -> AgentSettings:
    try:
        return load(AgentSettings, config, flags)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--config", "-c", type=click.Path(path_type=Path, dir_okay=False), help="TOML settings file.")
@click.option("--broker", help="Broker URL, e.g. mqtt://192.168.1.1:1883 or mqtts://192.168.1.1:8883.")
@click.option("--broker-fingerprint", help="For mqtts://: SHA-256 (hex) of the broker's certificate.")
@click.option("--cafile", "broker_cafile", type=click.Path(path_type=Path, dir_okay=False),
              help="For mqtts://: a certificate file to trust instead of a fingerprint.")
@click.option("--device-id", help="Device id (default: hn-<MAC of the first interface>).")
@click.option("--device-type", help="Device type: iptv-stb, nas, media-player, game-console, "
              "smart-speaker, camera, generic, ...")
@click.option("--model", help="Model name reported to the configurator.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), help="State directory.")
@click.option("--collector", type=click.Choice(["linux", "simulated"]), help="Where device info comes from.")
@click.option("--executor", type=click.Choice(["auto", "simulated", "iproute2", "networkmanager"]),
              help="How settings are applied: iproute2 (netlink), simulated (recorded only), or auto "
              "(default: iproute2 on Linux with CAP_NET_ADMIN and the linux collector, else simulated).")
@click.option("--root", help="Topic root (default homenet/v1).")
@logs.options
def run(config: Path | None, **flags: object) -> None:
    """Run the agent until SIGINT/SIGTERM. Under systemd (Type=notify) READY=1 is sent once
    it listens for the beacon or works with the broker it was given, and the watchdog is
    pinged while its MQTT loop runs."""
    settings = _settings(config, **flags)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    running: list[Agent] = []
    watchdog = sdnotify.Watchdog(lambda: running[0].problem() if running else None)
    watchdog.start()  # before discovery, which may wait long for the gateway
    try:
        device = open_device(settings)
    except ValueError as exc:  # e.g. a provisioned key file that holds no key
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot use data directory {settings.data_dir}: {exc.strerror}") from None
    try:
        held = claim(device.device_id)  # before any connection: a duplicate must not disturb the first
    except DuplicateAgent as exc:
        raise click.ClickException(str(exc)) from None
    listener, found = _discover(device, done) if settings.broker is None else (None, None)
    if listener and not found:  # stopped while discovering
        listener.close()
        return
    try:
        agent = build(settings, broker=found.broker if found else None, device=device,
                      verify=found.verify if found else None, fingerprint=found.fingerprint if found else None)
    except (ValueError, OSError) as exc:  # CertificateMismatch is an OSError
        raise click.ClickException(str(exc)) from None
    if listener:
        listener.watch(agent.follow)
    agent.start()
    running.append(agent)
    sdnotify.notify("READY=1", f"STATUS=agent {agent.device_id} working with {agent.broker}")
    done.wait()
    sdnotify.notify("STOPPING=1")
    watchdog.stop()
    agent.stop()
    if listener:
        listener.close()
    held.close()


def _discover(device: Device, stop: threading.Event) -> tuple[BeaconListener, Discovery | None]:
    """Find the broker from the beacon (None: `stop` came first); the listener is kept, for
    the agent to follow later beacons."""
    from homenet.l2 import NoRawSocket

    from .bootstrap import BeaconListener

    settings = device.settings
    try:
        listener = BeaconListener(device.state, device.pinned, settings.beacon_ethertype)
    except NoRawSocket as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"discovery: {exc}") from None
    sdnotify.notify("READY=1", "STATUS=waiting for the gateway's beacon")  # a gateway may come much later
    found = listener.discover(stop=stop)
    if found is None:
        return listener, None
    click.echo(f"found the gateway's broker at {found.broker} (beacon on {found.iface})", err=True)
    return listener, found


@main.command()
@click.option("--config", "-c", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--device-id")
@click.option("--device-type")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
def info(config: Path | None, **flags: object) -> None:
    """Print the device info this agent would register, as JSON (writes nothing: before the
    first `run` there is no key yet, and `public_key` is null)."""
    click.echo(open_device(_settings(config, **flags), read_only=True).info().model_dump_json(indent=2))


from . import status as _status  # noqa: E402,F401  (registers `status`)
