"""The `networkmanager` executor: applies an `ipv4` item through NetworkManager (`nmcli`).

Raspberry Pi OS Bookworm, like most desktop and many embedded distributions, lets
NetworkManager own the interfaces: an address set behind its back (the `iproute2` executor)
competes with NetworkManager's DHCP lease and routes, and is gone after a reconnect or reboot.
So this executor changes NetworkManager's own profile, which also makes the setting survive a
reboot, and then the running device.

It drives `nmcli` in terse mode (`LC_ALL=C.UTF-8`, so states and error texts are not
translated) rather than D-Bus: nmcli ships with NetworkManager, and no D-Bus library is needed.
For one item:

1. The device: the NetworkManager device named by the item, else the one with the item's MAC.
2. The profile: the connection active on it, else a profile bound to it by
   `connection.interface-name`.
3. The profile is modified (one atomic D-Bus Update): ipv4.method manual, addresses, gateway,
   dns, ignore-auto-dns, and `ipv6.addr-gen-mode eui64`, so the IPv6 link-local address is the
   MAC-derived one from the next activation on.
4. The running device gets only the IPv4 (and IPv6 DNS) part, with `nmcli device modify`, a
   reapply of the applied connection: reapplying the whole profile would apply the new
   addr-gen-mode now and replace the link-local address the MQTT session may be running over.
   A profile that was not active is brought up instead (`nmcli connection up`).
5. The device's IPv4 state is read back until it shows the item, or the item fails and the
   profile is put back.

`checkpoint` snapshots every profile's IP settings and every device's active connection and
IPv4 state; `rollback` puts profiles back and reapplies the IPv4 part on devices whose state
moved (again without touching addr-gen-mode on the device). NetworkManager's own checkpoints
(CheckpointCreate over D-Bus) are not used: nmcli does not expose them, the plain agent install
carries no D-Bus library, and their rollback re-activates a device whose connection changed
rather than reapplying only the IPv4 part.

Tested against a real NetworkManager in a network namespace: tests/test_networkmanager_executor.py.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from homenet.schemas.messages import ConfigItem, Ipv4Item, ItemResult, ItemStatus, item_key

from .executor import ExecutorError

NMCLI_TIMEOUT = 30.0
"""Longest any nmcli call may take before it counts as a failure."""
ACTIVATION_WAIT = 20
"""Seconds `nmcli connection up` waits for an activation to complete."""
SETTLE_TIMEOUT = 10.0
"""How long the device may take to show the applied IPv4 settings."""
SETTLE_PAUSE = 0.1

LIVE_KEYS = ("ipv4.method", "ipv4.addresses", "ipv4.gateway", "ipv4.dns", "ipv4.ignore-auto-dns", "ipv6.dns")
"""What `apply` may change on a running device (and `rollback` restores there): never
addr-gen-mode, which would replace the IPv6 link-local address."""
PROFILE_KEYS = (*LIVE_KEYS, "ipv6.addr-gen-mode")
"""What `apply` changes in a profile (and `rollback` restores there)."""
LIST_KEYS = frozenset({"ipv4.addresses", "ipv4.dns", "ipv6.dns"})

STATE_UNMANAGED = 10
STATE_PREPARE = 40
"""From here to ACTIVATED a device has an applied connection, which `device modify` can change."""
STATE_ACTIVATED = 100
PACKAGE_HINT = "nmcli is not installed (Debian package network-manager)"


class NmcliError(Exception):
    """nmcli failed; the message is nmcli's own error text."""


class _ItemFailed(Exception):
    """The item cannot be applied as asked; nothing was changed."""


# --- talking to nmcli -------------------------------------------------------------------------

class Nmcli:
    """Runs nmcli, optionally against a given system bus (tests run a private one)."""

    def __init__(self, program: str = "nmcli", bus_address: str | None = None) -> None:
        self.program = program
        self.env = {**os.environ, "LC_ALL": "C.UTF-8"}
        if bus_address:
            self.env["DBUS_SYSTEM_BUS_ADDRESS"] = bus_address

    def run(self, *args: str, timeout: float = NMCLI_TIMEOUT) -> str:
        try:
            done = subprocess.run([self.program, *args], capture_output=True, text=True, env=self.env,
                                  timeout=timeout)
        except FileNotFoundError as exc:
            raise NmcliError(PACKAGE_HINT) from exc
        except subprocess.TimeoutExpired as exc:
            raise NmcliError(f"`nmcli {' '.join(args)}` did not finish within {timeout:g} s") from exc
        if done.returncode != 0:
            text = (done.stderr.strip() or done.stdout.strip() or f"nmcli exited {done.returncode}")
            raise NmcliError(text.removeprefix("Error: "))
        return done.stdout

    def records(self, fields: Sequence[str], *args: str) -> list[dict[str, str]]:
        """`nmcli --terse --mode multiline --fields F ARGS`, one dict per object shown.

        In multiline mode every line is `FIELD:value` with the value unescaped; a field that
        repeats (or a blank line) starts the next object. Indexed fields (`IP4.ADDRESS[1]`)
        keep their index; `values()` gathers them.
        """
        out = self.run("--terse", "--mode", "multiline", "--fields", ",".join(fields), *args)
        found: list[dict[str, str]] = []
        current: dict[str, str] = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                if current:
                    found.append(current)
                current = {}
                continue
            if key in current:
                found.append(current)
                current = {}
            current[key] = value
        if current:
            found.append(current)
        return found

    def rows(self, fields: Sequence[str], *args: str) -> list[list[str]]:
        """`nmcli --terse --escape yes --fields F ARGS` in tabular mode, one list per line."""
        out = self.run("--terse", "--escape", "yes", "--fields", ",".join(fields), *args)
        return [split_escaped(line) for line in out.splitlines() if line]


def split_escaped(line: str) -> list[str]:
    """A terse tabular line's columns: `:` separates them, `\\:` and `\\\\` are an escaped
    colon and backslash (connection names may hold both)."""
    cells: list[str] = []
    cell: list[str] = []
    chars = iter(line)
    for char in chars:
        if char == "\\":
            cell.append(next(chars, "\\"))
        elif char == ":":
            cells.append("".join(cell))
            cell = []
        else:
            cell.append(char)
    cells.append("".join(cell))
    return cells


def values(record: dict[str, str], field: str) -> list[str]:
    """All values of an indexed multiline field (`IP4.ADDRESS[1]`, `[2]` ...), in order."""
    prefix = field + "["
    return [v for k, v in sorted(((k, v) for k, v in record.items() if k.startswith(prefix)),
                                 key=lambda kv: int(kv[0][len(prefix):-1]))]


def split_list(value: str) -> list[str]:
    """A list property as nmcli prints it (`a/24, b/24` or `x,y`) as a list."""
    return [part.strip() for part in value.split(",") if part.strip()]


def detect(interface: str | None = None, nmcli: Nmcli | None = None) -> bool:
    """Whether NetworkManager is running (and manages `interface`, when given): the agent's
    `auto` choice should then be this executor, since NetworkManager would undo any other."""
    nm = nmcli or Nmcli()
    try:
        if nm.run("--terse", "--fields", "RUNNING", "general", timeout=5).strip() != "running":
            return False
        if interface is None:
            return True
        state = nm.records(["GENERAL.STATE"], "device", "show", interface)
    except NmcliError:
        return False
    return bool(state) and _state_code(state[0].get("GENERAL.STATE", "")) > STATE_UNMANAGED


def _state_code(text: str) -> int:
    """`100 (connected)` -> 100; 0 when unreadable."""
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else 0


# --- what the executor reads ------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    name: str
    mac: str
    state: int
    active_uuid: str
    """The connection active on the device; empty when none."""
    addresses: tuple[str, ...]
    gateway: str
    dns: tuple[str, ...]
    dns6: tuple[str, ...]

    @property
    def live(self) -> tuple[tuple[str, ...], str, tuple[str, ...], tuple[str, ...]]:
        """What a rollback compares: the IPv4 addresses, gateway and DNS servers in use."""
        return self.addresses, self.gateway, self.dns, self.dns6


DEVICE_FIELDS = ("GENERAL.DEVICE", "GENERAL.HWADDR", "GENERAL.STATE", "GENERAL.CON-UUID",
                 "IP4.ADDRESS", "IP4.GATEWAY", "IP4.DNS", "IP6.DNS")


def _device(record: dict[str, str]) -> Device:
    return Device(name=record.get("GENERAL.DEVICE", ""), mac=record.get("GENERAL.HWADDR", "").lower(),
                  state=_state_code(record.get("GENERAL.STATE", "")),
                  active_uuid=record.get("GENERAL.CON-UUID", "").strip(),
                  addresses=tuple(values(record, "IP4.ADDRESS")),
                  gateway=record.get("IP4.GATEWAY", "").strip(), dns=tuple(values(record, "IP4.DNS")),
                  dns6=tuple(values(record, "IP6.DNS")))


@dataclass(frozen=True)
class NetworkManagerCheckpoint:
    profiles: dict[str, dict[str, str]]
    """Profile UUID -> the PROFILE_KEYS values as nmcli printed them (nmcli accepts them back)."""
    devices: dict[str, Device]
    """Device name -> its state, for every device NetworkManager manages."""


# --- the executor -----------------------------------------------------------------------------

class NetworkManagerExecutor:
    """Sets an interface's IPv4 address, gateway and DNS servers in its NetworkManager profile."""

    name = "networkmanager"

    def __init__(self, nmcli: Nmcli | None = None) -> None:
        self.nmcli = nmcli or Nmcli()
        self._configured: dict[str, tuple[str, str]] = {}
        """Item key -> (device, profile UUID) it was applied to: what `in_force` reports."""

    def apply(self, item: ConfigItem) -> ItemResult:
        key = item_key(item)
        if not isinstance(item, Ipv4Item):
            return ItemResult(item=key, status=ItemStatus.UNSUPPORTED,
                              detail=f"the networkmanager executor does not apply {item.kind}")
        try:
            status, detail = self._apply_ipv4(item)
        except _ItemFailed as exc:
            status, detail = ItemStatus.FAILED, str(exc)
        except NmcliError as exc:
            status, detail = ItemStatus.FAILED, f"NetworkManager: {exc}"
        return ItemResult(item=key, status=status, detail=detail[:1024])

    def _apply_ipv4(self, item: Ipv4Item) -> tuple[ItemStatus, str]:
        device = self._find_device(item)
        uuid = device.active_uuid or self._bound_profile(device)
        before = self._profile(uuid)
        cidr, gateway = f"{item.address}/{item.prefix_len}", str(item.gateway)
        dns4 = [str(a) for a in item.dns if a.version == 4]
        dns6 = [str(a) for a in item.dns if a.version == 6]
        live = {"ipv4.method": "manual", "ipv4.addresses": cidr, "ipv4.gateway": gateway,
                "ipv4.ignore-auto-dns": "yes"}
        if item.dns:  # no DNS servers in the item: those configured are left alone
            live["ipv4.dns"] = ",".join(dns4)
        if dns6:  # only when asked: a reapply with IPv6 changes may restart IPv6 configuration
            live["ipv6.dns"] = ",".join(dns6)
        wanted = {**live, "ipv6.addr-gen-mode": "eui64"}
        active = device.active_uuid == uuid and STATE_PREPARE <= device.state <= STATE_ACTIVATED
        if (_matches(before, wanted) and device.state == STATE_ACTIVATED and device.active_uuid == uuid
                and self._shows(device, cidr, gateway, dns4 if item.dns else None)):
            self._configured[item_key(item)] = (device.name, uuid)
            return ItemStatus.UNCHANGED, ""
        profile = f"profile {before.get('connection.id', uuid)!r} of {device.name}"
        try:
            self.nmcli.run("connection", "modify", uuid, *_args(wanted))
        except NmcliError as exc:
            return ItemStatus.FAILED, f"NetworkManager refused the settings for {profile}: {exc}"
        try:
            if active:
                self.nmcli.run("device", "modify", device.name, *_args(live))
            else:
                self.nmcli.run("--wait", str(ACTIVATION_WAIT), "connection", "up", uuid, "ifname", device.name,
                               timeout=ACTIVATION_WAIT + NMCLI_TIMEOUT)
            problem = self._settle(device.name, cidr, gateway, dns4 if item.dns else None)
        except NmcliError as exc:
            problem = f"applying {profile} to the device: {exc}"
        if problem:
            return ItemStatus.FAILED, self._undo(uuid, before, device, problem)
        self._configured[item_key(item)] = (device.name, uuid)
        return ItemStatus.APPLIED, ""

    def _undo(self, uuid: str, before: dict[str, str], device: Device, problem: str) -> str:
        """Put the profile (and the running device's IPv4) back after a failed item."""
        try:
            self.nmcli.run("connection", "modify", uuid, *_args(_restorable(before)))
            if device.active_uuid == uuid:
                self.nmcli.run("device", "modify", device.name, *_args(_restorable(before, LIVE_KEYS)))
        except NmcliError as exc:
            return f"{problem}; restoring the previous settings failed: {exc}"
        return f"{problem}; previous settings restored"

    def _find_device(self, item: Ipv4Item) -> Device:
        """By name; else by the item's MAC (the name may differ on the device, e.g. after a rename)."""
        try:
            found = self.nmcli.records(DEVICE_FIELDS, "device", "show", item.interface)
        except NmcliError as exc:
            if not item.mac:
                raise _ItemFailed(f"interface {item.interface}: {exc}") from exc
            by_mac = [d for d in map(_device, self.nmcli.records(DEVICE_FIELDS, "device", "show"))
                      if d.mac == item.mac]
            if not by_mac:
                raise _ItemFailed(f"interface {item.interface}: {exc}; no NetworkManager device has "
                                  f"MAC {item.mac} either") from exc
            if len(by_mac) > 1:
                raise _ItemFailed(f"interface {item.interface}: {exc}; MAC {item.mac} is on "
                                  f"{', '.join(d.name for d in by_mac)}") from exc
            device = by_mac[0]
        else:
            if not found:
                raise _ItemFailed(f"interface {item.interface}: nmcli showed nothing for it")
            device = _device(found[0])
        if device.state <= STATE_UNMANAGED:
            raise _ItemFailed(f"interface {device.name} is not managed by NetworkManager")
        return device

    def _bound_profile(self, device: Device) -> str:
        """A profile for a device with none active: one naming it in connection.interface-name."""
        for uuid, in self.nmcli.rows(["UUID"], "connection", "show"):
            record = self.nmcli.records(["connection.interface-name"], "connection", "show", uuid)
            if record and record[0].get("connection.interface-name") == device.name:
                return uuid
        raise _ItemFailed(f"no NetworkManager connection is active on {device.name}, and no profile "
                          f"is bound to it (connection.interface-name)")

    def _profile(self, uuid: str) -> dict[str, str]:
        found = self.nmcli.records(["connection.id", *PROFILE_KEYS], "connection", "show", uuid)
        if not found:
            raise _ItemFailed(f"NetworkManager profile {uuid} is gone")
        return found[0]

    def _shows(self, device: Device, cidr: str, gateway: str, dns: list[str] | None) -> bool:
        """Whether the device's IPv4 state is what the item asks for (dns None: not checked)."""
        return (list(device.addresses) == [cidr] and device.gateway == gateway
                and (dns is None or list(device.dns) == dns))

    def _settle(self, name: str, cidr: str, gateway: str, dns: list[str] | None) -> str:
        """Empty once the device shows the settings; else what it shows at the deadline."""
        end = time.monotonic() + SETTLE_TIMEOUT
        while True:
            found = self.nmcli.records(DEVICE_FIELDS, "device", "show", name)
            device = _device(found[0]) if found else None
            if device and self._shows(device, cidr, gateway, dns):
                return ""
            if time.monotonic() >= end:
                shown = (f"addresses {list(device.addresses)}, gateway {device.gateway or 'none'}, "
                         f"dns {list(device.dns)}" if device else "nothing")
                return f"{name} did not take the settings within {SETTLE_TIMEOUT:g} s: it shows {shown}"
            time.sleep(SETTLE_PAUSE)

    # --- checkpoint and rollback -------------------------------------------------------------

    def checkpoint(self) -> NetworkManagerCheckpoint:
        """Every profile's IP settings and every managed device's state."""
        try:
            devices = {d.name: d for d in map(_device, self.nmcli.records(DEVICE_FIELDS, "device", "show"))
                       if d.state > STATE_UNMANAGED}
            profiles: dict[str, dict[str, str]] = {}
            for uuid, kind in self.nmcli.rows(["UUID", "TYPE"], "connection", "show"):
                if kind in ("loopback", "vpn", "wireguard"):  # never chosen by apply
                    continue
                record = self.nmcli.records(PROFILE_KEYS, "connection", "show", uuid)
                if record:
                    profiles[uuid] = record[0]
        except NmcliError as exc:
            raise ExecutorError(f"cannot read NetworkManager's settings: {exc}") from exc
        return NetworkManagerCheckpoint(profiles, devices)

    def rollback(self, checkpoint: NetworkManagerCheckpoint) -> None:
        """Every step is tried, so one failure does not leave the rest unrestored."""
        problems: list[str] = []

        def attempt(what: str, *args: str, timeout: float = NMCLI_TIMEOUT) -> None:
            try:
                self.nmcli.run(*args, timeout=timeout)
            except NmcliError as exc:
                problems.append(f"{what}: {exc}")

        for uuid, saved in checkpoint.profiles.items():
            try:
                now = self._profile(uuid)
            except (NmcliError, _ItemFailed):
                continue  # deleted since: nothing to restore into
            if not _matches(now, saved):
                attempt(f"restoring profile {uuid}", "connection", "modify", uuid, *_args(_restorable(saved)))
        try:
            devices = {d.name: d for d in map(_device, self.nmcli.records(DEVICE_FIELDS, "device", "show"))}
        except NmcliError as exc:
            raise ExecutorError("; ".join([*problems, f"reading the devices: {exc}"])) from exc
        for name, was in checkpoint.devices.items():
            now_device = devices.get(name)
            if now_device is None:
                continue
            if was.active_uuid and now_device.active_uuid == was.active_uuid:
                if now_device.live != was.live and was.active_uuid in checkpoint.profiles:
                    attempt(f"restoring {name}", "device", "modify", name,
                            *_args(_restorable(checkpoint.profiles[was.active_uuid], LIVE_KEYS)))
            elif was.active_uuid:
                attempt(f"reactivating {was.active_uuid} on {name}", "--wait", str(ACTIVATION_WAIT),
                        "connection", "up", was.active_uuid, "ifname", name,
                        timeout=ACTIVATION_WAIT + NMCLI_TIMEOUT)
            elif now_device.active_uuid:
                attempt(f"deactivating {now_device.active_uuid} on {name}", "connection", "down",
                        now_device.active_uuid)
        if problems:
            raise ExecutorError("; ".join(problems))

    # --- reporting ---------------------------------------------------------------------------

    def in_force(self) -> dict[str, Any]:
        """The real state of the interfaces this executor configured (this run of the agent)."""
        report: dict[str, Any] = {}
        for key, (name, uuid) in self._configured.items():
            try:
                found = self.nmcli.records(DEVICE_FIELDS, "device", "show", name)
                profile = self._profile(uuid)
            except (NmcliError, _ItemFailed) as exc:
                report[key] = {"interface": name, "error": str(exc)}
                continue
            device = _device(found[0]) if found else None
            report[key] = {"interface": name, "mac": device.mac if device else None,
                           "connection": profile.get("connection.id", uuid),
                           "method": profile.get("ipv4.method"),
                           "addresses": list(device.addresses) if device else [],
                           "gateway": (device.gateway or None) if device else None,
                           "dns": list(device.dns) if device else []}
        return report


def _normal(key: str, value: str) -> Any:
    """A property value in a comparable form: lists split, addresses canonical."""
    if key not in LIST_KEYS:
        return value.strip()
    parts = split_list(value)
    try:
        if key == "ipv4.addresses":
            return [str(ipaddress.ip_interface(p)) for p in parts]
        return [str(ipaddress.ip_address(p)) for p in parts]
    except ValueError:
        return parts


def _matches(profile: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(_normal(k, profile.get(k, "")) == _normal(k, v) for k, v in wanted.items())


def _restorable(saved: dict[str, str], keys: Sequence[str] = PROFILE_KEYS) -> dict[str, str]:
    return {k: saved[k] for k in keys if k in saved}


def _args(settings: dict[str, str]) -> list[str]:
    """`nmcli connection modify` / `device modify` arguments; an empty value clears a property."""
    return [part for key, value in settings.items() for part in (key, value)]
