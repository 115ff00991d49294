"""The IGMP proxy: igmpproxy's configuration (pure) and its process, run while a device needs it.

igmpproxy joins on the WAN (upstream) the groups that devices join on the LAN (downstream) and
routes the streams down. Interfaces it is not told about would be downstream too, so every
other interface is listed as disabled. It cannot reload its configuration: a changed one means
a restart. It runs as the driver's child with the parent-death signal set, so it never outlives
the configurator (a reboot or a configurator restart re-applies every config, restarting it).
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from homenet.durable import write_atomic

from . import GatewayError

PR_SET_PDEATHSIG = 1
STARTUP_GRACE = 0.3
"""Seconds igmpproxy must stay up after start: a bad config or interface makes it exit at once."""


def render_conf(upstream: str, downstream: str, interfaces: Iterable[str]) -> str:
    """Streams from any source on the WAN (`altnet 0.0.0.0/0`: IPTV sources are not on the WAN's subnet)."""
    others = sorted(set(interfaces) - {upstream, downstream})
    return ("# written by homenet (configurator gateway driver `linux`); do not edit\nquickleave\n\n"
            f"phyint {upstream} upstream ratelimit 0 threshold 1\n\taltnet 0.0.0.0/0\n\n"
            f"phyint {downstream} downstream ratelimit 0 threshold 1\n\n"
            + "".join(f"phyint {name} disabled\n" for name in others))


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class IgmpProxy:
    """igmpproxy as a child process; its log goes beside its config file."""

    def __init__(self, program: str, conf: Path) -> None:
        self.program = program
        self.conf = Path(conf)
        self._process: subprocess.Popen[bytes] | None = None
        self._running_conf: str | None = None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def ensure(self, wanted: bool, conf: str) -> None:
        """Running with `conf` when wanted, stopped otherwise; started again if it died."""
        if not wanted:
            self.stop()
            return
        if self.running() and self._running_conf == conf:
            return
        self.stop()
        try:
            write_atomic(self.conf, conf.encode(), 0o644)
            log = self.conf.with_suffix(".log").open("ab")
        except OSError as exc:
            raise GatewayError(f"cannot write {self.conf}: {exc.strerror}") from None
        try:
            self._process = subprocess.Popen([self.program, "-d", "-v", str(self.conf)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log, preexec_fn=_die_with_parent)
        except OSError as exc:
            raise GatewayError(f"cannot start {self.program}: {exc.strerror}") from None
        finally:
            log.close()
        time.sleep(STARTUP_GRACE)
        if not self.running():
            code = self._process.returncode
            self._process = None
            raise GatewayError(f"igmpproxy exited at start with status {code}; see {self.conf.with_suffix('.log')}")
        self._running_conf = conf

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._running_conf = None
