"""Assembling a configurator from settings: store, gateway driver, service."""

from __future__ import annotations

from pathlib import Path

from homenet.accounts import Accounts, AccountStore, ensure_account
from homenet.acl import Role
from homenet.keys import KeyPair
from homenet.schemas import Topics
from homenet.settings import ConfiguratorSettings, SettingsError

from .gateway import GatewayDriver, GatewayReporter, MemoryGatewayDriver
from .ipam import LanPlan
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


def build(settings: ConfiguratorSettings) -> Configurator:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    reporter = GatewayReporter()
    accounts = make_accounts(settings)
    login = None
    if accounts is not None:  # its own account, and the local operator's for the CLI
        login = ("configurator", ensure_account(accounts, "configurator", Role.CONFIGURATOR,
                                                settings.data_dir / "configurator.secret"))
        ensure_account(accounts, ADMIN, Role.OPERATOR, settings.data_dir / ADMIN_SECRET)
    store = SqliteStore(db_path(settings.data_dir))
    lan = saved_plan(settings.lan, store.meta())  # a renumbered LAN stays renumbered across restarts
    configurator = Configurator(settings, store, make_driver(settings, reporter, lan),
                                KeyPair.load_or_create(settings.data_dir / KEY_NAME), accounts, login)
    reporter.connect(configurator.event, configurator.publish_gateway_state)
    return configurator
