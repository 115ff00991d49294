"""The configurator's engine: batches, one transaction each, the outbox after the commit, manual
acks, fencing. It knows nothing of message kinds; `Configurator` (service.py) gives it a handler.

Theory of operation. paho's network thread only queues what arrives. One worker thread takes
everything waiting (up to MAX_BATCH) and handles it inside one store transaction: each
handler validates (topic, envelope, body, sender binding, seq), computes the new device
record with the core and puts it; what it would send (replies, retained configs, events,
gateway changes) is held back in an outbox. After the batch commits (one fsync for all of
it) the outbox goes out, then the broker gets its PUBACKs (manual acks): no acknowledgement,
at the MQTT level or ours, is ever ahead of the database. If the commit fails, nothing goes
out, the store is as before, and the same batch is tried again with backoff; the broker
keeps the unacknowledged messages meanwhile. A batch whose commit finds that another
configurator claimed a higher epoch (`Fenced`; checked even when the batch wrote nothing)
makes this one stand down without sending anything: it disconnects cleanly, so its will does
not cover the new primary's `online`, and sets `fenced` (configurator/standby.py).
The LAN watch's renumbering is queued onto the worker like a message.
A message that fails validation is dropped with a log line and an `events` entry.
Reconciliation (`reconcile.py`) runs every `reconcile_interval` seconds, after every connect,
and for one device on its `info` and `config.result`: it compares committed state only, after
the batch's commit, and a correction that writes queues a task of its own.

What goes through the inbox: a task (any callable, run as it is) or a message (anything else,
given to `handle`, then to `ack` once the batch's outbox is out).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from homenet.accounts import AccountError

from .store import Fenced, StoreError

log = logging.getLogger(f"{__package__}.service")  # one name in the journal for the whole service

MAX_BATCH = 500
"""Messages handled in one transaction at most: bounds the work lost to one failed commit."""
_STOP = object()
Task = Callable[[], None]


class Engine:
    """`transaction`: the batch's transaction (the store's, with the broker accounts' inside);
    `handle`: what to do with a message; `ack`: acknowledge a message to the broker;
    `fenced`: called with the reason when a commit was fenced (the worker then ends);
    `failed`: a commit failed, with (error, messages kept unacknowledged, retry delay);
    `rolled_back`: after a failed commit, for what mirrors the store in memory;
    `committed`: after each commit, with (seconds, items in the batch)."""

    def __init__(self, transaction: Callable[[], AbstractContextManager[None]], handle: Callable[[Any], None],
                 ack: Callable[[Any], None], fenced: Callable[[str], None],
                 failed: Callable[[Exception, int, float], None], rolled_back: Callable[[], None],
                 committed: Callable[[float, int], None]) -> None:
        self._transaction = transaction
        self._handle_message = handle
        self._ack = ack
        self._fenced = fenced
        self._failed = failed
        self._rolled_back = rolled_back
        self._committed = committed
        self.stopping = False
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="configurator", daemon=True)
        self._outbox = threading.local()

    def start(self) -> None:
        self.thread.start()

    def put(self, item: Any) -> None:
        """A message or a task, handled in the next batch (from any thread)."""
        self.inbox.put(item)

    def stop(self, timeout: float = 30) -> None:
        """Finish what was received, then end the worker."""
        self.stopping = True
        self.inbox.put(_STOP)
        self.thread.join(timeout=timeout)

    def on_worker(self) -> bool:
        return threading.current_thread() is self.thread

    def later(self, action: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run `action` once the batch being handled has committed (now, outside a batch)."""
        actions = getattr(self._outbox, "actions", None)
        if actions is None:
            action(*args, **kwargs)
        else:
            actions.append(lambda: action(*args, **kwargs))

    def once_after(self, action: Task) -> None:
        """On the worker: run `action` once, after all of the batch's own outbox (however often
        it is asked for); from another thread: now."""
        if not self.on_worker():
            action()
        elif action not in self._outbox.last:
            self._outbox.last.append(action)

    def _work(self) -> None:
        while True:
            batch = [self.inbox.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            work = [item for item in batch if item is not _STOP]
            if work and not self.run(work):
                return
            if len(work) < len(batch):
                return

    def run(self, batch: list[Any]) -> bool:
        """Handle, commit, send, acknowledge; retry the batch while the commit fails. False:
        this configurator was fenced and must stop."""
        delay = 0.5
        while True:
            actions: list[Task] = []
            self._outbox.actions, self._outbox.last = actions, []
            try:
                started = time.perf_counter()
                with self._transaction():
                    for item in batch:
                        self._handle(item)
                self._committed(time.perf_counter() - started, len(batch))
                break
            except Fenced as exc:
                self._fenced(str(exc))
                return False
            except (StoreError, AccountError, OSError) as exc:
                self._outbox.actions = None  # what the batch would have sent is dropped
                self._rolled_back()  # the store is back as it was
                self._failed(exc, sum(not callable(i) for i in batch), delay)
                if self.stopping:
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 30)
            finally:
                self._outbox.actions = None
        for action in actions:
            action()
        for action in self._outbox.last:
            action()
        for item in batch:
            if not callable(item):
                self._ack(item)
        return True

    def _handle(self, item: Any) -> None:
        if not callable(item):
            self._handle_message(item)
            return
        try:
            item()
        except (Fenced, StoreError):
            raise
        except Exception:  # a bug must not stop the service
            log.exception("internal error in %s", getattr(item, "__name__", item))
