"""The configuration database (configurator/store.py), crash-safe files (homenet/durable.py) and
the persisted message counter (homenet/sequence.py)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from homenet.configurator.lifecycle import State
from homenet.configurator.records import DeviceRecord
from homenet.configurator.store import DurableStorage, StoreError, TinyStore
from homenet.durable import read_json, write_atomic, write_json_atomic
from homenet.schemas.messages import DeviceInfo, Interface
from homenet.sequence import SequenceCounter


def record(device_id: str = "stb-1", device_type: str = "iptv-stb", **fields) -> DeviceRecord:
    info = DeviceInfo(device_id=device_id, device_type=device_type,
                      interfaces=[Interface(name="eth0", mac="02:00:00:00:00:01")])
    return DeviceRecord(device_id=device_id, info=info, **fields)


def leftovers(directory: Path) -> list[str]:
    """Temp files a write may have left next to the real file."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "homenet.json"


@pytest.fixture
def store(db_path: Path):
    s = TinyStore(db_path)
    yield s
    s.close()


@pytest.fixture
def replace_fails(monkeypatch):
    """Make the rename at the end of write_atomic fail, as a full disk or a power cut would."""

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)


# --- the store's API -----------------------------------------------------------------------

def test_new_store_is_empty(store):
    assert store.all() == []
    assert store.get("stb-1") is None
    assert store.meta() == {}


def test_put_then_get_returns_an_equal_record(store):
    rec = record(state=State.CONFIGURED, online=True, profile="iptv-stb", last_seq=12)
    store.put(rec)
    assert store.get("stb-1") == rec


def test_put_replaces_the_record_of_the_same_device(store):
    store.put(record(state=State.REGISTERED))
    store.put(record(state=State.CONFIGURING, error="x"))
    assert len(store.all()) == 1
    got = store.get("stb-1")
    assert (got.state, got.error) == (State.CONFIGURING, "x")


def test_all_lists_every_device_sorted_by_id(store):
    for device_id in ("nas-2", "cam-9", "stb-1"):
        store.put(record(device_id))
    assert [r.device_id for r in store.all()] == ["cam-9", "nas-2", "stb-1"]


def test_delete_removes_only_that_device(store):
    store.put(record("stb-1"))
    store.put(record("nas-1", "nas"))
    store.delete("stb-1")
    assert store.get("stb-1") is None
    assert [r.device_id for r in store.all()] == ["nas-1"]


def test_delete_of_an_unknown_device_is_harmless(store):
    store.put(record("stb-1"))
    store.delete("ghost")
    assert [r.device_id for r in store.all()] == ["stb-1"]


def test_meta_round_trip_merges_values(store):
    store.set_meta(epoch=3, configurator_id="gw-1")
    store.set_meta(seq_reserved=2000)
    store.set_meta(epoch=4)
    assert store.meta() == {"epoch": 4, "configurator_id": "gw-1", "seq_reserved": 2000}


def test_meta_and_devices_do_not_mix(store):
    store.set_meta(epoch=1)
    store.put(record())
    assert store.meta() == {"epoch": 1}
    assert [r.device_id for r in store.all()] == ["stb-1"]


def test_database_survives_reopening(db_path):
    rec = record(state=State.CONFIGURED, config_payload='{"kind":"config"}')
    first = TinyStore(db_path)
    first.put(rec)
    first.put(record("nas-1", "nas"))
    first.delete("nas-1")
    first.set_meta(epoch=7)
    first.close()

    again = TinyStore(db_path)
    assert again.all() == [rec]
    assert again.meta() == {"epoch": 7}
    again.close()


def test_database_file_is_json_and_leaves_no_temp_files(store, db_path):
    store.put(record())
    store.set_meta(epoch=1)
    data = json.loads(db_path.read_bytes())
    assert set(data) == {"devices", "meta"}
    assert leftovers(db_path.parent) == []


def test_database_file_is_private(store, db_path):
    store.put(record())
    assert db_path.stat().st_mode & 0o077 == 0


def test_opening_a_missing_database_does_not_create_it(db_path):
    TinyStore(db_path, read_only=True).all()
    assert not db_path.exists()


# --- power cuts and damaged files ----------------------------------------------------------

def test_failed_write_leaves_the_previous_file_intact_and_loadable(store, db_path, monkeypatch):
    store.put(record(state=State.REGISTERED))
    before = db_path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        store.put(record(state=State.CONFIGURED))
    with pytest.raises(OSError):
        store.put(record("nas-1", "nas"))
    monkeypatch.undo()

    assert db_path.read_bytes() == before
    assert leftovers(db_path.parent) == []
    reopened = TinyStore(db_path)
    assert [(r.device_id, r.state) for r in reopened.all()] == [("stb-1", State.REGISTERED)]
    reopened.close()


def test_failed_write_is_not_visible_through_the_open_store(store, monkeypatch):
    # The storage keeps the bytes last written, so a failed write is all-or-nothing in memory too.
    store.set_meta(epoch=1)
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        store.put(record())
    assert store.get("stb-1") is None
    assert store.meta() == {"epoch": 1}


def test_store_works_again_after_a_failed_write(store, db_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        store.put(record())
    monkeypatch.undo()
    store.put(record())
    reopened = TinyStore(db_path)
    assert reopened.get("stb-1") is not None
    reopened.close()


@pytest.mark.parametrize("content", [b"{half a datab", b"not json at all", b"\x80\x81\xfe binary",
                                     b"\xff\xfe\x00\x00junk", b""])
def test_file_that_is_not_json_raises_store_error_naming_the_path(db_path, content):
    db_path.write_bytes(content)
    with pytest.raises(StoreError, match=str(db_path)):
        TinyStore(db_path).all()


@pytest.mark.parametrize("content", [b"[]", b"42", b'"devices"', b"null"])
def test_json_that_is_not_a_homenet_database_raises_store_error_naming_the_path(db_path, content):
    db_path.write_bytes(content)
    with pytest.raises(StoreError, match=str(db_path)):
        TinyStore(db_path).all()


def test_read_only_store_refuses_writes_and_keeps_the_file(store, db_path):
    store.put(record())
    store.set_meta(epoch=2)
    before = db_path.read_bytes()
    ro = TinyStore(db_path, read_only=True)
    assert [r.device_id for r in ro.all()] == ["stb-1"]
    assert ro.meta() == {"epoch": 2}
    for write in (lambda: ro.put(record("nas-1", "nas")), lambda: ro.delete("stb-1"),
                  lambda: ro.set_meta(epoch=3)):
        with pytest.raises(StoreError, match="read-only"):
            write()
    assert db_path.read_bytes() == before


def test_durable_storage_reads_none_for_a_missing_file(db_path):
    assert DurableStorage(db_path).read() is None


def test_durable_storage_round_trip(db_path):
    storage = DurableStorage(db_path)
    storage.write({"devices": {"1": {"device_id": "x"}}})
    assert DurableStorage(db_path).read() == {"devices": {"1": {"device_id": "x"}}}


def test_durable_storage_forgets_changes_whose_write_failed(db_path, monkeypatch):
    storage = DurableStorage(db_path)
    storage.write({"meta": {"1": {"epoch": 1}}})
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left")))
    data = storage.read()
    data["meta"]["1"]["epoch"] = 99  # tinydb changes the data in place, then writes it
    with pytest.raises(OSError):
        storage.write(data)
    assert storage.read() == {"meta": {"1": {"epoch": 1}}}


# --- homenet/durable.py --------------------------------------------------------------------

def test_write_atomic_creates_parent_directories_and_sets_the_mode(tmp_path):
    path = tmp_path / "a" / "b" / "state.json"
    write_atomic(path, b"hello", mode=0o640)
    assert path.read_bytes() == b"hello"
    assert path.stat().st_mode & 0o777 == 0o640
    assert leftovers(path.parent) == []


def test_write_atomic_failure_keeps_the_old_file_and_removes_the_temp_file(tmp_path, replace_fails):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    with pytest.raises(OSError):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_atomic_failure_on_a_new_file_leaves_nothing(tmp_path, replace_fails):
    with pytest.raises(OSError):
        write_atomic(tmp_path / "state.json", b"new")
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_and_read_json_round_trip(tmp_path):
    path = tmp_path / "agent.json"
    write_json_atomic(path, {"seq_reserved": 1000, "key": "é"})
    assert read_json(path) == {"seq_reserved": 1000, "key": "é"}


def test_read_json_gives_the_default_for_a_missing_file(tmp_path):
    assert read_json(tmp_path / "missing.json") is None
    assert read_json(tmp_path / "missing.json", default={}) == {}


# --- homenet/sequence.py -------------------------------------------------------------------

class Disk:
    """A persisted ceiling, as a state file would hold it."""

    def __init__(self, ceiling: int = 0) -> None:
        self.ceiling = ceiling
        self.writes: list[int] = []

    def persist(self, ceiling: int) -> None:
        self.writes.append(ceiling)
        self.ceiling = ceiling

    def counter(self, block: int = 10) -> SequenceCounter:
        """A counter as a process starting now would make it."""
        return SequenceCounter(self.ceiling, self.persist, block=block)


def test_sequence_counts_up_from_one():
    counter = Disk().counter()
    assert [counter.next() for _ in range(5)] == [1, 2, 3, 4, 5]


def test_sequence_persists_only_once_per_block():
    disk = Disk()
    counter = disk.counter(block=10)
    for _ in range(25):
        counter.next()
    assert disk.writes == [10, 20, 30]


def test_sequence_persists_before_handing_out_the_first_number_of_a_block():
    disk = Disk()
    counter = disk.counter(block=10)
    assert disk.writes == []  # nothing is written until a number is needed
    assert counter.next() == 1
    assert disk.writes == [10]


def test_sequence_never_repeats_a_number_across_crashes():
    disk = Disk()
    issued: list[int] = []
    # Crash after various numbers of messages, including mid-block, at a block edge, and at once.
    for used in (3, 10, 0, 17, 1, 9, 25):
        counter = disk.counter(block=10)
        issued.extend(counter.next() for _ in range(used))
    assert len(issued) == len(set(issued))
    assert issued == sorted(issued)


def test_sequence_resumes_above_the_persisted_ceiling_after_a_crash():
    disk = Disk()
    counter = disk.counter(block=1000)
    last = [counter.next() for _ in range(5)][-1]
    assert last == 5 and disk.ceiling == 1000
    after_crash = disk.counter(block=1000)
    assert after_crash.next() == 1001


def test_every_number_handed_out_is_covered_by_a_persisted_ceiling_even_when_persist_fails():
    disk = Disk()
    failures = iter([True, False, True, True, False])

    def flaky(ceiling: int) -> None:
        if next(failures, False):
            raise OSError("disk full")
        disk.persist(ceiling)

    counter = SequenceCounter(0, flaky, block=3)
    issued = []
    for _ in range(20):
        try:
            value = counter.next()
        except OSError:
            continue
        assert value <= disk.ceiling, f"{value} handed out above the persisted ceiling {disk.ceiling}"
        issued.append(value)
    after_crash = disk.counter(block=3)
    assert after_crash.next() > max(issued)
    assert len(issued) == len(set(issued))


def test_sequence_is_unique_across_threads():
    disk = Disk()
    counter = disk.counter(block=7)
    results: list[list[int]] = [[] for _ in range(8)]

    def work(out: list[int]) -> None:
        for _ in range(500):
            out.append(counter.next())

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    issued = [n for out in results for n in out]
    assert sorted(issued) == list(range(1, 4001))
    assert disk.writes == sorted(disk.writes) and len(disk.writes) == -(-4000 // 7)
