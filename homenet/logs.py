"""One log setup for every homenet process, on a terminal and under systemd alike.

homenet's own loggers (`homenet.*`) follow `--log-level`; every library (amqtt, transitions,
paho, pyroute2, asyncio, ...) logs at WARNING and above unless `--library-log-level` asks
for more: amqtt and transitions log every packet at INFO, which buried homenet's own lines.

Under systemd (stderr is the journal stream named by $JOURNAL_STREAM) each line starts with
its syslog priority, `<4>` for a warning, which journald takes as the entry's priority, so
`journalctl -p warning -u homenet-gateway` shows exactly the warnings and errors; the
journal adds the time itself.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

LEVELS = ("debug", "info", "warning", "error")
"""The names `--log-level` and `--library-log-level` accept."""

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
"""Python level -> syslog priority (sd-daemon(3): `<N>` prefixes on a journal stream)."""


def on_journal(stream: object = None) -> bool:
    """Whether `stream` (stderr) is the journal stream systemd connected: $JOURNAL_STREAM is
    `device:inode` of it (a child whose stderr was redirected elsewhere inherits the variable,
    so the check is on the file itself)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    stream = stream or sys.stderr
    try:
        st = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`; a multi-line message (a traceback) keeps its priority on
    every line, journald reads each line as an entry."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup(level: str = "info", library_level: str = "warning") -> None:
    """Configure the root logger once for this process (`level` for homenet, `library_level`
    for the libraries it uses)."""
    own, library = logging.getLevelName(level.upper()), logging.getLevelName(library_level.upper())
    handler = logging.StreamHandler()
    if on_journal(handler.stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(library)  # every library's logger inherits this level ...
    logging.getLogger("homenet").setLevel(own)  # ... homenet.* inherit this one


def options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--log-level`, `--library-log-level` and `-v` for a long-running command; logging is
    set up from them before the command runs."""

    @click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default="info",
                  show_default=True, help="homenet's own log lines from this level up.")
    @click.option("--library-log-level", type=click.Choice(LEVELS, case_sensitive=False), default="warning",
                  show_default=True, help="Log lines of the libraries (amqtt, transitions, paho, ...) from this level up.")
    @click.option("--verbose", "-v", is_flag=True, help="Same as --log-level debug.")
    @functools.wraps(command)
    def run(*args: Any, log_level: str, library_log_level: str, verbose: bool, **kwargs: Any) -> Any:
        setup("debug" if verbose else log_level, library_log_level)
        return command(*args, **kwargs)

    return run
