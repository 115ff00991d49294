"""Mosquitto as the gateway's broker: `[broker] engine = "mosquitto"`, or `"auto"` where it is installed.

Why it exists: on a 2-core gateway, amqtt and the configurator in one interpreter take 7x
Mosquitto's time for a storm of 1,000 devices and lose some (docs/performance.md, "Broker
engine"). Debian's Mosquitto does the broker's part in C, in a process of its own.

`homenet gateway run` owns it whole, so it is still one appliance with one data directory:
  config    `DATA/mosquitto/mosquitto.conf`, rewritten at every start from `[broker]` (the same
            listeners, TLS certificate and payload limit as the embedded broker);
  accounts  the configurator's accounts file as with amqtt (`broker-accounts.json`), mirrored
            after every change into Mosquitto's own `password_file` (salted SHA-512, its `$6$`)
            and an `acl_file` rendered from `homenet.acl.RULES`, then Mosquitto is told to
            reload (SIGHUP) and a login with the newest account confirms it did, before the
            configurator sends that account to its device. Not the dynamic-security plugin
            (what `configurator run` uses in front of someone else's Mosquitto): Mosquitto
            2.0's plugin rewrites its whole file on every command, two per new device, and a
            storm of 1,000 new devices took 18 CPU s of Mosquitto (measured, docs/performance.md);
  lifetime  a child process: started before the configurator, stopped (SIGTERM, then SIGKILL)
            after it, killed by the kernel if homenet dies (PR_SET_PDEATHSIG); if it exits on
            its own the gateway stops with an error, and its supervisor restarts both.
Its log (errors and warnings) goes to the gateway's stderr (the journal under systemd).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import hashlib
import logging
import os
import pwd
import secrets
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from homenet.accounts import Accounts, AccountError
from homenet.acl import OWN, RULES, Role, render
from homenet.brokers import Mosquitto, mosquitto_conf, wait_listening
from homenet.durable import write_atomic
from homenet.schemas import Topics
from homenet.settings import BrokerSettings, ConfiguratorSettings

log = logging.getLogger(__name__)


class EngineMissing(RuntimeError):
    """`engine = "mosquitto"` where it cannot run: not installed, or no plain listener."""


def choose_engine(settings: BrokerSettings) -> str:
    """"amqtt" or "mosquitto" for the `[broker] engine` setting: `auto` is Mosquitto when its
    binary is installed and there is a plain listener (every account change is confirmed by
    a local login on it; TLS only is for amqtt for now)."""
    missing = None if Mosquitto.binary() else "mosquitto is not installed (Debian package \"mosquitto\")"
    missing = missing or (None if settings.listeners else "it needs a plain listener (TLS only is for amqtt for now)")
    if settings.engine == "mosquitto" and missing:
        raise EngineMissing(f'broker engine "mosquitto": {missing}')
    if settings.engine == "auto":
        return "amqtt" if missing else "mosquitto"
    return settings.engine


def password_hash(password: str) -> str:
    """Mosquitto's `$6$` password-file hash: base64 salt, base64 SHA-512 of password + salt."""
    salt = secrets.token_bytes(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_file(topics: Topics, users: dict[str, Role]) -> str:
    """Mosquitto `acl_file` for `homenet.acl.RULES`: topic lines before any `user` line are the
    anonymous (unknown) devices'; `pattern` lines hold for every client, with `%c` its client
    id and `%u` its username (skipped for clients without one); `deny` lines are checked first."""
    def lines(role: Role, own: str, keyword: str) -> list[str]:
        rules = RULES[role]
        kind = {e: "write" for e in rules.publish}
        for e in rules.receive:
            kind[e] = "readwrite" if e in kind else "read"
        out = [f"{keyword} deny {render(e, topics, own)}" for e in rules.withheld]
        return out + [f"{'pattern' if OWN in e else keyword} {k} {render(e, topics, own)}" for e, k in kind.items()]

    device = lines(Role.DEVICE, "%u", "topic")
    shared = [d for d in device if not d.startswith("pattern")]  # e.g. configurator/state
    out = ["# homenet: rendered from homenet.acl.RULES at every account change; do not edit",
           "# unknown devices (anonymous; the client id is the device id)", *lines(Role.UNKNOWN, "%c", "topic"),
           # own topics as patterns: they hold for every client with a username (its device id)
           "# enrolled devices (the username is the device id)", *[d for d in device if d.startswith("pattern")]]
    for name, role in sorted(users.items()):
        out += [f"user {name}", *(lines(role, name, "topic") if role != Role.DEVICE else shared)]
    return "\n".join(out) + "\n"


def _connack(host: str, port: int, name: str, password: str, timeout: float = 2.0) -> int:
    """The CONNACK return code Mosquitto gives a login (MQTT 3.1.1, clean session)."""
    def string(text: str) -> bytes:
        return struct.pack("!H", len(text.encode())) + text.encode()

    body = (string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 10) + string(f"homenet-probe-{secrets.token_hex(4)}")
            + string(name) + string(password))
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body if len(body) < 128 else
                     bytes([0x10, (len(body) & 0x7F) | 0x80, len(body) >> 7]) + body)
        answer = sock.recv(4)
        sock.sendall(b"\xe0\x00")
    return answer[3] if len(answer) == 4 and answer[0] == 0x20 else -1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _bind(bind: str) -> tuple[str, int]:
    host, port = bind.rsplit(":", 1)
    return host or "0.0.0.0", int(port)


def _loopback(bind: str) -> tuple[str, int]:
    """The address this host reaches a listener bound to `bind` at."""
    host, port = _bind(bind)
    return ("::1" if ":" in host else "127.0.0.1" if host == "0.0.0.0" else host), port


class MirroredAccounts(Accounts):
    """The configurator's accounts file, mirrored into the child Mosquitto's password and ACL
    files at the end of every batch that changed it; returns only once Mosquitto took them."""

    def __init__(self, path: Path, engine: MosquittoEngine) -> None:
        super().__init__(path)
        self.engine = engine
        self._hashes = engine.read_password_file()
        self._newest: tuple[str, str] | None = None

    @property
    def hashes(self) -> dict[str, str]:
        return dict(self._hashes)

    def set(self, name: str, role: Role) -> str:
        with self.batch():
            password = super().set(name, role)
            self._hashes[name] = password_hash(password)
            self._newest = (name, password)
        return password

    def remove(self, name: str) -> None:
        with self.batch():
            super().remove(name)
            self._hashes.pop(name, None)
            self._newest = self._newest or ("", "")

    @contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock:
            outer = not self._batching
            with super().batch():
                yield
                if outer and self._newest is not None:  # Mosquitto's files first: then ours
                    newest, self._newest = self._newest, None
                    users = {n: a.role for n, a in self._accounts.items()}
                    self._hashes = {n: h for n, h in self._hashes.items() if n in users}
                    self.engine.load_accounts(self._hashes, users, newest if newest[0] else None)


class MosquittoEngine:
    """The child Mosquitto of one gateway data directory."""

    def __init__(self, settings: BrokerSettings, data_dir: Path, topics: Topics) -> None:
        self.settings = settings
        self.topics = topics
        self.dir = data_dir / "mosquitto"
        self.password_file = self.dir / "passwords"
        self.acl = self.dir / "acl"
        self.proc: subprocess.Popen[bytes] | None = None
        self.accounts = MirroredAccounts(settings.accounts_file or data_dir / "broker-accounts.json", self)

    def configurator_settings(self, conf: ConfiguratorSettings) -> ConfiguratorSettings:
        return conf.model_copy(update={"accounts_file": self.accounts.path})

    def read_password_file(self) -> dict[str, str]:
        try:
            lines = self.password_file.read_text().splitlines()
        except FileNotFoundError:
            return {}
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def _write_accounts(self, hashes: dict[str, str], users: dict[str, Role]) -> None:
        mode = 0o640 if os.geteuid() == 0 else 0o600
        write_atomic(self.password_file, "".join(f"{n}:{h}\n" for n, h in sorted(hashes.items())).encode(), mode)
        write_atomic(self.acl, acl_file(self.topics, users).encode(), 0o644)
        if os.geteuid() == 0 and (group := self._mosquitto_gid()) is not None:
            os.chown(self.password_file, 0, group)  # readable by the user Mosquitto runs as

    @staticmethod
    def _mosquitto_gid() -> int | None:
        try:
            return pwd.getpwnam("mosquitto").pw_gid
        except KeyError:
            return None

    def load_accounts(self, hashes: dict[str, str], users: dict[str, Role], newest: tuple[str, str] | None,
                      timeout: float = 5.0) -> None:
        """Write Mosquitto's files, make it reload them, and wait until it accepts `newest`."""
        self._write_accounts(hashes, users)
        if self.proc is None or self.proc.poll() is not None:
            return  # read at start
        self.proc.send_signal(signal.SIGHUP)
        if newest is None:
            return
        host, port = self._local()
        deadline = time.monotonic() + timeout
        while (code := _connack(host, port, *newest)) != 0:
            if time.monotonic() > deadline:
                raise AccountError(f"mosquitto did not take the new account {newest[0]} within {timeout:g} s "
                                   f"(CONNACK code {code})")
            time.sleep(0.002)

    def _local(self) -> tuple[str, int]:
        """Where this host reaches the first plain listener (a reload is confirmed there)."""
        return _loopback(self.settings.listeners[0])

    def _prepare(self) -> str:
        """Write the config and the account files from the accounts file as it is."""
        self.dir.mkdir(parents=True, exist_ok=True)
        users = {a.name: a.role for a in self.accounts.all()}
        hashes = {n: h for n, h in self.accounts.hashes.items() if n in users}
        if len(hashes) < len(users):  # e.g. made while the engine was amqtt
            log.warning("broker: %d account(s) have no Mosquitto password and cannot log in until issued again: %s", len(users) - len(hashes),
                        ", ".join(sorted(set(users) - set(hashes))[:10]))
        self._write_accounts(hashes, users)
        binds = [(*_bind(b), False) for b in self.settings.listeners] + \
                [(*_bind(b), True) for b in self.settings.tls_listeners]
        tls = (self.settings.certfile, self.settings.keyfile) if self.settings.certfile and self.settings.keyfile else None
        user = self._run_as() if os.geteuid() == 0 else ""
        conf = self.dir / "mosquitto.conf"
        conf.write_text(user + mosquitto_conf(binds, self.settings.max_payload, None, tls,
                                              f"password_file {self.password_file}\nacl_file {self.acl}\n"))
        return str(conf)

    def _run_as(self) -> str:
        """Started as root, Mosquitto runs as user `mosquitto` once its listeners and TLS key
        are loaded, and reads its password and ACL files (again at every reload) as that user.
        Where that user could not reach them (no such user, or a parent folder it may not
        enter) it stays root: the config line that says so."""
        if self._mosquitto_gid() is None:
            return "user root\n"
        if any(not parent.stat().st_mode & stat.S_IXOTH for parent in self.dir.resolve().parents):
            log.warning("broker: %s is not reachable by user mosquitto; mosquitto runs as root", self.dir)
            return "user root\n"
        return ""

    def start(self, timeout: float = 15.0) -> None:
        conf = self._prepare()
        self.proc = subprocess.Popen([str(Mosquitto.binary()), "-c", conf], preexec_fn=_die_with_parent)
        for bind in self.settings.listeners + self.settings.tls_listeners:
            local, port = _loopback(bind)
            try:
                wait_listening(port, timeout, local)
            except TimeoutError:
                code = self.proc.poll()
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on {bind}"
                                   + (f" (it exited with status {code}; its log is above)" if code is not None else ""))
        log.info("broker: mosquitto (pid %d) listening on %s", self.proc.pid,
                 ", ".join(self.settings.listeners + self.settings.tls_listeners))

    async def exited(self) -> int:
        """Wait until Mosquitto exits on its own; its status."""
        while self.proc is not None and self.proc.poll() is None:
            await asyncio.sleep(0.5)
        return self.proc.returncode if self.proc else 0

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
