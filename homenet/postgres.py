"""A PostgreSQL server of its own for tests and benchmarks (Debian's `postgresql` package).

`initdb` and `postgres` run in a temp dir as an unprivileged user (PostgreSQL refuses to run
as root; `setpriv` drops to `postgres` when we are root), on a free loopback port and a socket
in the temp dir, and are stopped by PID. fsync is off: these databases are thrown away.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from homenet.netutil import free_port


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def _unprivileged() -> str:
    """The user a root process runs PostgreSQL as: the package's own, else nobody."""
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return "nobody"


class Postgres:
    """One PostgreSQL cluster in a temp dir of its own (pytest's are root-only, and the server
    runs as another user); `url` names its `homenet` database."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="homenet-pg-"))
        self.port = free_port()
        self.bin = postgres_bin()
        assert self.bin is not None
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() else _unprivileged()

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

    def create_database(self, name: str) -> str:
        """A new empty database on this server; its URL."""
        assert self.bin is not None
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "homenet", name],
                       check=True, capture_output=True)
        return self.url.rsplit("/", 1)[0] + "/" + name

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
