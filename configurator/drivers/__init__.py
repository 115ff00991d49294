"""Gateway drivers other than `memory`: `linux` (this host's nftables, tc, dnsmasq, igmpproxy)
and `upnp` (a third-party router). Each program has its own module: a pure rendering function
of the desired state, and the few lines of I/O that hand the result to the program."""

from __future__ import annotations

import subprocess


class GatewayError(Exception):
    """A gateway operation that did not take effect; the text is the reason reported."""


def run(*args: str, input: str | None = None, timeout: float = 10) -> str:
    """Run a gateway program; its stdout, or GatewayError with what it said on failure."""
    try:
        done = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise GatewayError(f"{args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise GatewayError(f"`{' '.join(args[:3])}` did not finish in {timeout:g} s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        said = (lines[0][:300] + (f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else "")) if lines else ""
        raise GatewayError(f"`{' '.join(args[:3])}` exited {done.returncode}: {said}")
    return done.stdout
