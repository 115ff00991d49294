"""The cloud side for tests: `homenet cloud run` processes and their operator API
(the PostgreSQL server is homenet/postgres.py's)."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from homenet.netutil import free_port

from .processes import Process


def homenet_bin() -> str:
    return str(Path(sys.executable).with_name("homenet"))


class CloudServer:
    """One `homenet cloud run` process on a free port; its operator token in the temp dir."""

    def __init__(self, tmp: Path, database: str | None, name: str = "cloud", host: str = "127.0.0.1") -> None:
        self.tmp, self.database, self.name, self.host = tmp, database, name, host
        self.port = free_port()
        self.token_file = tmp / "operator.token"
        if not self.token_file.exists():
            self.token_file.write_text("test-operator-token-0123456789\n")
        self.proc: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        args = [homenet_bin(), "cloud", "run", "--listen", f"{self.host}:{self.port}",
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
