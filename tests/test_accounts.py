"""The broker accounts file (homenet/accounts.py): hashes only, replaced atomically, and
written once per batch of changes."""

from __future__ import annotations

import json

import pytest

from homenet.accounts import Accounts
from homenet.acl import Role


def on_disk(path) -> dict:
    return json.loads(path.read_text())["accounts"] if path.exists() else {}


def test_a_new_account_authenticates_with_its_password_and_the_file_keeps_only_a_hash(tmp_path):
    accounts = Accounts(tmp_path / "accounts.json")
    password = accounts.set("nas-1", Role.DEVICE)
    assert accounts.authenticate("nas-1", password).role == Role.DEVICE
    assert accounts.authenticate("nas-1", password + "x") is None
    assert password not in (tmp_path / "accounts.json").read_text()


def test_another_instance_sees_changes_as_the_broker_process_would(tmp_path):
    writer, broker = Accounts(tmp_path / "accounts.json"), Accounts(tmp_path / "accounts.json")
    password = writer.set("nas-1", Role.DEVICE)
    assert broker.authenticate("nas-1", password) is not None
    writer.remove("nas-1")
    assert broker.get("nas-1") is None


def test_changes_in_a_batch_reach_the_file_together_at_its_end(tmp_path):
    path = tmp_path / "accounts.json"
    accounts = Accounts(path)
    accounts.set("old", Role.DEVICE)
    with accounts.batch():
        passwords = {name: accounts.set(name, Role.DEVICE) for name in ("a", "b", "c")}
        accounts.remove("old")
        assert set(on_disk(path)) == {"old"}  # nothing written yet
        assert accounts.get("a") is not None and accounts.get("old") is None  # but seen by the writer
    assert set(on_disk(path)) == {"a", "b", "c"}
    reader = Accounts(path)
    assert all(reader.authenticate(name, password) for name, password in passwords.items())


def test_a_batch_that_fails_writes_nothing_and_the_file_is_the_truth_again(tmp_path):
    path = tmp_path / "accounts.json"
    accounts = Accounts(path)
    accounts.set("old", Role.DEVICE)
    with pytest.raises(RuntimeError):
        with accounts.batch():
            accounts.set("new", Role.DEVICE)
            accounts.remove("old")
            raise RuntimeError("the database commit failed")
    assert set(on_disk(path)) == {"old"}
    assert accounts.get("new") is None and accounts.get("old") is not None
