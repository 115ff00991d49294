"""Assembling a configurator from settings: store, gateway driver, service."""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from homenet.accounts import Accounts, AccountStore, ensure_account
from homenet.durable import write_atomic
from homenet.acl import Role
from homenet.keys import KeyPair
from homenet.schemas import Topics
from homenet.settings import ConfiguratorSettings, SettingsError

from .gateway import GatewayDriver, GatewayReporter, MemoryGatewayDriver
from .ipam import LanPlan
from .operator import OPERATOR_KEY
from .renumber import lan_plan, saved_plan
from .service import Configurator
from .store import SqliteStore

DB_NAME = "homenet.db"
KEY_NAME = "configurator.key"
ADMIN, ADMIN_SECRET = "admin", "admin.secret"

"""The gateway's local operator account: `homenet devices ...` on the gateway logs in with it."""


def db_path(data_dir: Path) -> Path:
    return Path(data_dir) / DB_NAME


def make_driver(settings: ConfiguratorSettings, reporter: GatewayReporter,
                lan: LanPlan | None = None) -> GatewayDriver:
    """The driver named by `gateway_driver`, serving `lan` (default: the `[lan]` settings'); the
    drivers' modules load only when chosen."""
    lan = lan or lan_plan(settings.lan)
    if settings.gateway_driver == "linux":
        from .drivers.linux import LinuxGatewayDriver
        return LinuxGatewayDriver(lan, settings.gateway, reporter)
    if settings.gateway_driver == "upnp":
        from .drivers.upnp import UpnpGatewayDriver
        return UpnpGatewayDriver(lan)
    return MemoryGatewayDriver(lan)


def make_accounts(settings: ConfiguratorSettings) -> AccountStore | None:
    """Where the broker accounts go: an external Mosquitto's dynamic-security plugin (its
    roles made or updated now, so the broker must be up), the embedded broker's file, or none."""
    if settings.dynsec_admin and settings.dynsec_admin_password_file:
        from .dynsec import DynsecAccounts

        try:
            password = settings.dynsec_admin_password_file.read_text().strip()
        except OSError as exc:
            raise SettingsError(f"dynsec_admin_password_file {settings.dynsec_admin_password_file}: "
                                f"{exc.strerror}") from None
        accounts = DynsecAccounts(settings.broker, (settings.dynsec_admin, password), Topics(settings.root),
                                  cafile=settings.broker_cafile)
        accounts.ensure_roles()
        return accounts
    return Accounts(settings.accounts_file) if settings.accounts_file else None


@dataclass(frozen=True)
class Identity:
    """What every configurator process on one data directory shares: the signing key (agents
    pin it, so a standby with another key would be refused by every device), the broker
    accounts it issues and its own login."""

    key: KeyPair
    accounts: AccountStore | None
    login: tuple[str, str] | None
    client_id: str | None = None
    """Its MQTT client id when it is not the plain `homenet-<id>` (see `client_id`)."""


CLIENT_ID_SECRET = "client-id.secret"


def client_id(settings: ConfiguratorSettings) -> str | None:
    """On Mosquitto, any anonymous client may connect under any client id, and MQTT hands it
    the session of that id: `mosquitto_pub -i homenet-configurator` pushed the configurator
    off (docs/security.md). There the configurator's id carries a secret suffix, kept in the
    data directory so its persistent session survives restarts. The embedded broker reserves
    `homenet-*` for the configurator's account instead (broker/auth.py)."""
    if settings.dynsec_admin is None:
        return None
    secret = settings.data_dir / CLIENT_ID_SECRET
    if not secret.exists():
        write_atomic(secret, secrets.token_hex(12).encode() + b"\n", mode=0o600)
    return f"homenet-{settings.configurator_id}-{secret.read_text().strip()}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


class GatewayRunning(RuntimeError):
    """Another `homenet gateway run` holds the data directory."""


def hold_gateway(data_dir: Path) -> IO[str]:
    """Hold `data_dir` for this gateway process until the returned file is closed (or the
    process ends, however). A second gateway on it would claim the next epoch and fence the
    first one's configurator while its broker and beacon went on serving the devices."""
    lock = open(Path(data_dir) / "gateway.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise GatewayRunning(f"another homenet gateway (pid {pid}) is running on data directory {data_dir}: "
                             f"stop it first (a second configurator on the same data directory runs as a "
                             f"standby: homenet configurator run --standby)") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def identity(settings: ConfiguratorSettings, accounts: AccountStore | None = None) -> Identity:
    """Load the identity, making what is missing. Under a lock on the data directory: two
    configurators starting at once on a fresh one must not each make a key or a password.
    `accounts`: where the broker keeps them, when the caller owns the broker (default: from
    `settings`)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(settings.data_dir / "setup.lock"):
        key = KeyPair.load_or_create(settings.data_dir / KEY_NAME)
        accounts = accounts or make_accounts(settings)
        login = None
        if accounts is not None:  # its own account, and the local operator's for the CLI
            login = ("configurator", ensure_account(accounts, "configurator", Role.CONFIGURATOR,
                                                    settings.data_dir / "configurator.secret"))
            ensure_account(accounts, ADMIN, Role.OPERATOR, settings.data_dir / ADMIN_SECRET)
        KeyPair.load_or_create(settings.data_dir / OPERATOR_KEY)
        mqtt_id = client_id(settings)
    return Identity(key, accounts, login, mqtt_id)


def build(settings: ConfiguratorSettings, ident: Identity | None = None) -> Configurator:
    """A configurator, not started; it claims the next epoch, fencing every earlier one
    (and raises `Fenced` if another claims a higher one while it is being made)."""
    ident = ident or identity(settings)
    reporter = GatewayReporter()
    store = SqliteStore(db_path(settings.data_dir))
    if settings.cloud and settings.cloud.restore and not store.all() and "epoch" not in store.meta():
        from .cloudlink import restore  # a replacement gateway: the home's configuration from its backup
        restore(settings.cloud, ident.key, settings.data_dir, store)
    lan = saved_plan(settings.lan, store.meta())  # a renumbered LAN stays renumbered across restarts
    driver = make_driver(settings, reporter, lan)
    try:
        configurator = Configurator(settings, store, driver, ident.key, ident.accounts, ident.login,
                                    client_id=ident.client_id)
    except BaseException:
        driver.close()
        store.close()
        raise
    reporter.connect(configurator.event, configurator.publish_gateway_state, configurator.gateway_reported)
    if settings.cloud:
        from .cloudlink import CloudLink
        configurator.extensions.append(CloudLink(configurator, settings.cloud, settings.data_dir))
    return configurator
