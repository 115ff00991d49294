"""What the home keeps of its cloud link, in its own SQLite file beside the configuration database.

The outbox: reports waiting for the cloud, sent oldest first, each removed only once the cloud
acknowledged it; its id makes a second delivery (after a crash between the cloud's reply and
our delete) harmless. WAL with synchronous=NORMAL survives a killed process (kill -9), which is
what the outbox must outlive; what the configurator committed but had not yet queued here when
it died is found again at start, by comparing each device's last queued digest.
Also: the equipment profile cache (with expiry), the failures the operator published, the
quality verdicts and diagnoses of each device — `devices show` reads them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "cloud.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (n INTEGER PRIMARY KEY AUTOINCREMENT, report_id TEXT UNIQUE NOT NULL,
    path TEXT NOT NULL, body TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS queued (device_id TEXT PRIMARY KEY, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (maker TEXT NOT NULL, model TEXT NOT NULL, doc TEXT, expires REAL NOT NULL,
    PRIMARY KEY (maker, model));
CREATE TABLE IF NOT EXISTS failures (failure_id INTEGER PRIMARY KEY, rev INTEGER NOT NULL, service TEXT NOT NULL,
    summary TEXT NOT NULL, active INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS device_notes (device_id TEXT NOT NULL, kind TEXT NOT NULL, doc TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (device_id, kind));
"""


@dataclass(frozen=True)
class Pending:
    n: int
    report_id: str
    path: str
    body: dict[str, Any]


@dataclass(frozen=True)
class CachedProfile:
    doc: dict[str, Any] | None
    """None: the cloud has no profile for this model (cached too, so it is not asked each time)."""
    expires: float


class CloudState:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = Path(path)
        uri = f"file:{self.path}?mode=ro" if read_only else f"file:{self.path}"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        if not read_only:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _one(self, sql: str, *args: Any) -> Any:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _write(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # --- meta --------------------------------------------------------------------------------

    def meta(self, name: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM meta WHERE name = ?", name)
        return json.loads(row[0]) if row else default

    def set_meta(self, **values: Any) -> None:
        self._write(*(("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v))) for k, v in values.items()))

    # --- the outbox --------------------------------------------------------------------------

    def enqueue(self, path: str, body: dict[str, Any], device_id: str | None = None, digest: str | None = None) -> str:
        """Queue a report (and, for an inventory report, the digest it was made from) in one commit."""
        report_id = uuid.uuid4().hex
        body = {**body, "report_id": report_id}
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("INSERT INTO outbox (report_id, path, body, created) VALUES (?, ?, ?, ?)",
             (report_id, path, json.dumps(body), time.time()))]
        if device_id is not None and digest is not None:
            statements.append(("INSERT OR REPLACE INTO queued VALUES (?, ?)", (device_id, digest)))
        self._write(*statements)
        return report_id

    def queued_digest(self, device_id: str) -> str | None:
        row = self._one("SELECT digest FROM queued WHERE device_id = ?", device_id)
        return row[0] if row else None

    def next_pending(self) -> Pending | None:
        row = self._one("SELECT n, report_id, path, body FROM outbox ORDER BY n LIMIT 1")
        return Pending(row[0], row[1], row[2], json.loads(row[3])) if row else None

    def delivered(self, n: int) -> None:
        self._write(("DELETE FROM outbox WHERE n = ?", (n,)))

    def pending_count(self) -> int:
        return self._one("SELECT count(*) FROM outbox")[0]

    # --- profiles ----------------------------------------------------------------------------

    def profiles(self) -> dict[tuple[str, str], CachedProfile]:
        with self._lock:
            rows = self._db.execute("SELECT maker, model, doc, expires FROM profiles").fetchall()
        return {(m, mo): CachedProfile(json.loads(d) if d else None, e) for m, mo, d, e in rows}

    def put_profile(self, maker: str, model: str, doc: dict[str, Any] | None, expires: float) -> None:
        self._write(("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?)",
                     (maker, model, json.dumps(doc) if doc else None, expires)))

    # --- failures and device notes -----------------------------------------------------------

    def put_failure(self, notice: dict[str, Any], cursor: int) -> None:
        self._write(("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)",
                     (notice["failure_id"], notice["rev"], notice["service"], notice["summary"],
                      int(notice["active"]))),
                    ("INSERT OR REPLACE INTO meta VALUES ('failure_cursor', ?)", (json.dumps(cursor),)))

    def active_failures(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT failure_id, service, summary FROM failures WHERE active = 1 "
                                    "ORDER BY failure_id").fetchall()
        return [{"failure_id": f, "service": s, "summary": t} for f, s, t in rows]

    def note(self, device_id: str, kind: str, doc: dict[str, Any]) -> None:
        """The latest `kind` (quality, diagnosis) for the device."""
        self._write(("INSERT OR REPLACE INTO device_notes VALUES (?, ?, ?, ?)",
                     (device_id, kind, json.dumps(doc), time.time())))

    def notes(self, device_id: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT kind, doc FROM device_notes WHERE device_id = ?", (device_id,)).fetchall()
        return {k: json.loads(d) for k, d in rows}


def cloud_detail(data_dir: Path, device_id: str) -> str:
    """Lines for `devices show`: the device's last quality verdict and diagnosis, and the outages
    the operator has announced; empty without a cloud link."""
    path = Path(data_dir) / FILE_NAME
    if not path.exists():
        return ""
    state = CloudState(path, read_only=True)
    try:
        notes, failures = state.notes(device_id), state.active_failures()
    except sqlite3.Error:
        return ""
    finally:
        state.close()
    lines = []
    if quality := notes.get("quality"):
        lines.append(f"quality check: {'passed' if quality['passed'] else 'FAILED'}"
                     + (f" ({quality['reason']})" if quality.get("reason") else "")
                     + "".join(f"; tcp/{p['port']} p50 {p['latency_us']['p50'] / 1000:.2f} ms loss {p['loss_permille'] / 10:g} %"
                               for p in quality.get("ports", []) if "latency_us" in p))
    if diagnosis := notes.get("diagnosis"):
        lines.append(f"diagnosis: {diagnosis['cause']}; remedy: {diagnosis['remedy']}"
                     + (f" (taken: {diagnosis['action']})" if diagnosis.get("taken") else ""))
    for f in failures:
        lines.append(f"service failure #{f['failure_id']} ({f['service']}): {f['summary']}")
    return "\n".join(lines)
