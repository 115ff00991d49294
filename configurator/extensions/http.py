"""The gateway's HTTP server: uvicorn on a thread of its own, serving the extensions' routes.

LAN side only by default: `lan` is one dual-stack socket on every address but bound to the LAN
interface (SO_BINDTODEVICE, allowed to unprivileged processes since Linux 5.7), so the WAN
never reaches it and a renumbered LAN is still served without a restart. A gateway without
that interface (a laptop, a test) serves nothing there and says so; an explicit address that
cannot be bound is an error.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from typing import Any

from homenet.settings import HttpSettings

log = logging.getLogger(__name__)


class HttpError(RuntimeError):
    """A listener that cannot be opened; the text says which and why."""


def _lan_socket(interface: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENODEV:
            log.warning("http: no LAN interface %s here: the web page and metrics are not served "
                        "(set http.listen to an address)", interface)
            return None
        raise HttpError(f"http: cannot listen on port {port} of {interface}: {exc.strerror}") from None
    return sock


def _address_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise HttpError(f"http: cannot listen on {address} port {port}: {exc.strerror}") from None
    return sock


def open_sockets(settings: HttpSettings, lan_interface: str) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for entry in settings.listen:
            port = settings.port
            sock = _lan_socket(lan_interface, port) if entry == "lan" else _address_socket(entry, port)
            if sock is not None:
                sockets.append(sock)
    except HttpError:
        for sock in sockets:
            sock.close()
        raise
    for sock in sockets:
        sock.listen(128)
        sock.setblocking(False)
    return sockets


class HttpServer:
    def __init__(self, settings: HttpSettings, lan_interface: str, routes: list[Any]) -> None:
        self.settings = settings
        self.lan_interface = lan_interface
        self.routes = routes
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.addresses: list[tuple[str, int]] = []

    def start(self) -> None:
        import uvicorn
        from starlette.applications import Starlette

        sockets = open_sockets(self.settings, self.lan_interface)
        if not sockets:
            return
        self.addresses = [s.getsockname()[:2] for s in sockets]
        config = uvicorn.Config(Starlette(routes=self.routes), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        started = threading.Event()

        def run() -> None:
            async def serve() -> None:
                task = asyncio.create_task(self._server.serve(sockets=sockets))
                while not self._server.started and not task.done():
                    await asyncio.sleep(0.01)
                started.set()
                await task
            asyncio.run(serve())

        self._thread = threading.Thread(target=run, name="http", daemon=True)
        self._thread.start()
        started.wait(10)
        log.info("http: serving on %s", ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                                                  for h, p in self.addresses))

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
