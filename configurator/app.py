"""Assembling a configurator from settings: store, gateway driver, service."""

from __future__ import annotations

from pathlib import Path

from homenet.settings import ConfiguratorSettings, LanSettings

from .gateway import GatewayDriver, MemoryGatewayDriver
from .ipam import LanPlan
from .service import Configurator
from .store import TinyStore

DB_NAME = "homenet-db.json"


def db_path(data_dir: Path) -> Path:
    return Path(data_dir) / DB_NAME


def lan_plan(lan: LanSettings) -> LanPlan:
    return LanPlan.build(lan.subnet, lan.gateway, lan.pool_start, lan.pool_end, lan.dns)


def make_driver(settings: ConfiguratorSettings) -> GatewayDriver:
    return MemoryGatewayDriver(lan_plan(settings.lan))


def build(settings: ConfiguratorSettings) -> Configurator:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Configurator(settings, TinyStore(db_path(settings.data_dir)), make_driver(settings))
