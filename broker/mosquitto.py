"""Mosquitto as the gateway's broker: `[broker] engine = "mosquitto"`, or `"auto"` where it is installed.

Why it exists: on a 2-core gateway, amqtt and the configurator in one interpreter take 7x
Mosquitto's time for a storm of 1,000 devices and lose some (docs/performance.md, "Broker
engine"). Debian's Mosquitto does the broker's part in C, in a process of its own.

`homenet gateway run` owns it whole, so it is still one appliance with one data directory:
  config    `DATA/mosquitto/mosquitto.conf`, rewritten at every start from `[broker]` (the same
            listeners, TLS certificate and payload limit as the embedded broker);
  accounts  its dynamic-security plugin (`DATA/mosquitto/dynsec.json`), made on first start
            with an admin whose password only homenet knows (`dynsec-admin.secret`, owner
            only); the configurator provisions every account through it (configurator/dynsec.py)
            instead of writing the embedded broker's accounts file;
  lifetime  a child process: started before the configurator, stopped (SIGTERM, then SIGKILL)
            after it, killed by the kernel if homenet dies (PR_SET_PDEATHSIG); if it exits on
            its own the gateway stops with an error, and its supervisor restarts both.
Its log goes to the gateway's stderr (the journal under systemd).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pwd
import secrets
import signal
import stat
import subprocess
from pathlib import Path

from homenet.brokers import Mosquitto, dynsec_security, mosquitto_conf, wait_listening
from homenet.schemas import Topics
from homenet.settings import BrokerSettings, ConfiguratorSettings

log = logging.getLogger(__name__)

ADMIN = "dynsec-admin"


class EngineMissing(RuntimeError):
    """`engine = "mosquitto"` on a system without Mosquitto's programs."""


def choose_engine(engine: str) -> str:
    """"amqtt" or "mosquitto" for the `[broker] engine` setting: `auto` is Mosquitto when its
    binary, `mosquitto_ctrl` and the dynamic-security plugin are all installed."""
    missing = Mosquitto.dynsec_missing()
    if engine == "mosquitto" and missing:
        raise EngineMissing(f'broker engine "mosquitto": {missing} is not installed (Debian package "mosquitto")')
    if engine == "auto":
        return "amqtt" if missing else "mosquitto"
    return engine


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _bind(bind: str) -> tuple[str, int]:
    host, port = bind.rsplit(":", 1)
    return host or "0.0.0.0", int(port)


class MosquittoEngine:
    """The child Mosquitto of one gateway data directory."""

    def __init__(self, settings: BrokerSettings, data_dir: Path, topics: Topics) -> None:
        self.settings = settings
        self.topics = topics
        self.dir = data_dir / "mosquitto"
        self.secret = self.dir / "dynsec-admin.secret"
        self.proc: subprocess.Popen[bytes] | None = None

    def configurator_settings(self, conf: ConfiguratorSettings) -> ConfiguratorSettings:
        """The configurator's settings with accounts kept by this Mosquitto's plugin."""
        return conf.model_copy(update={"dynsec_admin": ADMIN, "dynsec_admin_password_file": self.secret,
                                       "accounts_file": None})

    def _prepare(self) -> str:
        """Write the config (and the plugin's file with its admin on the first start)."""
        from homenet.configurator.dynsec import unknown_acl_file

        self.dir.mkdir(parents=True, exist_ok=True)
        dynsec = self.dir / "dynsec.json"
        if not dynsec.exists():
            password = secrets.token_urlsafe(24)
            subprocess.run([str(Mosquitto.ctrl()), "dynsec", "init", str(dynsec), ADMIN, password],
                           check=True, capture_output=True, timeout=30)
            dynsec.chmod(0o600)  # password hashes
            fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(password + "\n")
        acl = self.dir / "acl"
        acl.write_text(unknown_acl_file(self.topics))
        binds = [(*_bind(b), False) for b in self.settings.listeners] + \
                [(*_bind(b), True) for b in self.settings.tls_listeners]
        tls = (self.settings.certfile, self.settings.keyfile) if self.settings.certfile and self.settings.keyfile else None
        user = ""
        if os.geteuid() == 0:
            user = self._as_mosquitto(dynsec, acl)
        conf = self.dir / "mosquitto.conf"
        conf.write_text(user + mosquitto_conf(binds, self.settings.max_payload, None, tls,
                                              dynsec_security(dynsec, acl)))
        return str(conf)

    def _as_mosquitto(self, *files: Path) -> str:
        """Started as root, Mosquitto runs as user `mosquitto` once its listeners and TLS key
        are loaded; then it reads the plugin's file and the acl and saves every account change,
        so that user is given this folder. Where it could not reach the folder (no such user, or
        a parent it may not enter) it stays root: the config line that says so."""
        try:
            owner = pwd.getpwnam("mosquitto")
        except KeyError:
            return "user root\n"
        if any(not parent.stat().st_mode & stat.S_IXOTH for parent in self.dir.resolve().parents):
            log.warning("broker: %s is not reachable by user mosquitto; mosquitto runs as root", self.dir)
            return "user root\n"
        for path in (self.dir, *files):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        return ""

    def start(self, timeout: float = 15.0) -> None:
        conf = self._prepare()
        self.proc = subprocess.Popen([str(Mosquitto.binary()), "-c", conf], preexec_fn=_die_with_parent)
        for bind in self.settings.listeners + self.settings.tls_listeners:
            host, port = _bind(bind)
            local = "::1" if ":" in host else ("127.0.0.1" if host == "0.0.0.0" else host)
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

