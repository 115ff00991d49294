"""The owner's web page on the gateway: devices, live events, approve / reject / pair / forget.

Starlette routes on the gateway's HTTP server (http.py) and a page of plain HTML, CSS and
JavaScript shipped in the package (`web/`): nothing is fetched from the internet, nothing is
built. Owners log in with an operator account (`homenet users add NAME`); a read-only account
(`--read-only`) sees everything and may do nothing. Every action goes through the
configurator's command channel logged in as that account, exactly as `homenet devices
approve` does, so the broker's ACL and the configurator decide, not this page.

Live updates are Server-Sent Events (`/api/events`): the devices when the stream opens, then
each committed device change and each `events` entry, pushed from the bus onto the server's
loop. Sessions are random tokens in an HttpOnly, SameSite=Strict cookie, kept in memory for
`SESSION_TTL` seconds (a restart logs everyone out).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homenet.acl import Role
from homenet.schemas.messages import Command, Event

from ..bus import DeviceChanged, Notice
from ..records import DeviceRecord
from . import Extension

STATIC = Path(__file__).parent / "web"
COOKIE = "homenet_session"
SESSION_TTL = 12 * 3600
QUEUE = 1000
"""Notices held for one slow page at most; past that it misses some and reloads the devices."""
ACTIONS = ("approve", "reject", "forget", "refresh")


@dataclass
class Session:
    name: str
    role: Role
    password: str
    expires: float

    @property
    def may_act(self) -> bool:
        return self.role == Role.OPERATOR


def device_row(r: DeviceRecord) -> dict[str, Any]:
    """What the page shows of a device."""
    return {"device_id": r.device_id, "type": r.info.device_type, "model": r.info.model, "state": r.state.value,
            "online": r.online, "address": r.address, "version": r.version, "error": r.error,
            "result": r.result.status.value if r.result else "", "updated": r.updated}


def event_row(e: Event) -> dict[str, Any]:
    return {"event": e.event, "severity": e.severity.value, "device_id": e.device_id or "", "reason": e.reason,
            "time": time.strftime("%H:%M:%S")}


def sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Web(Extension):
    name = "web"

    def start(self) -> None:
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        self._sessions: dict[str, Session] = {}
        self._clients: set[Any] = set()
        self._lock = threading.Lock()
        self.host.routes += [
            Route("/", self._index), Route("/api/login", self._login, methods=["POST"]),
            Route("/api/logout", self._logout, methods=["POST"]), Route("/api/me", self._me),
            Route("/api/devices", self._devices), Route("/api/events", self._events),
            Route("/api/devices/{device_id}/{action}", self._act, methods=["POST"]),
            Route("/api/pair", self._pair, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        self.host.bus.subscribe(self._on_notice)

    def stop(self) -> None:
        self.host.bus.unsubscribe(self._on_notice)

    # --- live events ---------------------------------------------------------------------

    def _on_notice(self, notice: Notice) -> None:
        if isinstance(notice, DeviceChanged):
            message = sse("device", device_row(notice.record))
        elif isinstance(notice, Event):
            message = sse("event", event_row(notice))
            if notice.event == "device.forgotten":
                message += sse("forgotten", {"device_id": notice.device_id})
        else:
            return
        with self._lock:
            clients = list(self._clients)
        for push in clients:
            push(message)

    async def _events(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        if self._session(request) is None:
            return self._refused(401, "log in first")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE)

        def put(message: str) -> None:
            if queue.full():  # too slow: drop what is queued, the page reloads the devices
                while not queue.empty():
                    queue.get_nowait()
                message = sse("resync", {})
            queue.put_nowait(message)

        def push(message: str) -> None:
            loop.call_soon_threadsafe(put, message)

        async def stream() -> Any:
            try:
                yield sse("devices", [device_row(r) for r in self.host.devices()])
                while True:
                    try:
                        yield await asyncio.wait_for(queue.get(), 15)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
            finally:
                with self._lock:
                    self._clients.discard(push)

        with self._lock:  # before the snapshot: nothing committed in between is missed
            self._clients.add(push)
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- sessions ------------------------------------------------------------------------

    def _session(self, request: Any) -> Session | None:
        token = request.cookies.get(COOKIE, "")
        with self._lock:
            session = self._sessions.get(token)
            if session is not None and session.expires < time.monotonic():
                del self._sessions[token]
                return None
        return session

    @staticmethod
    def _refused(status: int, error: str) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"ok": False, "error": error}, status_code=status)

    async def _index(self, _request: Any) -> Any:
        from starlette.responses import FileResponse

        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _login(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        if not self.host.has_accounts:
            return self._refused(403, "this gateway's broker has no accounts, so nobody can log in")
        try:
            body = await request.json()
            name, password = str(body["name"]), str(body["password"])
        except (ValueError, KeyError, TypeError):
            return self._refused(400, "send JSON with name and password")
        role = await run_in_threadpool(self.host.operator, name, password)
        if role is None:
            await asyncio.sleep(0.5)  # a guesser waits; passwords are random, this is only courtesy
            return self._refused(401, "wrong name or password (an operator account: homenet users add NAME)")
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[token] = Session(name, role, password, time.monotonic() + SESSION_TTL)
        response = JSONResponse({"ok": True, "name": name, "role": role.value, "may_act": role == Role.OPERATOR})
        response.set_cookie(COOKIE, token, max_age=SESSION_TTL, httponly=True, samesite="strict")
        return response

    async def _logout(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        with self._lock:
            self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE)
        return response

    async def _me(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        session = self._session(request)
        if session is None:
            return self._refused(401, "log in first")
        return JSONResponse({"ok": True, "name": session.name, "role": session.role.value,
                             "may_act": session.may_act})

    async def _devices(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if self._session(request) is None:
            return self._refused(401, "log in first")
        return JSONResponse([device_row(r) for r in self.host.devices()])

    # --- actions: the configurator's command channel ---------------------------------------

    async def _act(self, request: Any) -> Any:
        action, device_id = request.path_params["action"], request.path_params["device_id"]
        if action not in ACTIONS:
            return self._refused(404, f"no action {action!r} (one of {', '.join(ACTIONS)})")
        return await self._command(request, {"op": action, "device_id": device_id})

    async def _pair(self, request: Any) -> Any:
        try:
            code = str((await request.json())["code"]).strip()
        except (ValueError, KeyError, TypeError):
            return self._refused(400, "send JSON with the code")
        return await self._command(request, {"op": "pair", "code": code})

    async def _command(self, request: Any, fields: dict[str, Any]) -> Any:
        from pydantic import ValidationError
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        session = self._session(request)
        if session is None:
            return self._refused(401, "log in first")
        if not session.may_act:
            return self._refused(403, f"{session.name} is a read-only account: it may look, not act")
        try:
            command = Command(**fields)
        except ValidationError as exc:
            return self._refused(400, f"{fields['op']}: {exc.errors()[0]['msg']}")
        try:
            reply = await run_in_threadpool(self.host.command, command, (session.name, session.password))
        except (ConnectionError, TimeoutError) as exc:
            return self._refused(503, str(exc))
        if not reply.ok:
            return self._refused(409, reply.error)
        return JSONResponse({"ok": True, "result": reply.result})
