"""The configuration database: tinydb over a storage that survives power cuts.

tinydb's JSONStorage rewrites its file in place, so a power cut mid-write leaves half a
database. DurableStorage writes a temp file, fsyncs it and renames it over the old one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from tinydb import Query, TinyDB
from tinydb.storages import Storage

from homenet.durable import write_atomic

from .records import DeviceRecord


class StoreError(Exception):
    """The database file cannot be read (e.g. not homenet's, or damaged by hand)."""


class DurableStorage(Storage):
    """Whole-file JSON storage with atomic replacement.

    The parsed database is kept in memory and handed to tinydb, which changes it in place and
    then calls write(); if that write fails, the in-memory copy is dropped and the next read
    reloads the file, which still holds the last committed state.
    """

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._data: dict[str, Any] | None = None

    def read(self) -> dict[str, Any] | None:
        if self._data is None:
            try:
                text = self.path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                data = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise StoreError(f"{self.path} is not a homenet database: {exc}") from None
            if not isinstance(data, dict):
                raise StoreError(f"{self.path} is not a homenet database: "
                                 f"it holds a JSON {type(data).__name__}, not an object")
            self._data = data
        return self._data

    def write(self, data: dict[str, Any]) -> None:
        if self.read_only:
            raise StoreError(f"{self.path} is opened read-only")
        try:
            write_atomic(self.path, json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
        except BaseException:
            self._data = None
            raise
        self._data = data


class Store(Protocol):
    def get(self, device_id: str) -> DeviceRecord | None: ...
    def put(self, record: DeviceRecord) -> None: ...
    def delete(self, device_id: str) -> None: ...
    def all(self) -> list[DeviceRecord]: ...
    def meta(self) -> dict[str, Any]: ...
    def set_meta(self, **values: Any) -> None: ...


class TinyStore:
    """Devices and configurator metadata in one tinydb file; each call is one durable write.

    Validated records are also kept in a dict, updated only after their write succeeded, so
    planning (which looks at every device) does not re-parse and re-validate the database.
    """

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self._db = TinyDB(self.path, storage=DurableStorage, read_only=read_only)
        self._devices = self._db.table("devices")
        self._meta = self._db.table("meta")
        self._records = {d["device_id"]: DeviceRecord.model_validate(d) for d in self._devices.all()}

    def get(self, device_id: str) -> DeviceRecord | None:
        return self._records.get(device_id)

    def put(self, record: DeviceRecord) -> None:
        # not upsert(): for a new document it writes twice (an empty update, then the insert)
        doc = record.to_doc()
        if record.device_id in self._records:
            match = Query().device_id == record.device_id
            self._devices.update(lambda old: (old.clear(), old.update(doc)), match)  # replace whole
        else:
            self._devices.insert(doc)
        self._records[record.device_id] = record

    def delete(self, device_id: str) -> None:
        self._devices.remove(Query().device_id == device_id)
        self._records.pop(device_id, None)

    def all(self) -> list[DeviceRecord]:
        return sorted(self._records.values(), key=lambda r: r.device_id)

    def meta(self) -> dict[str, Any]:
        doc = self._meta.get(doc_id=1)
        return dict(doc) if doc else {}

    def set_meta(self, **values: Any) -> None:
        self._meta.upsert({**self.meta(), **values}, Query().noop())

    def close(self) -> None:
        self._db.close()
