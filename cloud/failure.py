"""Service failure information server: the operator's outage notices, and the homes' own failures.

The operator publishes a failure (IPTV multicast down, DNS down …) for a region, a list of
homes, or everyone; every change gets the next `rev`. A home long-polls with the last rev it
has and is answered as soon as a change that concerns it is committed (each server process
watches `max(rev)`, so the process that took the publish need not be the one holding the poll).
Homes report their own failures (a device that cannot be configured) the same way as
inventory, exactly once by report id.
"""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection

from homenet.schemas.cloud import FailureNotice, FailurePoll, Report, ReportKind, Service

from .api import HomeRoute, OperatorRoute
from .db import Migration, create, metadata, migrations
from .homes import Home, Refused
from .service import report_table, store_report

_REV_LOCK = 62609

failures = sa.Table(
    "failure_notices", metadata,
    sa.Column("failure_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("rev", sa.BigInteger, nullable=False, index=True),
    sa.Column("service", sa.String(16), nullable=False),
    sa.Column("summary", sa.String(256), nullable=False),
    sa.Column("region", sa.String(64)),
    sa.Column("homes", sa.JSON),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("published", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
home_failures = report_table("failure_reports")
migrations("failure", Migration(1, create(failures, home_failures)))


class Publish(BaseModel):
    """What the operator publishes: a failure for a region, for some homes, or (neither) for all."""

    model_config = ConfigDict(extra="forbid")
    service: Service
    summary: Annotated[str, Field(min_length=1, max_length=256)]
    region: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    homes: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(default=None, max_length=10000)


def concerns(row: Any, home: Home) -> bool:
    if row.homes is not None and home.home_id in row.homes:
        return True
    if row.region is not None and row.region == home.region:
        return True
    return row.homes is None and row.region is None


def _next_rev(conn: Connection) -> int:
    if conn.dialect.name == "postgresql":  # two processes publishing at once must not share a rev
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _REV_LOCK})
    return (conn.execute(sa.select(sa.func.max(failures.c.rev))).scalar() or 0) + 1


def max_rev(conn: Connection) -> int:
    return conn.execute(sa.select(sa.func.max(failures.c.rev))).scalar() or 0


# --- home routes ---------------------------------------------------------------------------

def poll(conn: Connection, home: Home, body: FailurePoll) -> dict[str, Any]:
    """Changes after `body.after` that concern this home (`items`), and the rev it has now seen."""
    rows = conn.execute(sa.select(failures).where(failures.c.rev > body.after).order_by(failures.c.rev)).all()
    items = [FailureNotice(failure_id=r.failure_id, rev=r.rev, service=r.service, summary=r.summary,
                           active=r.active).model_dump(mode="json") for r in rows if concerns(r, home)]
    return {"items": items, "cursor": max([body.after, *(r.rev for r in rows)])}


def report(conn: Connection, home: Home, body: Report) -> dict[str, Any]:
    if body.kind != ReportKind.FAILURE:
        raise Refused(400, f"the failure information server takes failure reports, not {body.kind.value}")
    return store_report(conn, home_failures, home, body)


HOME_ROUTES = [
    HomeRoute("/v1/failure/poll", "cloud.failures.poll", "Wait for service failures that concern this home", poll,
              changes=max_rev),
    HomeRoute("/v1/failure/report", "cloud.report", "A failure the home could not fix itself", report),
]


# --- operator routes -----------------------------------------------------------------------

def publish(conn: Connection, _params: dict[str, str], body: Publish) -> dict[str, Any]:
    rev = _next_rev(conn)
    failure_id = conn.execute(failures.insert().values(
        rev=rev, service=body.service.value, summary=body.summary, region=body.region, homes=body.homes,
        active=True)).inserted_primary_key[0]
    return {"failure_id": failure_id, "rev": rev}


def resolve(conn: Connection, params: dict[str, str], _body: None) -> dict[str, Any]:
    if not params["failure_id"].isdigit():
        raise Refused(400, f"failure id {params['failure_id']!r} is not a number")
    rev = _next_rev(conn)
    done = conn.execute(failures.update().where(failures.c.failure_id == int(params["failure_id"]),
                                                failures.c.active.is_(True)).values(active=False, rev=rev)).rowcount
    if not done:
        raise Refused(404, f"no active failure {params['failure_id']}")
    return {"failure_id": int(params["failure_id"]), "rev": rev}


def list_failures(conn: Connection, _params: dict[str, str], _body: None) -> list[Any]:
    return [{"failure_id": r.failure_id, "rev": r.rev, "service": r.service, "summary": r.summary,
             "region": r.region, "homes": r.homes, "active": r.active}
            for r in conn.execute(sa.select(failures).order_by(failures.c.failure_id))]


def list_reports(conn: Connection, _params: dict[str, str], _body: None) -> list[Any]:
    return [{"home_id": r.home_id, "report_id": r.report_id, "device_id": r.device_id, "data": r.data}
            for r in conn.execute(sa.select(home_failures).order_by(home_failures.c.n))]


OPERATOR_ROUTES = [
    OperatorRoute("POST", "/v1/operator/failures", "Publish a service failure", publish, Publish),
    OperatorRoute("POST", "/v1/operator/failures/{failure_id}/resolve", "Mark a failure resolved", resolve),
    OperatorRoute("GET", "/v1/operator/failures", "Every failure published", list_failures),
    OperatorRoute("GET", "/v1/operator/failure-reports", "Failures the homes reported", list_reports),
]
