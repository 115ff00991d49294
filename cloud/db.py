"""The cloud's storage: SQLite (the embedded default) or PostgreSQL, through SQLAlchemy Core.

Every role declares its own tables on the one `metadata` and its own numbered migrations;
`migrate` applies what a database lacks, in order, under a lock that two server processes
starting at once on one PostgreSQL both respect (an advisory lock; SQLite: its write lock).
A server process holds nothing else: whatever must survive or be shared is in the database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()

schema_versions = sa.Table(
    "schema_versions", metadata,
    sa.Column("role", sa.String(32), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

server_meta = sa.Table(
    "server_meta", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

_MIGRATION_LOCK = 62608  # pg_advisory_xact_lock key: any constant shared by every process


class DatabaseError(Exception):
    """A database URL that cannot be used; the text says which and why."""


@dataclass(frozen=True)
class Migration:
    """One step of a role's schema: `apply` creates or alters its tables on `conn`."""

    version: int
    apply: Callable[[Connection], None]


MIGRATIONS: dict[str, list[Migration]] = {}
"""Each role's migrations, registered by its module in version order."""


def migrations(role: str, *steps: Migration) -> None:
    MIGRATIONS[role] = sorted(steps, key=lambda m: m.version)


def create(*tables: sa.Table) -> Callable[[Connection], None]:
    """A migration step that creates `tables` (as declared now: a later step alters them)."""
    return lambda conn: metadata.create_all(conn, tables=list(tables))


def url_of(database: str | None, default: Path) -> str:
    """A SQLAlchemy URL from `--database`: postgresql://… (psycopg 3), sqlite:///…, or a path."""
    if not database:
        return f"sqlite:///{default}"
    if database.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + database.split("://", 1)[1]
    if database.startswith(("postgresql+psycopg://", "sqlite:///")):
        return database
    if "://" in database:
        raise DatabaseError(f"database {database!r}: use postgresql://… or sqlite:///PATH (or a file path)")
    return f"sqlite:///{Path(database).resolve()}"


def engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            raise DatabaseError(f"database {path}: directory {path.parent} does not exist")
        eng = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(eng, "connect")
        def _pragmas(dbapi: object, _record: object) -> None:
            cursor = dbapi.cursor()  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
            dbapi.isolation_level = None  # type: ignore[attr-defined]  # BEGIN below, not pysqlite's

        @sa.event.listens_for(eng, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # writers queue at once instead of failing later

        return eng
    # no pre-ping (a round trip per request): a connection the server dropped fails one request,
    # and the pool replaces it
    return sa.create_engine(url, pool_size=10, max_overflow=10, pool_recycle=3600)


def migrate(eng: Engine) -> dict[str, int]:
    """Bring every role's tables up to date; return the version each role is at."""
    try:
        with eng.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            metadata.create_all(conn, tables=[schema_versions, server_meta])
            have = {r.role: r.version for r in conn.execute(sa.select(schema_versions))}
            for role, steps in MIGRATIONS.items():
                current = have.get(role, 0)
                for step in steps:
                    if step.version > current:
                        step.apply(conn)
                        current = step.version
                if role not in have:
                    conn.execute(schema_versions.insert().values(role=role, version=current))
                elif current != have[role]:
                    conn.execute(schema_versions.update().where(schema_versions.c.role == role)
                                 .values(version=current))
                have[role] = current
            return have
    except sa.exc.OperationalError as exc:
        raise DatabaseError(f"cannot use the database: {str(exc.orig).strip().splitlines()[0]}") from None
