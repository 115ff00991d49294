"""Safe apply: new network settings stay only if the broker is still reachable through them.

Nobody sits at a home device's console: a wrong address, prefix or gateway would cut it off
from the configurator for good. So, as `netplan try` and NetworkManager checkpoints do, the
agent snapshots what the executor may change, applies the items and, when IPv4 settings
changed, tries TCP connections to the broker's IPv4 endpoints until a deadline. If none
answers, the snapshot is restored and every applied item is reported `rolled_back` with the
reason. IPv6 endpoints are not tried: a link-local session survives any IPv4 change, so
reaching the broker over it proves nothing about the new settings. The connections are not
bound to the new address: the kernel picks route and source as it will for the MQTT client.

An agent can die mid-apply (crash, power cut, SIGKILL) with settings applied and unverified.
So the snapshot is handed to a `journal` callback, which persists it, before anything is
applied; at its next start the agent resumes the interrupted apply from that snapshot
(`resume_from`): the items are applied again (executors are idempotent: what was done before
the stop is `unchanged`), every IPv4 item in force is verified, since the interrupted run may
have changed it without verifying, and when the broker stays unreachable everything goes back
to the snapshot taken before the interrupted apply. Either way the result says so.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import pickle
import socket
import time
from collections.abc import Callable, Iterable, Sequence

from homenet.mqtt import BrokerUrl
from homenet.schemas.messages import ConfigItem, Ipv4Item, ItemResult, ItemStatus, item_key

from .executor import Executor, ExecutorError

Endpoint = tuple[str, int]

ATTEMPT_TIMEOUT = 3.0
"""Longest single connect, so one black-holed endpoint leaves time to try the others."""
RETRY_PAUSE = 0.25
"""Between rounds of failed connects: a new route or neighbour entry may need a moment."""
DETAIL_LIMIT = 1024
"""`ItemResult.detail` is capped at this length on the wire."""


def ipv4_endpoints(broker: BrokerUrl, extra: Iterable[Endpoint] = ()) -> list[Endpoint]:
    """The endpoints to verify with: the broker URL's host if it is an IPv4 literal, then `extra`."""
    found: list[Endpoint] = []
    for host, port in [(broker.host, broker.port), *extra]:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            continue
        if (host, port) not in found:
            found.append((host, port))
    return found


def unreachable(endpoints: Sequence[Endpoint], deadline: float) -> str | None:
    """None as soon as one endpoint accepts a TCP connection (or there is none to try); else,
    at the deadline, why not. `endpoints` is read again every round: a list the agent updates
    meanwhile (a beacon naming the gateway's new address) is followed."""
    if not endpoints:
        return None
    end = time.monotonic() + deadline
    errors: dict[Endpoint, str] = {}
    while True:
        for endpoint in list(endpoints):
            remaining = end - time.monotonic()
            if remaining <= 0:
                if len(errors) == 1:
                    return next(iter(errors.values()))
                return "; ".join(f"{host}:{port}: {error}" for (host, port), error in errors.items())
            try:
                socket.create_connection(endpoint, timeout=min(remaining, ATTEMPT_TIMEOUT)).close()
                return None
            except OSError as exc:
                errors[endpoint] = exc.strerror or str(exc) or type(exc).__name__
        time.sleep(max(0.0, min(RETRY_PAUSE, end - time.monotonic())))


def apply_safely(executor: Executor, items: Sequence[ConfigItem], endpoints: Sequence[Endpoint],
                 deadline: float, *, journal: Callable[[object], object] | None = None,
                 resume_from: object | None = None) -> list[ItemResult]:
    """Apply `items`; undo them all when changed IPv4 settings lose every endpoint for `deadline` s.

    `journal(snapshot)` persists the snapshot before anything is applied (nothing is applied
    when it raises OSError). `resume_from`: the snapshot of an apply that was interrupted."""
    resuming = resume_from is not None
    if resuming:
        snapshot = resume_from
    else:
        try:
            snapshot = executor.checkpoint()
            if journal is not None:
                journal(snapshot)
        except (ExecutorError, OSError) as exc:
            return [ItemResult(item=item_key(i), status=ItemStatus.FAILED, detail=_cap(f"not applied: {exc}"))
                    for i in items]
    suspect = (ItemStatus.APPLIED, ItemStatus.UNCHANGED) if resuming else (ItemStatus.APPLIED,)
    results = [executor.apply(item) for item in items]
    changed = [str(item.address) for item, result in zip(items, results, strict=True)
               if isinstance(item, Ipv4Item) and result.status in suspect]
    if not changed or (error := unreachable(endpoints, deadline)) is None:
        return results
    reason = (f"broker {', '.join(f'{host}:{port}' for host, port in endpoints)} unreachable from "
              f"{', '.join(changed)} within {deadline:g} s: {error}")
    try:
        executor.rollback(snapshot)
    except ExecutorError as exc:
        return _replace_applied(results, ItemStatus.FAILED, f"{reason}; rollback failed: {exc}", suspect)
    return _replace_applied(results, ItemStatus.ROLLED_BACK, reason, suspect)


def save_checkpoint(snapshot: object) -> str:
    """An executor's snapshot as text for the agent's state file (owner-only). Snapshots are the
    executors' own objects (dataclasses, tuples, bytes), so they are pickled: only this agent
    writes the file it reads them back from."""
    return base64.b64encode(pickle.dumps(snapshot)).decode()


def load_checkpoint(text: str) -> object:
    """The snapshot `save_checkpoint` wrote; ValueError when it cannot be read back."""
    try:
        return pickle.loads(base64.b64decode(text, validate=True))
    except (binascii.Error, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as exc:
        raise ValueError(f"unreadable checkpoint: {exc}") from None


def note_resumed(results: list[ItemResult], note: str) -> list[ItemResult]:
    """Prefix every item's detail with `note` (why the apply was resumed)."""
    return [r.model_copy(update={"detail": _cap(f"{note}; {r.detail}" if r.detail else note)}) for r in results]


def _replace_applied(results: list[ItemResult], status: ItemStatus, detail: str,
                     replaced: tuple[ItemStatus, ...] = (ItemStatus.APPLIED,)) -> list[ItemResult]:
    return [ItemResult(item=r.item, status=status, detail=_cap(detail)) if r.status in replaced else r
            for r in results]


def _cap(detail: str) -> str:
    return detail if len(detail) <= DETAIL_LIMIT else detail[:DETAIL_LIMIT - 3] + "..."
