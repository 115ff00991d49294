"""Broker accounts: the file the configurator writes and the embedded broker reads.

`AccountStore` is what the configurator needs of any account store: this file, or an external
Mosquitto's dynamic-security plugin (`homenet.configurator.dynsec.DynsecAccounts`).

Every password is made by homenet (32 random bytes, URL-safe), never chosen by a person, so a
salted SHA-256 is enough: a slow hash protects guessable passwords, and these are not
guessable. The file holds only hashes; it is replaced atomically.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from homenet.acl import Role
from homenet.durable import read_json, write_atomic, write_json_atomic


def new_password() -> str:
    return secrets.token_urlsafe(32)


def hash_password(password: str, salt: str | None = None) -> str:
    salt = salt or secrets.token_hex(8)
    return f"sha256${salt}${hashlib.sha256((salt + password).encode()).hexdigest()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, salt, _digest = stored.split("$")
    except ValueError:
        return False
    return scheme == "sha256" and hmac.compare_digest(hash_password(password, salt), stored)


class AccountError(RuntimeError):
    """A store that could not make a change: unreachable, or refusing it (the text says why)."""


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    hash: str
    """Salted hash of the password; empty where the store does not disclose it (dynsec)."""


class AccountStore(Protocol):
    """The broker accounts a configurator issues, wherever the broker keeps them."""

    def get(self, name: str) -> Account | None: ...

    def set(self, name: str, role: Role) -> str:
        """Create or replace an account; returns its new password. May raise AccountError."""
        ...

    def remove(self, name: str) -> None: ...

    def batch(self) -> AbstractContextManager[None]:
        """Changes inside may be written together at the end; an exception inside drops them."""
        ...

    def authenticate(self, name: str, password: str) -> Account | None:
        """The account, if `password` is its password."""
        ...


class Accounts:
    """The accounts file, re-read when it changes on disk (the broker may be another process).

    The file holds every account, so writing it once per new device made a storm of N devices
    cost N² : inside `batch()` changes stay in memory and the file is written once at the end.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._stamp: tuple[int, int] | None = None
        self._accounts: dict[str, Account] = {}
        self._batching = False
        self._dirty = False

    def _load(self) -> dict[str, Account]:
        if self._dirty:
            return self._accounts
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return {}
        if stamp != self._stamp:
            raw = read_json(self.path, {}).get("accounts", {})
            self._accounts = {n: Account(n, Role(a["role"]), a["hash"]) for n, a in raw.items()}
            self._stamp = stamp
        return self._accounts

    def get(self, name: str) -> Account | None:
        with self._lock:
            return self._load().get(name)

    def all(self) -> list[Account]:
        with self._lock:
            return sorted(self._load().values(), key=lambda a: a.name)

    def authenticate(self, name: str, password: str) -> Account | None:
        account = self.get(name)
        return account if account and check_password(password, account.hash) else None

    def set(self, name: str, role: Role) -> str:
        """Create or replace an account; returns its new password (the file keeps only a hash)."""
        password = new_password()
        with self.batch():
            self._edit()[name] = Account(name, role, hash_password(password))
        return password

    def remove(self, name: str) -> None:
        with self.batch():
            if name in self._load():
                del self._edit()[name]

    def _edit(self) -> dict[str, Account]:
        """The accounts to change: a private copy until the batch writes it."""
        if not self._dirty:
            self._accounts = dict(self._load())
            self._dirty = True
        return self._accounts

    @contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock:
            if self._batching:  # joins the outer batch
                yield
                return
            self._batching = True
            try:
                yield
                if self._dirty:
                    write_json_atomic(self.path, {"accounts": {a.name: {"role": a.role.value, "hash": a.hash}
                                                               for a in self._accounts.values()}})
            finally:  # written or not, the file is the truth again
                self._batching = self._dirty = False
                self._stamp = None


def ensure_account(accounts: AccountStore, name: str, role: Role, secret: Path) -> str:
    """The password of a service account kept in an owner-only file; (re)made when missing."""
    try:
        password = Path(secret).read_text().strip()
    except FileNotFoundError:
        password = ""
    account = accounts.authenticate(name, password) if password else None
    if account is not None and account.role == role:
        return password
    password = accounts.set(name, role)
    write_atomic(Path(secret), (password + "\n").encode(), mode=0o600)
    return password
