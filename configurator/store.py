"""The configuration database: SQLite in WAL mode, one row per device, group commits.

A home gateway loses power without warning, and after a power cut every device comes back at
once. Each commit must therefore be durable (`synchronous=FULL`: the WAL is fsynced before
COMMIT returns) and cheap (it writes only the rows that changed, so its cost does not grow
with the number of devices), and many changes share one commit: inside `transaction()` puts
are applied to the in-memory view at once and written together when the block ends. If the
commit fails, the in-memory view is put back as it was, so nothing is ever shown that is not
on disk.

Fencing: a configurator claims the next epoch with `claim_epoch()`; from then on every
commit first checks, inside the write lock, that no other configurator has claimed a higher
one since. A fenced commit raises `Fenced` and writes nothing. A transaction that wrote
nothing still ends with the check (`check_fence()`): its caller sends what it decided on
once the block ends, and a fenced configurator must send nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from .records import DeviceRecord

APPLICATION_ID = 0x686E6574  # "hnet": tells a homenet database from any other SQLite file
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_MISSING = object()


class StoreError(Exception):
    """The database cannot be read or written (not homenet's, damaged, read-only, disk full)."""


class Fenced(StoreError):
    """Another configurator claimed a higher epoch: this one must stop writing."""


class Store(Protocol):
    def get(self, device_id: str) -> DeviceRecord | None: ...
    def put(self, record: DeviceRecord) -> None: ...
    def delete(self, device_id: str) -> None: ...
    def all(self) -> list[DeviceRecord]: ...
    def meta(self) -> dict[str, Any]: ...
    def set_meta(self, **values: Any) -> None: ...
    def set_meta_now(self, **values: Any) -> None: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def claim_epoch(self) -> int: ...
    def check_fence(self) -> None: ...


class SqliteStore:
    """Devices and configurator metadata; validated records are cached in memory.

    Planning looks at every device, so reads never touch the disk: the cache is loaded once
    and then changed only together with the rows. Calls outside `transaction()` commit at once.
    Thread-safe: one lock serialises transactions (the configurator's worker thread writes;
    its sequence counter may reserve numbers from the gateway driver's thread).
    """

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        self._depth = 0
        self._undo: dict[str, Any] = {}
        self._undo_meta: dict[str, Any] = {}
        self._epoch: int | None = None
        self._records: dict[str, DeviceRecord] = {}
        self._meta: dict[str, Any] = {}
        self._db: sqlite3.Connection | None = None
        if read_only and not self.path.exists():
            return  # nothing stored yet; and a reader must not create the file
        self._db = self._open()
        if self._db is not None:
            self._load()

    # --- opening -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection | None:
        """None for a reader of a file whose schema is not made yet: nothing is stored."""
        if not self.read_only and not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # WAL/SHM files inherit the mode
        if not os.access(self.path, os.R_OK if self.read_only else os.R_OK | os.W_OK):
            raise StoreError(f"cannot {'read' if self.read_only else 'write'} {self.path}: permission denied "
                             "(run it as the gateway's user or root)")
        uri = f"file:{self.path}?mode={'ro' if self.read_only else 'rw'}"
        try:
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10)
            # tables first: once another process's schema commit shows, so does its application_id
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            if tables and app_id != APPLICATION_ID:
                raise StoreError(f"{self.path} is not a homenet database: an SQLite file of another "
                                 f"program (application_id {app_id:#x})")
            if self.read_only and not tables:  # the configurator is creating it
                db.close()
                return None
            if not self.read_only:
                _to_wal(db)
                db.execute("PRAGMA synchronous=FULL")
                if not tables:  # in one transaction: a reader never sees tables without the id
                    db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + f"PRAGMA application_id={APPLICATION_ID};"
                                     f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a homenet database: {exc}") from None
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has database schema {version}, newer than this homenet's "
                             f"{SCHEMA_VERSION}: upgrade homenet")
        return db

    def _has_tables(self) -> bool:
        assert self._db is not None
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE name='devices'").fetchone() is not None

    def _load(self) -> None:
        assert self._db is not None
        try:
            rows = self._db.execute("SELECT device_id, doc FROM devices").fetchall()
            meta = self._db.execute("SELECT key, value FROM meta").fetchall()
            self._records = {d: DeviceRecord.model_validate_json(doc) for d, doc in rows}
            self._meta = {k: json.loads(v) for k, v in meta}
        except (sqlite3.DatabaseError, ValidationError, ValueError) as exc:
            raise StoreError(f"{self.path} is not a homenet database: {exc}") from None

    # --- reading: from memory ------------------------------------------------------------

    def get(self, device_id: str) -> DeviceRecord | None:
        return self._records.get(device_id)

    def all(self) -> list[DeviceRecord]:
        return sorted(self._records.values(), key=lambda r: r.device_id)

    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    # --- writing: memory at once, disk at the end of the transaction -----------------------

    def put(self, record: DeviceRecord) -> None:
        with self.transaction():
            self._undo.setdefault(record.device_id, self._records.get(record.device_id, _MISSING))
            self._records[record.device_id] = record

    def delete(self, device_id: str) -> None:
        with self.transaction():
            if device_id in self._records:
                self._undo.setdefault(device_id, self._records.pop(device_id))

    def set_meta(self, **values: Any) -> None:
        with self.transaction():
            for key, value in values.items():
                self._undo_meta.setdefault(key, self._meta.get(key, _MISSING))
                self._meta[key] = value

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group the changes made inside into one durable commit; nested blocks join the outer one."""
        self._writable()
        with self._lock:
            self._depth += 1
            try:
                yield
                if self._depth == 1 and (self._undo or self._undo_meta):
                    self._write(self._undo, self._undo_meta)
                elif self._depth == 1:
                    self.check_fence()
            except BaseException:
                if self._depth == 1:
                    self._rollback()
                raise
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._undo.clear()
                    self._undo_meta.clear()

    def set_meta_now(self, **values: Any) -> None:
        """Durable before it returns, even inside an open transaction: for what must be on disk
        before it is used (a reserved sequence ceiling), whatever becomes of the batch around it."""
        self._writable()
        with self._lock:
            before = {k: self._meta.get(k, _MISSING) for k in values}
            self._meta.update(values)
            try:
                self._write((), values)
            except BaseException:
                for key, value in before.items():
                    _restore(self._meta, key, value)
                raise
            for key in values:  # on disk now: no longer the open batch's to undo
                self._undo_meta.pop(key, None)

    def claim_epoch(self) -> int:
        """Take the epoch above the highest any configurator claimed (read under the write
        lock, from disk: another process may share the file); later commits are fenced by it."""
        self._writable()
        with self._lock, self._sql() as db:
            epoch = _db_epoch(db) + 1
            db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (json.dumps(epoch),))
        self._epoch = self._meta["epoch"] = epoch
        return epoch

    def check_fence(self) -> None:
        """Raise `Fenced` if another configurator has claimed a higher epoch than this one's."""
        if self._epoch is None or self._db is None:
            return
        with self._lock:
            try:
                self._fence(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read {self.path}: {exc}") from exc

    def _fence(self, db: sqlite3.Connection) -> None:
        if self._epoch is not None and (on_disk := _db_epoch(db)) > self._epoch:
            raise Fenced(f"epoch {on_disk} was claimed by another configurator; this one has {self._epoch}")

    def _write(self, devices: Iterable[str], meta_keys: Iterable[str]) -> None:
        with self._sql() as db:
            self._fence(db)
            for device_id in devices:
                record = self._records.get(device_id)
                if record is None:
                    db.execute("DELETE FROM devices WHERE device_id=?", (device_id,))
                else:
                    db.execute("INSERT OR REPLACE INTO devices VALUES (?, ?)", (device_id, record.model_dump_json()))
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [(k, json.dumps(self._meta[k])) for k in meta_keys])

    @contextmanager
    def _sql(self) -> Iterator[sqlite3.Connection]:
        """One SQL transaction holding the database's write lock from its start (so a check
        made inside still holds at COMMIT); SQLite errors become StoreErrors naming the file."""
        assert self._db is not None
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write {self.path}: {exc}") from exc

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path} is opened read-only")

    def _rollback(self) -> None:
        for device_id, before in self._undo.items():
            _restore(self._records, device_id, before)
        for key, before in self._undo_meta.items():
            _restore(self._meta, key, before)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _restore(mapping: dict[str, Any], key: str, before: Any) -> None:
    """Put back what `key` held before a change that did not reach the disk."""
    if before is _MISSING:
        mapping.pop(key, None)
    else:
        mapping[key] = before


def _to_wal(db: sqlite3.Connection, timeout: float = 10.0) -> None:
    """Switch the database to WAL. The switch needs the file to itself, and SQLite answers
    "locked" at once, without waiting, while another process is making the schema: retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _db_epoch(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
    return int(json.loads(row[0])) if row else 0
