"""The cloud side for tests: a real PostgreSQL server, `homenet cloud run` processes, a signed home.

PostgreSQL is Debian's: `initdb` and `postgres` in a temp dir as an unprivileged user (it
refuses to run as root), on a free loopback port and a socket in the temp dir, stopped by PID.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from homenet.keys import KeyPair
from homenet.netutil import free_port

from .processes import Process


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


class Postgres:
    """One PostgreSQL cluster in a temp dir of its own (pytest's are root-only, and the server
    runs as another user); `url` names its `homenet` database."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="homenet-pg-"))
        self.port = free_port()
        self.bin = postgres_bin()
        assert self.bin is not None
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _as_owner(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        entry = pwd.getpwnam(self.user)
        return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]

    def start(self) -> None:
        (self.dir / "data").mkdir()
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            for path in (self.dir, self.dir / "data"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run([*self._as_owner(), str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "homenet",
                        "-A", "trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True, cwd=self.dir)
        with open(self.dir / "log", "ab") as log:
            self.proc = subprocess.Popen(
                [*self._as_owner(), str(self.bin / "postgres"), "-D", str(self.dir / "data"), "-p", str(self.port),
                 "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "max_connections=200"], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + 30
        while subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"postgres did not start: {(self.dir / 'log').read_text()[-2000:]}")
            time.sleep(0.1)
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "homenet",
                        "homenet"], check=True, capture_output=True)

    @property
    def url(self) -> str:
        return f"postgresql://homenet@127.0.0.1:{self.port}/homenet"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def homenet_bin() -> str:
    return str(Path(sys.executable).with_name("homenet"))


class CloudServer:
    """One `homenet cloud run` process on a free port; its operator token in the temp dir."""

    def __init__(self, tmp: Path, database: str | None, name: str = "cloud", host: str = "127.0.0.1",
                 prefix: tuple[str, ...] = ()) -> None:
        self.tmp, self.database, self.name, self.host, self.prefix = tmp, database, name, host, prefix
        self.port = free_port()
        self.token_file = tmp / "operator.token"
        if not self.token_file.exists():
            self.token_file.write_text("test-operator-token-0123456789\n")
        self.proc: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        args = [*self.prefix, homenet_bin(), "cloud", "run", "--listen", f"{self.host}:{self.port}",
                "--data-dir", str(self.tmp / "cloud-data"), "--operator-token-file", str(self.token_file)]
        if self.database:
            args += ["--database", self.database]
        self.proc = Process(self.tmp / f"{self.name}.log", *args)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.get("/health", auth=False)["ok"]:
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() > deadline or self.proc.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not start: {self.proc.output()[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()

    def request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def get(self, path: str, auth: bool = True) -> Any:
        return self.request("GET", path, auth=auth)

    def raw(self, path: str, payload: bytes) -> tuple[int, dict[str, Any]]:
        """POST bytes as they are; (status, JSON reply) whether accepted or refused."""
        request = urllib.request.Request(self.url + path, data=payload, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def home_key() -> KeyPair:
    return KeyPair.generate()
