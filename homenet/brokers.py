"""Brokers on a free loopback port, for the benchmark and the tests: embedded amqtt or Mosquitto.

Mosquitto is Debian's real program, run with a config written to a temp dir and stopped by
its PID.
"""

from __future__ import annotations

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

    def start(self) -> None: ...
    def stop(self) -> None: ...


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Mosquitto:
    name = "mosquitto"

    def __init__(self, port: int | None = None, max_payload: int = 256 * 1024) -> None:
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.max_payload = max_payload
        self._dir = Path(tempfile.mkdtemp(prefix="homenet-mosquitto-"))
        self.log_path = self._dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None)

    def start(self) -> None:
        binary = self.binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (Debian package 'mosquitto')")
        conf = self._dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"message_size_limit {self.max_payload}\nmax_queued_messages 100000\n"
            # off by default in 2.0: back-to-back small packets then wait ~40 ms for a delayed ACK
            "set_tcp_nodelay true\n"
            f"log_dest file {self.log_path}\nlog_type error\nlog_type warning\nlog_type notice\n")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_listening(self.port)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


class Embedded:
    """The embedded amqtt broker on its own thread, in this process."""

    name = "amqtt"

    def __init__(self, port: int | None = None, max_payload: int = 256 * 1024,
                 accounts_file: Path | None = None) -> None:
        from homenet.broker.server import BrokerThread
        from homenet.schemas import Topics
        from homenet.settings import BrokerSettings

        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._thread = BrokerThread(BrokerSettings(listeners=[f"127.0.0.1:{self.port}"], max_payload=max_payload,
                                                   accounts_file=accounts_file), Topics())

    def start(self) -> None:
        self._thread.start()  # returns once amqtt listens

    def stop(self) -> None:
        self._thread.stop()
