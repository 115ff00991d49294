"""The configuration database (configurator/store.py), crash-safe files (homenet/durable.py) and
the persisted message counter (homenet/sequence.py)."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from homenet.configurator.lifecycle import State
from homenet.configurator.records import DeviceRecord
from homenet.configurator.store import Fenced, SqliteStore, StoreError
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
    return tmp_path / "homenet.db"


@pytest.fixture
def store(db_path: Path):
    s = SqliteStore(db_path)
    yield s
    s.close()


def reopened(db_path: Path) -> tuple[list[DeviceRecord], dict]:
    """What a configurator starting after a power cut would find."""
    again = SqliteStore(db_path, read_only=True)
    try:
        return again.all(), again.meta()
    finally:
        again.close()


@pytest.fixture
def disk_full(monkeypatch):
    """Make every SQL write fail as a full disk would (the in-memory side is left to the store)."""

    def fail(store: SqliteStore) -> None:
        class Full:
            def __init__(self, db):
                self.db = db

            def execute(self, sql, *args):
                if sql.startswith(("INSERT", "DELETE")):
                    raise sqlite3.OperationalError("database or disk is full")
                return self.db.execute(sql, *args)

            executemany = execute

        monkeypatch.setattr(store, "_db", Full(store._db))

    return fail


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
    first = SqliteStore(db_path)
    first.put(rec)
    first.put(record("nas-1", "nas"))
    first.delete("nas-1")
    first.set_meta(epoch=7)
    first.close()
    assert reopened(db_path) == ([rec], {"epoch": 7})


def test_database_file_is_private(store, db_path):
    store.put(record())
    for path in db_path.parent.iterdir():  # the database and its WAL
        assert path.stat().st_mode & 0o077 == 0, path


def test_a_reader_coming_before_the_writer_made_its_tables_sees_an_empty_store(db_path):
    db_path.touch()  # the writer has just created the file
    assert SqliteStore(db_path, read_only=True).all() == []


def test_opening_a_missing_database_read_only_does_not_create_it(db_path):
    assert SqliteStore(db_path, read_only=True).all() == []
    assert not db_path.exists()


def test_a_reader_of_a_database_being_created_sees_nothing_stored(db_path):
    """The configurator creates the file first, then the schema (with the application id, in
    one transaction): a reader in between finds an empty file, not a foreign database."""
    db_path.touch()
    assert SqliteStore(db_path, read_only=True).all() == []


# --- group commits -------------------------------------------------------------------------

def test_changes_inside_a_transaction_are_visible_at_once_and_on_disk_at_its_end(store, db_path):
    with store.transaction():
        store.put(record("stb-1"))
        store.put(record("nas-1", "nas"))
        store.set_meta(seq_reserved=1000)
        assert [r.device_id for r in store.all()] == ["nas-1", "stb-1"]  # planning sees them
        assert reopened(db_path) == ([], {})  # nothing acknowledged can depend on them yet
    records, meta = reopened(db_path)
    assert [r.device_id for r in records] == ["nas-1", "stb-1"] and meta == {"seq_reserved": 1000}


def test_a_transaction_that_raises_writes_nothing_and_is_undone_in_memory(store, db_path):
    store.put(record("stb-1", state=State.REGISTERED))
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.put(record("stb-1", state=State.CONFIGURED))
            store.put(record("nas-1", "nas"))
            store.delete("stb-1")
            store.set_meta(epoch=9)
            raise RuntimeError("handler bug")
    assert [(r.device_id, r.state) for r in store.all()] == [("stb-1", State.REGISTERED)]
    assert store.meta() == {}
    assert [(r.device_id, r.state) for r in reopened(db_path)[0]] == [("stb-1", State.REGISTERED)]


def test_nested_transactions_join_the_outer_commit(store, db_path):
    with store.transaction():
        with store.transaction():
            store.put(record("stb-1"))
        assert reopened(db_path) == ([], {})
    assert [r.device_id for r in reopened(db_path)[0]] == ["stb-1"]


def test_set_meta_now_is_durable_even_if_the_batch_around_it_fails(store, db_path):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.put(record())
            store.set_meta_now(seq_reserved=2000)
            raise RuntimeError("batch fails")
    assert store.meta() == {"seq_reserved": 2000}
    assert reopened(db_path) == ([], {"seq_reserved": 2000})


# --- power cuts, full disks and damaged files ------------------------------------------------

def test_failed_commit_changes_neither_the_file_nor_what_the_store_shows(store, db_path, disk_full):
    store.put(record(state=State.REGISTERED))
    store.set_meta(epoch=1)
    disk_full(store)
    with pytest.raises(StoreError, match=f"cannot write {db_path}: database or disk is full"):
        with store.transaction():
            store.put(record(state=State.CONFIGURED))
            store.put(record("nas-1", "nas"))
            store.set_meta(epoch=2)
    assert [(r.device_id, r.state) for r in store.all()] == [("stb-1", State.REGISTERED)]
    assert store.meta() == {"epoch": 1}
    assert [(r.device_id, r.state) for r in reopened(db_path)[0]] == [("stb-1", State.REGISTERED)]


def test_store_works_again_after_a_failed_commit(store, db_path, disk_full, monkeypatch):
    disk_full(store)
    with pytest.raises(StoreError):
        store.put(record())
    monkeypatch.undo()
    store.put(record())
    assert [r.device_id for r in reopened(db_path)[0]] == ["stb-1"]


def test_a_killed_writer_leaves_the_last_commit(db_path):
    """SIGKILL in the middle of a batch: the committed state is there, the open batch is not."""
    script = (
        "import os, sys\n"
        "from homenet.configurator.store import SqliteStore\n"
        "from tests.test_store import record\n"
        f"s = SqliteStore({str(db_path)!r})\n"
        "s.put(record('stb-1'))\n"
        "with s.transaction():\n"
        "    s.put(record('nas-1', 'nas'))\n"
        "    os.kill(os.getpid(), 9)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    assert done.returncode == -9
    assert [r.device_id for r in reopened(db_path)[0]] == ["stb-1"]


def _open_and_close(path: str) -> str:
    try:
        SqliteStore(path).close()
        return "opened"
    except StoreError as exc:
        return str(exc)


def test_processes_creating_the_database_at_once_all_open_it(tmp_path):
    """Configurators starting together on a fresh data directory (docs/reliability.md)."""
    with multiprocessing.get_context("fork").Pool(4) as pool:
        for n in range(50):
            assert pool.map(_open_and_close, [str(tmp_path / f"homenet-{n}.db")] * 4) == ["opened"] * 4


@pytest.mark.parametrize("content", [b"{half a datab", b"not json at all", b"\x80\x81\xfe binary",
                                     b"SQLite format 3\x00" + b"\x00" * 40])
def test_file_that_is_not_a_database_raises_store_error_naming_the_path(db_path, content):
    db_path.write_bytes(content)
    with pytest.raises(StoreError, match=f"{db_path} is not a homenet database"):
        SqliteStore(db_path)


def test_sqlite_file_of_another_program_is_refused_and_left_alone(db_path):
    other = sqlite3.connect(db_path)
    other.execute("CREATE TABLE photos (name TEXT)")
    other.commit()
    other.close()
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="SQLite file of another program"):
        SqliteStore(db_path)
    assert db_path.read_bytes() == before


def test_a_database_from_a_newer_homenet_is_refused(store, db_path):
    store._db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="schema 99, newer than this homenet's"):
        SqliteStore(db_path)


def test_read_only_store_refuses_writes(store, db_path):
    store.put(record())
    store.set_meta(epoch=2)
    ro = SqliteStore(db_path, read_only=True)
    assert [r.device_id for r in ro.all()] == ["stb-1"]
    assert ro.meta() == {"epoch": 2}
    for write in (lambda: ro.put(record("nas-1", "nas")), lambda: ro.delete("stb-1"),
                  lambda: ro.set_meta(epoch=3), ro.claim_epoch):
        with pytest.raises(StoreError, match="read-only"):
            write()
    assert reopened(db_path)[1] == {"epoch": 2}


# --- epochs and fencing --------------------------------------------------------------------

def test_each_claim_takes_the_epoch_above_every_earlier_one(db_path):
    a, b = SqliteStore(db_path), SqliteStore(db_path)
    assert [a.claim_epoch(), b.claim_epoch(), a.claim_epoch()] == [1, 2, 3]
    assert reopened(db_path)[1] == {"epoch": 3}


def test_a_fenced_configurator_can_no_longer_commit(db_path):
    old, new = SqliteStore(db_path), SqliteStore(db_path)
    old.claim_epoch()
    old.put(record("stb-1"))
    new.claim_epoch()  # the standby took over
    with pytest.raises(Fenced, match="epoch 2 was claimed by another configurator; this one has 1"):
        old.put(record("nas-1", "nas"))
    assert old.get("nas-1") is None
    new.put(record("cam-1", "ip-camera"))
    assert [r.device_id for r in reopened(db_path)[0]] == ["cam-1", "stb-1"]


# --- homenet/durable.py --------------------------------------------------------------------

@pytest.fixture
def replace_fails(monkeypatch):
    """Make the rename at the end of write_atomic fail, as a full disk or a power cut would."""

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)


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
