"""Quality check server: from outside the home, is the service the configurator set up usable?

Our reading of IEC 62608-2's quality check server. The configurator asks after configuring a
device; the server connects in to the address the request came from (the home's WAN address as
the Internet sees it: it never connects to an address the home names, so it cannot be used to
probe third parties) on the forwarded ports. With more than one sample per port it also gives
the path's latency (TCP connect time) and loss (connects that failed), for AV devices.
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from homenet.schemas.cloud import QualityRequest

from .api import HomeRoute, OperatorRoute
from .db import Migration, create, metadata, migrations
from .homes import Home

CONNECT_TIMEOUT = 2.0
MAX_LOSS = 0.2
"""An AV path losing more than this share of connects fails the check."""

checks = sa.Table(
    "quality_checks", metadata,
    sa.Column("n", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("home_id", sa.String(64), nullable=False, index=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("verdict", sa.JSON, nullable=False),
    sa.Column("checked", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
migrations("quality", Migration(1, create(checks)))


def _connect_ms(address: str, port: int) -> float | None:
    start = time.perf_counter()
    try:
        with socket.create_connection((address, port), timeout=CONNECT_TIMEOUT):
            return (time.perf_counter() - start) * 1000
    except OSError:
        return None


def verdict(address: str, device_id: str, samples: dict[int, list[float | None]]) -> dict[str, Any]:
    """Pure: the verdict from each port's connect times (None: that connect failed)."""
    ports = []
    for port, times in samples.items():
        ok = [t for t in times if t is not None]
        loss = round(1000 * (1 - len(ok) / len(times)))
        entry: dict[str, Any] = {"protocol": "tcp", "port": port, "reachable": bool(ok), "loss_permille": loss}
        if ok:  # integers: numbers in a signed message are integers (docs/protocol.md)
            entry["latency_us"] = {"p50": round(1000 * statistics.median(ok)), "max": round(1000 * max(ok))}
        ports.append(entry)
    bad = [p for p in ports if not p["reachable"] or p["loss_permille"] > 1000 * MAX_LOSS]
    reason = "; ".join(f"tcp/{p['port']} on {address} " +
                       ("not reachable from outside" if not p["reachable"] else f"lost {p['loss_permille'] / 10:g} % of connects")
                       for p in bad)
    return {"device_id": device_id, "address": address, "passed": not bad, "reason": reason, "ports": ports}


def probe(home: Home, request: QualityRequest) -> dict[str, Any]:
    samples = {c.port: [_connect_ms(home.peer, c.port) for _ in range(request.samples)] for c in request.ports}
    return verdict(home.peer, request.device_id, samples)


def record(conn: Connection, home: Home, outcome: dict[str, Any]) -> dict[str, Any]:
    conn.execute(checks.insert().values(home_id=home.home_id, device_id=outcome["device_id"], verdict=outcome))
    return outcome


HOME_ROUTES = [
    HomeRoute("/v1/quality/check", "cloud.quality.check",
              "Connect in to the home's WAN address on the forwarded ports; latency and loss", record, probe=probe),
]


def history(conn: Connection, params: dict[str, str], _body: None) -> list[Any]:
    rows = conn.execute(sa.select(checks).where(checks.c.home_id == params["home_id"]).order_by(checks.c.n))
    return [r.verdict for r in rows]


OPERATOR_ROUTES = [
    OperatorRoute("GET", "/v1/operator/homes/{home_id}/quality", "A home's quality check verdicts", history),
]
