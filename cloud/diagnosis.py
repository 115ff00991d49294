"""Diagnosis server: a cause and a remedy for a home's failure, from rules the operator extends.

Our reading of IEC 62608-2's diagnosis server. The configurator uploads a bundle when a config
fails or is rolled back, or a quality check fails (what the device is, its config and result,
the gateway's state for it, the events around it, the outages it knows of; never a secret:
the server refuses a bundle with a secret-looking field). The rules are data: built-in ones
below, and the operator's (same shape) in the database, which replace a built-in of the same
name. The first rule, by priority, whose every condition holds gives the diagnosis; `action` is
a remedy the configurator can take by itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection

from homenet.schemas.cloud import DiagnosisBundle, Name

from .api import HomeRoute, OperatorRoute
from .db import Migration, create, metadata, migrations
from .homes import Home, Refused

SECRET_FIELDS = frozenset({"password", "secret", "private_key", "credentials", "token"})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class Rule(BaseModel):
    """When every condition given holds, the bundle's cause is `cause` and its remedy `remedy`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Name
    priority: int = 100
    """Lower first."""
    trigger: list[str] | None = None
    failed_item: str | None = None
    """An item of this kind failed on the device."""
    item_status: str | None = None
    """An item ended with this status (e.g. `unsupported`)."""
    detail_contains: str | None = None
    """A failed item's detail contains this text (case-insensitive)."""
    missing_on_gateway: str | None = None
    """An item of this kind is in the config but not on the gateway."""
    behind_nat: bool | None = None
    """The home's WAN address is not the address the cloud sees it from (CGNAT, a second router)."""
    upstream_failure: bool | None = None
    """The operator has published a failure that concerns this home."""
    cause: Annotated[str, Field(min_length=1, max_length=256)]
    remedy: Annotated[str, Field(min_length=1, max_length=256)]
    action: Literal["reconcile", "replan-address"] | None = None


BUILT_IN = [
    Rule(name="upstream-down", priority=10, upstream_failure=True,
         cause="a service failure the operator has published for this home",
         remedy="nothing to do in the home: wait for the operator to resolve it"),
    Rule(name="port-forward-missing", priority=20, trigger=["quality.failed"], missing_on_gateway="port_mapping",
         cause="the port forward is missing on the gateway", remedy="re-apply the port forward (reconciliation)",
         action="reconcile"),
    Rule(name="behind-cgnat", priority=30, trigger=["quality.failed"], behind_nat=True,
         cause="the home is behind carrier-grade or a second NAT: its WAN address is not public",
         remedy="ask the operator for a public address, or use UPnP on the upstream router"),
    Rule(name="port-blocked-upstream", priority=40, trigger=["quality.failed"],
         cause="the port forward is in place but the port is blocked upstream",
         remedy="ask the operator to open the port, or choose another external port"),
    Rule(name="address-conflict", priority=50, failed_item="ipv4", detail_contains="in use",
         cause="the device's address is used by a host homenet does not manage",
         remedy="re-plan the device on another address", action="replan-address"),
    Rule(name="item-unsupported", priority=60, item_status="unsupported",
         cause="the device does not support an item of its config",
         remedy="update the device's agent, or give its model a profile without that item"),
]

bundles = sa.Table(
    "diagnosis_bundles", metadata,
    sa.Column("n", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("home_id", sa.String(64), nullable=False),
    sa.Column("bundle_id", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("bundle", sa.JSON, nullable=False),
    sa.Column("diagnosis", sa.JSON, nullable=False),
    sa.Column("received", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("home_id", "bundle_id"),
)
rules = sa.Table(
    "diagnosis_rules", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("doc", sa.JSON, nullable=False),
)
migrations("diagnosis", Migration(1, create(bundles, rules)))


# --- the pure core -------------------------------------------------------------------------

def secret_field(value: Any, path: str = "") -> str | None:
    """The path of the first secret-looking field anywhere in `value`, else None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if str(key).lower() in SECRET_FIELDS and item:
                return f"{path}{key}"
            if (found := secret_field(item, f"{path}{key}.")) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := secret_field(item, f"{path}{i}.")) is not None:
                return found
    return None


def _items(bundle: DiagnosisBundle) -> list[dict[str, Any]]:
    return list((bundle.result or {}).get("items", []))


def _behind_nat(bundle: DiagnosisBundle, peer: str) -> bool:
    wan = bundle.gateway.get("wan_address")
    try:
        return bool(wan) and (ipaddress.ip_address(wan) in _CGNAT or (bool(peer) and wan != peer))
    except ValueError:
        return False


def holds(rule: Rule, bundle: DiagnosisBundle, peer: str) -> bool:
    failed = [i for i in _items(bundle) if i.get("status") not in ("applied", "unchanged")]
    checks = [
        rule.trigger is None or bundle.trigger in rule.trigger,
        rule.failed_item is None or any(str(i.get("item", "")).startswith(rule.failed_item) for i in failed),
        rule.item_status is None or any(i.get("status") == rule.item_status for i in _items(bundle)),
        rule.detail_contains is None or any(rule.detail_contains.lower() in str(i.get("detail", "")).lower()
                                            for i in failed),
        rule.missing_on_gateway is None or any(str(m).startswith(rule.missing_on_gateway)
                                               for m in bundle.gateway.get("missing", [])),
        rule.behind_nat is None or rule.behind_nat == _behind_nat(bundle, peer),
        rule.upstream_failure is None or rule.upstream_failure == bool(bundle.failures),
    ]
    return all(checks)


def diagnose(bundle: DiagnosisBundle, peer: str, ruleset: Iterable[Rule]) -> dict[str, Any]:
    for rule in sorted(ruleset, key=lambda r: (r.priority, r.name)):
        if holds(rule, bundle, peer):
            return {"rule": rule.name, "cause": rule.cause, "remedy": rule.remedy, "action": rule.action}
    return {"rule": None, "cause": "no rule matched", "remedy": "the operator should look at the bundle",
            "action": None}


def ruleset(conn: Connection) -> list[Rule]:
    own = {r.name: Rule.model_validate(r.doc) for r in conn.execute(sa.select(rules))}
    return [*own.values(), *(r for r in BUILT_IN if r.name not in own)]


# --- routes --------------------------------------------------------------------------------

def upload(conn: Connection, home: Home, bundle: DiagnosisBundle) -> dict[str, Any]:
    if (field := secret_field(bundle.model_dump(mode="json"))) is not None:
        raise Refused(400, f"bundle carries a secret ({field}); nothing stored")
    known = conn.execute(sa.select(bundles.c.diagnosis).where(bundles.c.home_id == home.home_id,
                                                              bundles.c.bundle_id == bundle.bundle_id)).scalar()
    if known is not None:
        return known
    result = {"device_id": bundle.device_id, "bundle_id": bundle.bundle_id,
              **diagnose(bundle, home.peer, ruleset(conn))}
    conn.execute(bundles.insert().values(home_id=home.home_id, bundle_id=bundle.bundle_id,
                                         device_id=bundle.device_id, bundle=bundle.model_dump(mode="json"),
                                         diagnosis=result))
    return result


HOME_ROUTES = [
    HomeRoute("/v1/diagnosis", "cloud.diagnosis", "Diagnose a failure from its bundle", upload,
              max_size=256 * 1024),
]


def put_rule(conn: Connection, params: dict[str, str], body: Rule) -> dict[str, Any]:
    if body.name != params["name"]:
        raise Refused(400, f"rule {body.name!r} on the path of rule {params['name']!r}")
    doc = body.model_dump(mode="json")
    if conn.execute(rules.update().where(rules.c.name == body.name).values(doc=doc)).rowcount == 0:
        conn.execute(rules.insert().values(name=body.name, doc=doc))
    return doc


def list_rules(conn: Connection, _params: dict[str, str], _body: None) -> list[Any]:
    return [r.model_dump(mode="json") for r in sorted(ruleset(conn), key=lambda r: (r.priority, r.name))]


def list_diagnoses(conn: Connection, params: dict[str, str], _body: None) -> list[Any]:
    rows = conn.execute(sa.select(bundles).where(bundles.c.home_id == params["home_id"]).order_by(bundles.c.n))
    return [r.diagnosis for r in rows]


OPERATOR_ROUTES = [
    OperatorRoute("PUT", "/v1/operator/rules/{name}", "Add or replace a diagnosis rule", put_rule, Rule),
    OperatorRoute("GET", "/v1/operator/rules", "The diagnosis rules in force, in order", list_rules),
    OperatorRoute("GET", "/v1/operator/homes/{home_id}/diagnoses", "A home's diagnoses", list_diagnoses),
]
