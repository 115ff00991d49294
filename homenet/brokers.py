"""Brokers on a free loopback port, for the benchmark and the tests: embedded amqtt or Mosquitto.

Mosquitto is Debian's real program, run with a config written to a temp dir and stopped by
its PID. `Mosquitto(dynsec=True)` loads its dynamic-security plugin, initialised with an admin
(`handle.admin`) through which a configurator provisions accounts (configurator/dynsec.py).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Protocol

from homenet.netutil import free_port


class BrokerHandle(Protocol):
    name: str
    url: str
    port: int
    cafile: Path | None
    """The certificate to trust when the broker speaks TLS, else None."""
    fingerprint: str | None

    def start(self) -> None: ...
    def stop(self) -> None: ...


def wait_listening(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def mosquitto_conf(listeners: list[tuple[str, int, bool]], max_payload: int, log_path: Path | None,
                   tls: tuple[Path, Path] | None = None, security: str = "") -> str:
    """A mosquitto.conf: `listeners` (host, port, speaks TLS with `tls`: certfile, keyfile);
    anonymous clients allowed (`security`, e.g. the dynamic-security lines, then decides what
    they may do); no persistence, like the embedded broker; TCP_NODELAY on; the log to
    `log_path`, or to stderr (errors and warnings only) when None."""
    def listener(host: str, port: int, secure: bool) -> str:
        cert = f"certfile {tls[0]}\nkeyfile {tls[1]}\n" if secure and tls else ""
        return f"listener {port} {host}\n{cert}"

    return ("".join(listener(*bind) for bind in listeners)
            + "allow_anonymous true\npersistence false\n"
            f"message_size_limit {max_payload}\nmax_queued_messages 100000\n"
            # off by default in 2.0: back-to-back small packets then wait ~40 ms for a delayed ACK
            "set_tcp_nodelay true\n"
            # with dynsec, still allow_anonymous: anonymous clients are unknown devices, with the
            # rights of the plugin's anonymous group and the acl_file patterns
            + security
            # to stderr (a gateway's journal) not the notices: a line per connection
            + (f"log_dest file {log_path}\nlog_type notice\n" if log_path else "log_dest stderr\n")
            + "log_type error\nlog_type warning\n")


class Mosquitto:
    name = "mosquitto"
    DYNSEC_ADMIN = "dynsec-admin"
    """Not `admin`: that is homenet's own operator account (configurator/app.py)."""

    def __init__(self, port: int | None = None, max_payload: int = 256 * 1024, dynsec: bool = False,
                 root: str | None = None, tls: bool = False, user: str | None = None) -> None:
        """`dynsec`: with the dynamic-security plugin, an admin login in `self.admin`, and the
        `acl_file` patterns for unknown devices under topic root `root` (the default one).
        `tls`: the listener speaks TLS only, with a certificate made as the gateway makes its
        own (`cafile`, `fingerprint`). `user` (as root): Mosquitto drops to that user, as
        Debian's service does, its files handed to it as docs/security.md's recipe says."""
        self.port = port or free_port()
        self.url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.port}"
        self.max_payload = max_payload
        self._dir = Path(tempfile.mkdtemp(prefix="homenet-mosquitto-"))
        self.cafile: Path | None = None
        self.fingerprint: str | None = None
        if tls:
            from homenet.tls import ensure_certificate, fingerprint

            self.cafile = self._dir / "broker-cert.pem"
            self.fingerprint = fingerprint(ensure_certificate(self.cafile, self._dir / "broker-key.pem"))
        self.log_path = self._dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.dynsec = dynsec
        self.root = root
        self.dynsec_file = self._dir / "dynsec.json"
        self.admin: tuple[str, str] | None = (self.DYNSEC_ADMIN, secrets.token_urlsafe(24)) if dynsec else None
        self.user = user

    @staticmethod
    def binary() -> str | None:
        return shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None)

    @staticmethod
    def ctrl() -> str | None:
        return shutil.which("mosquitto_ctrl") or next(
            (p for p in ("/usr/bin/mosquitto_ctrl", "/usr/local/bin/mosquitto_ctrl") if Path(p).exists()), None)

    @staticmethod
    def dynsec_plugin() -> str | None:
        """The plugin: Debian puts it in the multiarch lib dir (`/usr/lib/x86_64-linux-gnu`)."""
        import sysconfig

        arch = sysconfig.get_config_var("MULTIARCH") or ""
        candidates = [f"/usr/lib/{arch}/mosquitto_dynamic_security.so" if arch else "",
                      *sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")),
                      "/usr/lib/mosquitto_dynamic_security.so", "/usr/local/lib/mosquitto_dynamic_security.so"]
        return next((p for p in candidates if p and Path(p).exists()), None)

    @classmethod
    def dynsec_missing(cls) -> str | None:
        """The name of what `Mosquitto(dynsec=True)` needs and does not find, else None."""
        for name, found in (("mosquitto", cls.binary()), ("mosquitto_ctrl", cls.ctrl()),
                            ("mosquitto_dynamic_security.so", cls.dynsec_plugin())):
            if found is None:
                return name
        return None

    def _dynsec_conf(self) -> str:
        from homenet.configurator.dynsec import unknown_acl_file
        from homenet.schemas import Topics

        missing = self.dynsec_missing()
        if missing:
            raise FileNotFoundError(f"{missing} is not installed (Debian package 'mosquitto')")
        assert self.admin is not None
        if not self.dynsec_file.exists():  # kept across a restart
            subprocess.run([str(self.ctrl()), "dynsec", "init", str(self.dynsec_file), *self.admin],
                           check=True, capture_output=True, timeout=30)
        acl = self._dir / "acl"
        acl.write_text(unknown_acl_file(Topics(self.root) if self.root else Topics()))
        if self.user:  # the recipe: the plugin's file (it saves every change) belongs to the broker
            for path in (self._dir, self.dynsec_file):
                shutil.chown(path, self.user, self.user)
            return (f"user {self.user}\nplugin {self.dynsec_plugin()}\nplugin_opt_config_file {self.dynsec_file}\n"
                    f"acl_file {acl}\n")
        # As root, mosquitto would switch to user `mosquitto`, which may not write the plugin's
        # file (it saves every change) in this root-owned temp dir.
        user = "user root\n" if os.geteuid() == 0 else ""
        return (f"{user}plugin {self.dynsec_plugin()}\nplugin_opt_config_file {self.dynsec_file}\n"
                f"acl_file {acl}\n")

    def start(self) -> None:
        binary = self.binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (Debian package 'mosquitto')")
        conf = self._dir / "mosquitto.conf"
        conf.write_text(mosquitto_conf([("127.0.0.1", self.port, self.cafile is not None)], self.max_payload, self.log_path,
                                       (self.cafile, self._dir / "broker-key.pem") if self.cafile else None,
                                       self._dynsec_conf() if self.dynsec else ""))
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_listening(self.port)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self._dir, ignore_errors=True)

    def halt(self) -> None:
        """Stop the process, keeping its files (`start` again is a restart)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Embedded:
    """The embedded amqtt broker on its own thread, in this process."""

    name = "amqtt"

    def __init__(self, port: int | None = None, max_payload: int = 256 * 1024,
                 accounts_file: Path | None = None, discovery: str = "homeassistant", **settings: object) -> None:
        """`discovery`: Home Assistant's prefix, for the ACL; `settings`: more BrokerSettings
        (e.g. `connect_timeout`, `max_connections`)."""
        from homenet.broker.server import BrokerThread
        from homenet.schemas import Topics
        from homenet.settings import BrokerSettings

        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.cafile: Path | None = None
        self.fingerprint: str | None = None
        self._thread = BrokerThread(BrokerSettings(listeners=[f"127.0.0.1:{self.port}"], max_payload=max_payload,
                                                   accounts_file=accounts_file, **settings),
                                    Topics(discovery=discovery))

    def start(self) -> None:
        self._thread.start()  # returns once amqtt listens

    def stop(self) -> None:
        self._thread.stop()
