"""Small network helpers shared by the demo, the benchmark and the tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on loopback right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
