"""One agent per device id on a host.

Two agents started on one host without `--device-id` both derive `hn-<MAC>` from the same
first interface: the second would take the first one's MQTT session over, and each would
throw the other off in turn. Each agent holds an abstract Unix socket named after its device
id (Linux: no file, gone with the process however it ends, one namespace per network
namespace, hence per set of MACs); a second agent with the same id finds the name taken and
stops before it connects anywhere, so the first one is not disturbed.
"""

from __future__ import annotations

import socket


class DuplicateAgent(RuntimeError):
    """Another agent on this host already runs as this device id."""


def claim(device_id: str) -> socket.socket:
    """Hold `device_id` on this host for as long as the returned socket stays open."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(f"\0homenet-agent/{device_id}")
    except OSError:
        sock.close()
        raise DuplicateAgent(
            f"another agent on this host already runs as device id {device_id}: give this one an id "
            f"of its own with --device-id NAME (or device_id = \"NAME\" in its settings file)") from None
    return sock
