"""`homenet cloud run`: the four roles in one ASGI app, over SQLite or PostgreSQL.

Each role is one module with its own tables, migrations and routes; this module only puts them
together. Run as many processes as the database allows, on one machine or many, behind any
HTTP load balancer: they share nothing but the database (docs/cloud.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn
from sqlalchemy.engine import Engine
from starlette.applications import Starlette

from . import diagnosis, failure, quality, service
from .api import Api
from .db import engine, migrate, url_of

ROLES = (service, quality, failure, diagnosis)


def make_api(eng: Engine, operator_token: str | None = None) -> Api:
    migrate(eng)
    return Api(eng, [r for m in ROLES for r in m.HOME_ROUTES], [r for m in ROLES for r in m.OPERATOR_ROUTES],
               operator_token)


def app_for(database: str | None, data_dir: Path, operator_token: str | None = None) -> Starlette:
    return make_api(engine(url_of(database, data_dir / "cloud.db")), operator_token).app()


def serve(app: Starlette, host: str, port: int, access_log: bool = False) -> None:
    """Serve until SIGINT/SIGTERM; logging as `logs.setup` made it (uvicorn's own config is not used)."""
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log,
                            timeout_graceful_shutdown=2)  # a long-poll cut short: the home asks again
    uvicorn.Server(config).run()
