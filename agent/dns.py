"""Setting a device's DNS servers the way its host does it.

The `iproute2` executor sets addresses and routes itself, but DNS belongs to whatever manages
name resolution on the host: systemd-resolved (asked over D-Bus through `resolvectl`, which a
process with CAP_NET_ADMIN may do), resolvconf, or a plain /etc/resolv.conf file that the agent
may write. Writing the file behind resolved's or resolvconf's back would be undone, and under
the shipped unit (`ProtectSystem=strict`) /etc cannot be written at all. (Under NetworkManager
the agent uses the `networkmanager` executor, which sets DNS through NetworkManager.)

An agent started by hand under `ip netns exec NAME` shares the host's /etc but not its
network: it writes /etc/netns/NAME/resolv.conf when that file exists (`ip netns exec` shows it
as /etc/resolv.conf there) and otherwise leaves DNS alone, never the host's own file.

Each way can say which servers are set, set them, and snapshot/restore what it may change,
for the executor's checkpoint and rollback. A failure is a `DnsError` naming the cause.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from homenet.durable import write_atomic

RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_DIR = Path("/run/systemd/resolve")
NETNS_DIR = Path("/run/netns")


class DnsError(Exception):
    """DNS servers could not be read or set; the text says why."""


class Dns(Protocol):
    name: str

    def servers(self, ifname: str) -> list[str]:
        """The servers in force for `ifname` (a file's are for every interface)."""

    def set(self, ifname: str, servers: Sequence[str]) -> None:
        """Make `servers` the ones in force for `ifname`; raises DnsError."""

    def snapshot(self) -> object:
        """What `set` may change, for `restore`."""

    def restore(self, snapshot: object) -> None:
        """Put back what `snapshot` saw; raises DnsError."""


# --- a resolv.conf file -----------------------------------------------------------------------

@dataclass(frozen=True)
class FileState:
    """A file as it was: `content` None when absent; `link` set when it was a symlink."""

    content: bytes | None
    mode: int = 0o644
    link: str | None = None


def read_file(path: Path) -> FileState:
    link = os.readlink(path) if path.is_symlink() else None
    try:
        return FileState(path.read_bytes(), path.stat().st_mode & 0o7777, link)
    except FileNotFoundError:  # absent, or a dangling symlink
        return FileState(None, link=link)


def restore_file(path: Path, state: FileState) -> None:
    if read_file(path) == state:
        return
    if state.link is not None:
        tmp = path.with_name(f".{path.name}.homenet-link")
        tmp.unlink(missing_ok=True)
        os.symlink(state.link, tmp)
        os.replace(tmp, path)
    elif state.content is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, state.content, state.mode)


def nameserver_lines(content: bytes | None) -> tuple[list[str], list[str]]:
    """(other lines, nameserver addresses) of a resolv.conf."""
    others, servers = [], []
    for line in (content or b"").decode(errors="surrogateescape").splitlines():
        words = line.split()
        if words[:1] == ["nameserver"]:
            servers += words[1:2]
        else:
            others.append(line)
    return others, servers


def with_nameservers(content: bytes | None, dns: Sequence[object]) -> bytes:
    """resolv.conf with `dns` as its nameservers; search, options and comments are kept."""
    others, _ = nameserver_lines(content)
    lines = others + [f"nameserver {server}" for server in dns]
    return "".join(f"{line}\n" for line in lines).encode(errors="surrogateescape")


class FileDns:
    """A resolv.conf written whole (atomically; a symlink, e.g. to resolved's stub, is replaced
    by a file and put back by `restore`)."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def servers(self, ifname: str) -> list[str]:
        try:
            return nameserver_lines(read_file(self.path).content)[1]
        except OSError as exc:
            raise DnsError(f"reading {self.path}: {exc.strerror}") from None

    def set(self, ifname: str, servers: Sequence[str]) -> None:
        try:
            write_atomic(self.path, with_nameservers(read_file(self.path).content, servers), 0o644)
        except OSError as exc:
            raise DnsError(f"writing {self.path}: {exc.strerror}") from None

    def snapshot(self) -> FileState:
        try:
            return read_file(self.path)
        except OSError as exc:
            raise DnsError(f"reading {self.path}: {exc.strerror}") from None

    def restore(self, snapshot: object) -> None:
        assert isinstance(snapshot, FileState)
        try:
            restore_file(self.path, snapshot)
        except OSError as exc:
            raise DnsError(f"restoring {self.path}: {exc.strerror}") from None


# --- systemd-resolved -------------------------------------------------------------------------

def _run(args: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DnsError(f"{' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        raise DnsError(f"{' '.join(args)}: {(done.stderr or done.stdout).strip() or f'exit {done.returncode}'}")
    return done.stdout


class ResolvedDns:
    """Per-link DNS servers in systemd-resolved, set with `resolvectl dns LINK ...` (D-Bus;
    resolved lets a caller with CAP_NET_ADMIN do it without polkit)."""

    name = "systemd-resolved"

    def __init__(self, resolvectl: str) -> None:
        self.resolvectl = resolvectl

    def _links(self, *ifname: str) -> dict[str, list[str]]:
        """`Link 2 (eth0): 192.168.1.1 1.1.1.1#cloudflare-dns.com` lines -> {eth0: [...]}."""
        links = {}
        for line in _run([self.resolvectl, "dns", *ifname]).splitlines():
            head, _, servers = line.partition(":")
            if head.startswith("Link ") and "(" in head:
                name = head[head.index("(") + 1:head.rindex(")")]
                links[name] = [s.split("#")[0].split("%")[0] for s in servers.split()]
        return links

    def servers(self, ifname: str) -> list[str]:
        return self._links(ifname).get(ifname, [])

    def set(self, ifname: str, servers: Sequence[str]) -> None:
        _run([self.resolvectl, "dns", ifname, *map(str, servers)])

    def snapshot(self) -> dict[str, list[str]]:
        return self._links()

    def restore(self, snapshot: object) -> None:
        assert isinstance(snapshot, dict)
        for ifname, servers in self._links().items():
            if ifname in snapshot and snapshot[ifname] != servers:
                _run([self.resolvectl, "dns", ifname, *snapshot[ifname]])


# --- resolvconf -------------------------------------------------------------------------------

class ResolvconfDns:
    """resolvconf (Debian's resolvconf or openresolv): the agent's servers are one record,
    `IFACE.homenet`, merged by resolvconf into /etc/resolv.conf with the others."""

    name = "resolvconf"

    def __init__(self, resolvconf: str) -> None:
        self.resolvconf = resolvconf
        self._set: dict[str, list[str]] = {}
        """What this agent gave resolvconf, per interface (resolvconf cannot be asked per record)."""

    def servers(self, ifname: str) -> list[str]:
        return list(self._set.get(ifname, []))

    def set(self, ifname: str, servers: Sequence[str]) -> None:
        _run([self.resolvconf, "-a", f"{ifname}.homenet"], "".join(f"nameserver {s}\n" for s in servers))
        self._set[ifname] = [str(s) for s in servers]

    def snapshot(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._set.items()}

    def restore(self, snapshot: object) -> None:
        assert isinstance(snapshot, dict)
        for ifname in set(self._set) - set(snapshot):
            _run([self.resolvconf, "-d", f"{ifname}.homenet"])
            del self._set[ifname]
        for ifname, servers in snapshot.items():
            if self._set.get(ifname) != servers:
                self.set(ifname, servers)


# --- none -------------------------------------------------------------------------------------

class NoDns:
    """DNS that this agent must not or cannot set; `set` says why."""

    name = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def servers(self, ifname: str) -> list[str]:
        return []

    def set(self, ifname: str, servers: Sequence[str]) -> None:
        raise DnsError(self.reason)

    def snapshot(self) -> None:
        return None

    def restore(self, snapshot: object) -> None:
        return None


# --- choosing ---------------------------------------------------------------------------------

def netns_name() -> str | None:
    """The name under /run/netns of this process's network namespace (what `ip netns identify`
    prints), or None when it is not a named one."""
    try:
        mine = os.stat("/proc/self/ns/net")
        names = os.listdir(NETNS_DIR)
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            return name
    return None


def _in_host_netns() -> bool:
    """Whether this is PID 1's network namespace; True when that cannot be read (not root)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True


def detect(resolv_conf: Path | None = None) -> Dns:
    """The host's way, or the file `resolv_conf` when the settings name one."""
    if resolv_conf is not None:
        return FileDns(resolv_conf)
    if (name := netns_name()) is not None:
        own = Path("/etc/netns") / name / "resolv.conf"
        if own.exists():
            return FileDns(own)
        return NoDns(f"running in network namespace {name}: the host's {RESOLV_CONF} is left alone "
                     f"(create {own} for this namespace's own, or set resolv_conf)")
    if not _in_host_netns():
        return NoDns(f"running in another network namespace: the host's {RESOLV_CONF} is left alone "
                     "(set resolv_conf to write a file)")
    resolvectl, resolvconf = shutil.which("resolvectl"), shutil.which("resolvconf")
    if resolvectl and (RESOLVED_DIR / "io.systemd.Resolve").exists():
        return ResolvedDns(resolvectl)
    if resolvconf:
        return ResolvconfDns(resolvconf)
    if os.access(RESOLV_CONF.parent, os.W_OK) and not RESOLV_CONF.is_symlink():
        return FileDns(RESOLV_CONF)
    return NoDns(f"{RESOLV_CONF} cannot be written here (read-only, e.g. under the unit's ProtectSystem) "
                 "and neither systemd-resolved nor resolvconf runs to take the servers")
