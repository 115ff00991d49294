"""Service server: equipment profiles by maker/model, the homes' inventory, configuration backups.

Our reading of IEC 62608-2's "service server (equipment and configuration management)", modelled
on TR-069 ACSs: the operator manages a profile per model, the configurator asks for it at a
device's registration (Sequence 1), reports what it did, and keeps a backup of its
configuration here so that a replacement gateway can restore it.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from homenet.schemas.cloud import Backup, BackupQuery, EquipmentProfile, Hello, ProfileQuery, Report, ReportKind

from .api import HomeRoute, OperatorRoute
from .db import Migration, create, metadata, migrations
from .homes import Home, Refused, homes

BACKUP_MAX = 4 * 1024 * 1024
"""A backup carries every device record: larger than the contract's 64 KiB messages."""

profiles = sa.Table(
    "service_profiles", metadata,
    sa.Column("maker", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("doc", sa.JSON, nullable=False),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


def report_table(name: str) -> sa.Table:
    """Reports from the homes' outboxes, in the order received, each (home, report id) once."""
    return sa.Table(
        name, metadata,
        sa.Column("n", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("home_id", sa.String(64), nullable=False),
        sa.Column("report_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64)),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("received", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("home_id", "report_id"),
    )


reports = report_table("service_reports")
backups = sa.Table(
    "service_backups", metadata,
    sa.Column("home_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("doc", sa.JSON, nullable=False),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
migrations("service", Migration(1, create(profiles, reports, backups)))


@functools.cache
def _insert_once(dialect: str, table: sa.Table) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(table).on_conflict_do_nothing().returning(table.c.n)


def insert_once(conn: Connection, table: sa.Table, **values: Any) -> bool:
    """INSERT … ON CONFLICT DO NOTHING (both dialects have it); False when the row was there."""
    return conn.execute(_insert_once(conn.dialect.name, table), values).first() is not None


def store_report(conn: Connection, table: sa.Table, home: Home, report: Report) -> dict[str, Any]:
    """Keep a report once: a second delivery of the same id (the home did not get our reply)
    is acknowledged again and not stored twice."""
    stored = insert_once(conn, table, home_id=home.home_id, report_id=report.report_id, device_id=report.device_id,
                         data=report.data)
    return {"stored": stored, "duplicate": not stored}


# --- home routes ---------------------------------------------------------------------------

def hello(_conn: Connection, home: Home, _body: Hello) -> dict[str, Any]:
    return {"home_id": home.home_id, "region": home.region}


_SELECT_PROFILE = sa.select(profiles.c.doc).where(profiles.c.maker == sa.bindparam("maker"),
                                                  profiles.c.model == sa.bindparam("model"))


def profile(conn: Connection, _home: Home, query: ProfileQuery) -> dict[str, Any]:
    doc = conn.execute(_SELECT_PROFILE, {"maker": query.maker, "model": query.model}).scalar()
    return {"profile": doc}


def report(conn: Connection, home: Home, body: Report) -> dict[str, Any]:
    if body.kind != ReportKind.INVENTORY:
        raise Refused(400, f"the service server takes inventory reports, not {body.kind.value}")
    return store_report(conn, reports, home, body)


def backup_put(conn: Connection, home: Home, body: Backup) -> dict[str, Any]:
    current = conn.execute(sa.select(backups.c.version).where(backups.c.home_id == home.home_id)).scalar()
    doc = body.model_dump(mode="json")
    if current is None:
        conn.execute(backups.insert().values(home_id=home.home_id, version=body.version, doc=doc))
    elif body.version > current:
        conn.execute(backups.update().where(backups.c.home_id == home.home_id)
                     .values(version=body.version, doc=doc, updated=sa.func.now()))
    return {"version": max(body.version, current or 0)}


def backup_get(conn: Connection, home: Home, _body: BackupQuery) -> dict[str, Any]:
    return {"backup": conn.execute(sa.select(backups.c.doc).where(backups.c.home_id == home.home_id)).scalar()}


HOME_ROUTES = [
    HomeRoute("/v1/hello", "cloud.hello", "Bind the home's id to its configurator key (first use)", hello),
    HomeRoute("/v1/service/profile", "cloud.profile.get", "The equipment profile of a maker's model", profile),
    HomeRoute("/v1/service/report", "cloud.report", "An inventory report from the home's outbox", report),
    HomeRoute("/v1/service/backup/put", "cloud.backup.put", "Keep the home's configuration backup", backup_put,
              max_size=BACKUP_MAX),
    HomeRoute("/v1/service/backup/get", "cloud.backup.get", "The home's latest configuration backup", backup_get),
]


# --- operator routes -----------------------------------------------------------------------

def put_profile(conn: Connection, params: dict[str, str], body: EquipmentProfile) -> dict[str, Any]:
    if (body.maker, body.model) != (params["maker"], params["model"]):
        raise Refused(400, f"profile names {body.maker}/{body.model} but the path {params['maker']}/{params['model']}")
    doc = body.model_dump(mode="json")
    where = (profiles.c.maker == body.maker, profiles.c.model == body.model)
    if conn.execute(sa.update(profiles).where(*where).values(doc=doc, updated=sa.func.now())).rowcount == 0:
        conn.execute(profiles.insert().values(maker=body.maker, model=body.model, doc=doc))
    return doc


def list_profiles(conn: Connection, _params: dict[str, str], _body: None) -> list[Any]:
    return [r.doc for r in conn.execute(sa.select(profiles.c.doc).order_by(profiles.c.maker, profiles.c.model))]


def delete_profile(conn: Connection, params: dict[str, str], _body: None) -> dict[str, Any]:
    gone = conn.execute(profiles.delete().where(profiles.c.maker == params["maker"],
                                                profiles.c.model == params["model"])).rowcount
    if not gone:
        raise Refused(404, f"no profile {params['maker']}/{params['model']}")
    return {"deleted": f"{params['maker']}/{params['model']}"}


def list_homes(conn: Connection, _params: dict[str, str], _body: None) -> list[Any]:
    counts = dict(conn.execute(sa.select(reports.c.home_id, sa.func.count()).group_by(reports.c.home_id)).all())
    return [{"home_id": r.home_id, "region": r.region, "reports": counts.get(r.home_id, 0)}
            for r in conn.execute(sa.select(homes).order_by(homes.c.home_id))]


def inventory(conn: Connection, params: dict[str, str], _body: None) -> list[Any]:
    """Every report of one home in the order received."""
    rows = conn.execute(sa.select(reports).where(reports.c.home_id == params["home_id"]).order_by(reports.c.n))
    return [{"report_id": r.report_id, "device_id": r.device_id, "data": r.data} for r in rows]


OPERATOR_ROUTES = [
    OperatorRoute("PUT", "/v1/operator/profiles/{maker}/{model}", "Add or replace a model's profile", put_profile,
                  EquipmentProfile),
    OperatorRoute("GET", "/v1/operator/profiles", "Every equipment profile", list_profiles),
    OperatorRoute("DELETE", "/v1/operator/profiles/{maker}/{model}", "Remove a model's profile", delete_profile),
    OperatorRoute("GET", "/v1/operator/homes", "Every home known, with its report count", list_homes),
    OperatorRoute("GET", "/v1/operator/homes/{home_id}/inventory", "A home's inventory reports", inventory),
]
