"""The IGMP proxy: igmpproxy's configuration (pure) and its process, run while a device needs it.

igmpproxy joins on the WAN (upstream) the groups that devices join on the LAN (downstream) and
routes the streams down. Interfaces it is not told about would be downstream too, so every
other interface is listed as disabled. It cannot reload its configuration: a changed one means
a restart. It runs as the driver's child with the parent-death signal set, so it never outlives
the configurator (a reboot or a configurator restart re-applies every config, restarting it).
igmpproxy needs the kernel's multicast routing (`CONFIG_IP_MROUTE`), which some kernels are
built without: the kernel is asked once (`MRT_INIT` on a raw IGMP socket, what igmpproxy does
first) so such a gateway reports the real reason at once instead of starting a doomed process.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from homenet.durable import write_atomic

from . import GatewayError

PR_SET_PDEATHSIG = 1
MRT_INIT = 200
"""From linux/mroute.h: claims the namespace's multicast routing for one socket."""
NO_MROUTE = "kernel lacks multicast routing (CONFIG_IP_MROUTE)"
STARTUP_GRACE = 0.3
"""Seconds igmpproxy must stay up after start to count as started: a bad config or interface makes
it exit at once."""


def render_conf(upstream: str, downstream: str, interfaces: Iterable[str]) -> str:
    """Streams from any source on the WAN (`altnet 0.0.0.0/0`: IPTV sources are not on the WAN's subnet)."""
    others = sorted(set(interfaces) - {upstream, downstream})
    return ("# written by homenet (configurator gateway driver `linux`); do not edit\nquickleave\n\n"
            f"phyint {upstream} upstream ratelimit 0 threshold 1\n\taltnet 0.0.0.0/0\n\n"
            f"phyint {downstream} downstream ratelimit 0 threshold 1\n\n"
            + "".join(f"phyint {name} disabled\n" for name in others))


@functools.cache
def kernel_problem() -> str | None:
    """Why this kernel cannot route multicast, or None (also when it cannot be told: no
    CAP_NET_RAW, or another multicast router holds it; igmpproxy then says what is wrong).
    Asked once per process: the kernel does not change under a running gateway."""
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP)
    except OSError:
        return None
    with probe:
        try:
            probe.setsockopt(socket.IPPROTO_IP, MRT_INIT, struct.pack("i", 1))
        except OSError as exc:
            return NO_MROUTE if exc.errno == errno.ENOPROTOOPT else None
    return None  # closing the socket gave multicast routing back


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class IgmpProxy:
    """igmpproxy as a child process; its log goes beside its config file."""

    def __init__(self, program: str, conf: Path) -> None:
        self.program = program
        self.conf = Path(conf)
        self._process: subprocess.Popen[bytes] | None = None
        self._running_conf: str | None = None
        self._started: float | None = None
        """When the process was started, until it has outlived STARTUP_GRACE."""

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def starting(self) -> bool:
        """Started less than STARTUP_GRACE ago: whether it stays up is not known yet."""
        return self._process is not None and self._started is not None

    def ensure(self, wanted: bool, conf: str) -> None:
        """Running with `conf` when wanted, stopped otherwise; started again if it died. Never
        waits for the new process: the driver calls again after STARTUP_GRACE, and a process
        that died by then is reported (GatewayError), so a broken igmpproxy holds up no other part."""
        if not wanted:
            self.stop()
            return
        if self._process is not None and self._process.poll() is not None:
            code, self._process, self._running_conf, self._started = self._process.returncode, None, None, None
            raise GatewayError(f"igmpproxy exited with status {code}; see {self.conf.with_suffix('.log')}")
        if self.running() and self._running_conf == conf:
            if self._started is not None and time.monotonic() - self._started >= STARTUP_GRACE:
                self._started = None
            return
        self.stop()
        if problem := kernel_problem():
            raise GatewayError(problem)
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
        self._running_conf, self._started = conf, time.monotonic()

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
        self._process, self._running_conf, self._started = None, None, None
