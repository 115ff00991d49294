"""The cloud's HTTP API: signed home routes, token-guarded operator routes, the OpenAPI document.

A role module lists its routes as data (`HomeRoute`, `OperatorRoute`); this module turns them
into one Starlette app and into the OpenAPI document, so the document is generated from the
same declarations that serve. A home request is one signed envelope (schemas/cloud.py) in the
POST body; the reply is one envelope signed by the cloud whose `re` is the request's id.
Database work runs in Starlette's thread pool, one transaction per request: a refused request
(bad signature, replay, bad body, a handler's `Refused`) rolls back and leaves nothing stored.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from sqlalchemy.engine import Connection, Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from homenet.keys import KeyPair
from homenet.schemas import MAX_PAYLOAD, ContractError, Envelope, decode, encode
from homenet.schemas.cloud import CLOUD_BODIES, CloudReply
from homenet.schemas.messages import Model
from homenet.schemas.signing import b64

from .homes import Home, Refused, authenticate, server_key

log = logging.getLogger(__name__)
SENDER = "cloud"


@dataclass(frozen=True)
class HomeRoute:
    """POST `path` with a signed envelope of `kind`; `handler(conn, home, body)` returns the result."""

    path: str
    kind: str
    summary: str
    handler: Callable[[Connection, Home, Any], dict[str, Any]]
    max_size: int = MAX_PAYLOAD
    changes: Callable[[Connection], int] | None = None
    """A long-poll route: while the handler's `items` are empty, wait (up to the body's `wait`)
    for this number to change, then ask the handler again."""
    probe: Callable[[Home, Any], Any] | None = None
    """Work outside any transaction (the quality check's connections, seconds long), run after
    the request is authenticated; the handler then gets its outcome instead of the body."""


@dataclass(frozen=True)
class OperatorRoute:
    method: str
    path: str
    summary: str
    handler: Callable[[Connection, dict[str, str], Any], Any]
    """(conn, path parameters, validated body or None) -> JSON-able result."""
    body: type[BaseModel] | None = None


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"body of {declared} bytes is over the {limit}-byte limit")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise Refused(413, f"body is over the {limit}-byte limit")
    return bytes(data)


class Changes:
    """One poller per process for each long-poll route's change counter; waiters wake on change.
    Polling the database (not a signal between processes) keeps the processes stateless."""

    def __init__(self, eng: Engine, read: Callable[[Connection], int], interval: float = 0.25) -> None:
        self._eng, self._read, self._interval = eng, read, interval
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def _value(self) -> int:
        with self._eng.connect() as conn:
            return self._read(conn)

    async def _poll(self) -> None:
        last = None
        while True:
            try:
                value = await run_in_threadpool(self._value)
                if value != last:
                    last = value
                    self._changed.set()
                    self._changed = asyncio.Event()
            except sa.exc.SQLAlchemyError as exc:
                log.warning("change poll failed: %s", exc)
            await asyncio.sleep(self._interval)

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass


class Api:
    """The routes of every role over one engine, served by any number of processes."""

    def __init__(self, eng: Engine, home_routes: list[HomeRoute], operator_routes: list[OperatorRoute],
                 operator_token: str | None) -> None:
        self.eng = eng
        self.home_routes = home_routes
        self.operator_routes = operator_routes
        self.operator_token = operator_token
        with eng.begin() as conn:
            self.key: KeyPair = server_key(conn)
        self.changes = {r.path: Changes(eng, r.changes) for r in home_routes if r.changes}

    # --- home routes ----------------------------------------------------------------------

    def _home_endpoint(self, route: HomeRoute) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                payload = await _read(request, route.max_size)
                envelope, body = self._decode(payload, route)
                if route.changes is None:
                    peer = request.client.host if request.client else ""
                    result = await run_in_threadpool(self._serve, route, envelope, body, peer)
                else:
                    result = await self._long_poll(route, envelope, body)
            except Refused as exc:
                log.info("refused %s: %s", route.path, exc)
                return _error(exc.status, str(exc))
            _, signed = encode("cloud.reply", CloudReply(re=envelope.id, result=result), sender=SENDER,
                               seq=time.time_ns() // 1000, sign=self.key.sign, bodies=CLOUD_BODIES)
            # the key a home pins on its first hello (trust on first use, as agents pin the configurator's)
            return Response(signed, media_type="application/json", headers={"X-Homenet-Cloud-Key": self.public_key})
        return endpoint

    @staticmethod
    def _decode(payload: bytes, route: HomeRoute) -> tuple[Envelope, Model]:
        try:
            return decode(payload, expected_kind=route.kind, max_size=route.max_size, bodies=CLOUD_BODIES)
        except ContractError as exc:
            raise Refused(400, str(exc)) from None

    def _serve(self, route: HomeRoute, envelope: Envelope, body: Model, peer: str) -> dict[str, Any]:
        with self.eng.begin() as conn:
            home = replace(authenticate(conn, envelope, body), peer=peer)
            if route.probe is None:
                return route.handler(conn, home, body)
        outcome = route.probe(home, body)
        with self.eng.begin() as conn:
            return route.handler(conn, home, outcome)

    def _read_only(self, route: HomeRoute, home: Home, body: Model) -> dict[str, Any]:
        with self.eng.connect() as conn:
            return route.handler(conn, home, body)

    async def _long_poll(self, route: HomeRoute, envelope: Envelope, body: Any) -> dict[str, Any]:
        def check() -> tuple[Home, dict[str, Any]]:
            with self.eng.begin() as conn:
                home = authenticate(conn, envelope, body)
                return home, route.handler(conn, home, body)

        home, result = await run_in_threadpool(check)
        deadline = time.monotonic() + body.wait
        while not result["items"] and (left := deadline - time.monotonic()) > 0:
            await self.changes[route.path].wait(left)
            result = await run_in_threadpool(self._read_only, route, home, body)
        return result

    # --- operator routes ------------------------------------------------------------------

    def _operator_endpoint(self, route: OperatorRoute) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                self._check_operator(request)
                body = None
                if route.body is not None:
                    raw = await _read(request, MAX_PAYLOAD)
                    try:
                        body = route.body.model_validate_json(raw)
                    except ValidationError as exc:
                        first = exc.errors()[0]
                        raise Refused(400, f"bad {route.body.__name__}: "
                                           f"{'.'.join(map(str, first['loc'])) or '(top)'}: {first['msg']}") from None
                result = await run_in_threadpool(self._operate, route, dict(request.path_params), body)
            except Refused as exc:
                return _error(exc.status, str(exc))
            return JSONResponse(result)
        return endpoint

    def _check_operator(self, request: Request) -> None:
        if self.operator_token is None:
            raise Refused(403, "the operator API is off: start `homenet cloud run` with --operator-token-file")
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), self.operator_token.encode()):
            raise Refused(401, "operator token missing or wrong (Authorization: Bearer …)")

    def _operate(self, route: OperatorRoute, params: dict[str, str], body: Any) -> Any:
        with self.eng.begin() as conn:
            return route.handler(conn, params, body)

    # --- the app --------------------------------------------------------------------------

    def app(self) -> Starlette:
        routes = [Route(r.path, self._home_endpoint(r), methods=["POST"]) for r in self.home_routes]
        routes += [Route(r.path, self._operator_endpoint(r), methods=[r.method]) for r in self.operator_routes]
        document = self.openapi()
        routes.append(Route("/openapi.json", lambda _r: JSONResponse(document), methods=["GET"]))
        routes.append(Route("/health", self._health, methods=["GET"]))

        @asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            for c in self.changes.values():
                c.start()
            yield
            for c in self.changes.values():
                await c.stop()

        return Starlette(routes=routes, lifespan=lifespan)

    async def _health(self, _request: Request) -> Response:
        def ping() -> None:
            with self.eng.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        try:
            await run_in_threadpool(ping)
        except sa.exc.SQLAlchemyError as exc:
            return _error(503, f"database unreachable: {type(exc).__name__}")
        return JSONResponse({"ok": True, "public_key": self.public_key})

    @property
    def public_key(self) -> str:
        return b64(self.key.public)

    def openapi(self) -> dict[str, Any]:
        """OpenAPI 3.1 from the route declarations and the pydantic models they carry."""
        models = [Envelope, *CLOUD_BODIES.values(), *(r.body for r in self.operator_routes if r.body)]
        refs, schemas = models_json_schema([(m, "validation") for m in dict.fromkeys(models)],
                                           ref_template="#/components/schemas/{model}")
        ref = {m: refs[(m, "validation")] for m in dict.fromkeys(models)}
        paths: dict[str, dict[str, Any]] = {}
        errors = {str(s): {"description": d} for s, d in (
            (400, "malformed JSON, envelope or body"), (401, "bad or missing signature"),
            (403, "unknown home, or another key is bound to it"), (409, "replayed seq"), (413, "body too large"))}
        for r in self.home_routes:
            request = {"allOf": [ref[Envelope], {"properties": {"kind": {"const": r.kind},
                                                                "body": ref[CLOUD_BODIES[r.kind]]}}]}
            paths.setdefault(r.path, {})["post"] = {
                "summary": r.summary, "operationId": r.kind,
                "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
                "responses": {"200": {"description": "a `cloud.reply` envelope signed by the cloud",
                                      "content": {"application/json": {"schema": ref[CloudReply]}}}, **errors}}
        for o in self.operator_routes:
            operation: dict[str, Any] = {"summary": o.summary, "security": [{"operator": []}],
                                         "responses": {"200": {"description": "JSON result"}}}
            if o.body is not None:
                operation["requestBody"] = {"required": True,
                                            "content": {"application/json": {"schema": ref[o.body]}}}
            params = [p.strip("{}") for p in o.path.split("/") if p.startswith("{")]
            if params:
                operation["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                           for p in params]
            paths.setdefault(o.path, {})[o.method.lower()] = operation
        return {"openapi": "3.1.0",
                "info": {"title": "homenet cloud servers (IEC 62608-2, our reading)", "version": "1"},
                "paths": paths,
                "components": {"schemas": schemas.get("$defs", {}),
                               "securitySchemes": {"operator": {"type": "http", "scheme": "bearer"}}}}
