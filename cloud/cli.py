"""`homenet cloud …`: run the cloud servers, and the operator's commands against their API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from homenet import logs
from homenet.settings import default_data_dir

TOKEN = click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
                     envvar="HOMENET_CLOUD_TOKEN_FILE", required=True,
                     help="File holding the operator token the servers were started with.")
URL = click.option("--url", envvar="HOMENET_CLOUD_URL", default="http://127.0.0.1:8620", show_default=True,
                   help="The cloud servers' base URL.")


def _token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise click.ClickException(f"operator token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise click.ClickException(f"operator token file {path}: the token must be at least 16 characters")
    return token


@click.group()
def cloud() -> None:
    """The operator's cloud servers (IEC 62608-2): service, quality check, failure information, diagnosis."""


@cloud.command("run")
@click.option("--database", help="postgresql://USER@HOST/DB, or a SQLite file (default: DATA_DIR/cloud.db).")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), help="For the default SQLite database.")
@click.option("--listen", default="127.0.0.1:8620", show_default=True, help="HOST:PORT to serve HTTP on.")
@click.option("--operator-token-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Enables the operator API (/v1/operator/…) for this bearer token.")
@click.option("--access-log", is_flag=True, help="Log every request (uvicorn's access log).")
@logs.options
def run(database: str | None, data_dir: Path | None, listen: str, operator_token_file: Path | None,
        access_log: bool) -> None:
    """Serve the four roles; any number of these processes may share one PostgreSQL database."""
    from .db import DatabaseError
    from .server import app_for, serve

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise click.ClickException(f"--listen {listen!r}: expected HOST:PORT")
    data_dir = data_dir or default_data_dir("cloud")
    if not database:
        data_dir.mkdir(parents=True, exist_ok=True)
    try:
        app = app_for(database, data_dir, _token(operator_token_file))
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"homenet cloud serving on http://{listen} ({database or data_dir / 'cloud.db'})", err=True)
    serve(app, host.strip("[]"), int(port), access_log)


@cloud.command("openapi")
def openapi() -> None:
    """Print the OpenAPI document (generated from the routes and their models)."""
    import tempfile

    from .server import make_api
    from .db import engine, url_of

    with tempfile.TemporaryDirectory() as tmp:
        click.echo(json.dumps(make_api(engine(url_of(None, Path(tmp) / "x.db"))).openapi(), indent=2))


def call(url: str, token_file: Path, method: str, path: str, body: Any = None) -> Any:
    """One operator request; a refusal becomes a one-line error naming the server's reason."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers={
        "Authorization": f"Bearer {_token(token_file)}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise click.ClickException(f"{method} {path}: {exc.code} {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"cannot reach the cloud at {url}: {getattr(exc, 'reason', exc)}") from None


def _show(result: Any) -> None:
    click.echo(json.dumps(result, indent=2, sort_keys=True))


def _quote(text: str) -> str:
    return urllib.request.quote(text, safe="")


@cloud.group()
def profiles() -> None:
    """Equipment profiles by maker and model (service server)."""


@profiles.command("set")
@click.argument("maker")
@click.argument("model")
@click.option("--name", required=True, help="Profile name the homes record.")
@click.option("--qos", default="best-effort", show_default=True,
              type=click.Choice(["voice", "video", "interactive", "best-effort", "bulk"]))
@click.option("--igmp", is_flag=True, help="The model needs the IGMP proxy (multicast IPTV).")
@click.option("--port", "ports", multiple=True, help="PROTO/PORT[:DESCRIPTION] forwarded to it, e.g. tcp/443:web.")
@click.option("--av", is_flag=True, help="Audio/video: quality checks also measure latency and loss.")
@click.option("--ttl", default=86400, show_default=True, help="Seconds a home keeps it before asking again.")
@URL
@TOKEN
def profiles_set(maker: str, model: str, name: str, qos: str, igmp: bool, ports: tuple[str, ...], av: bool,
                 ttl: int, url: str, token_file: Path) -> None:
    """Add or replace the profile of MAKER's MODEL."""
    needs = []
    for spec in ports:
        proto, _, rest = spec.partition("/")
        port, _, description = rest.partition(":")
        if proto not in ("tcp", "udp") or not port.isdigit():
            raise click.ClickException(f"--port {spec!r}: expected tcp/PORT or udp/PORT[:DESCRIPTION]")
        needs.append({"protocol": proto, "port": int(port), "description": description})
    _show(call(url, token_file, "PUT", f"/v1/operator/profiles/{_quote(maker)}/{_quote(model)}",
               {"maker": maker, "model": model, "name": name, "qos": qos, "igmp": igmp, "ports": needs,
                "av": av, "ttl": ttl}))


@profiles.command("list")
@URL
@TOKEN
def profiles_list(url: str, token_file: Path) -> None:
    """Every profile."""
    for p in call(url, token_file, "GET", "/v1/operator/profiles"):
        ports = ",".join(f"{n['protocol']}/{n['port']}" for n in p["ports"]) or "-"
        click.echo(f"{p['maker']}\t{p['model']}\t{p['name']}\t{p['qos']}\tigmp={p['igmp']}\tports={ports}")


@profiles.command("remove")
@click.argument("maker")
@click.argument("model")
@URL
@TOKEN
def profiles_remove(maker: str, model: str, url: str, token_file: Path) -> None:
    """Remove the profile of MAKER's MODEL."""
    _show(call(url, token_file, "DELETE", f"/v1/operator/profiles/{_quote(maker)}/{_quote(model)}"))


@cloud.group()
def failures() -> None:
    """Service failures published to the homes (failure information server)."""


@failures.command("publish")
@click.argument("service", type=click.Choice(["iptv", "dns", "internet", "voice"]))
@click.argument("summary")
@click.option("--region", help="Only the homes of this region.")
@click.option("--home", "homes", multiple=True, help="Only these homes (repeatable).")
@URL
@TOKEN
def failures_publish(service: str, summary: str, region: str | None, homes: tuple[str, ...], url: str,
                     token_file: Path) -> None:
    """Tell the homes concerned that SERVICE is failing."""
    _show(call(url, token_file, "POST", "/v1/operator/failures",
               {"service": service, "summary": summary, "region": region, "homes": list(homes) or None}))


@failures.command("resolve")
@click.argument("failure_id", type=int)
@URL
@TOKEN
def failures_resolve(failure_id: int, url: str, token_file: Path) -> None:
    """The failure is over."""
    _show(call(url, token_file, "POST", f"/v1/operator/failures/{failure_id}/resolve"))


@failures.command("list")
@URL
@TOKEN
def failures_list(url: str, token_file: Path) -> None:
    """Every failure published."""
    _show(call(url, token_file, "GET", "/v1/operator/failures"))


@cloud.group()
def rules() -> None:
    """Diagnosis rules (diagnosis server)."""


@rules.command("set")
@click.argument("rule_file", type=click.File())
@URL
@TOKEN
def rules_set(rule_file: Any, url: str, token_file: Path) -> None:
    """Add or replace the rule in RULE_FILE (JSON, the shape `rules list` prints)."""
    try:
        rule = json.load(rule_file)
    except ValueError as exc:
        raise click.ClickException(f"{rule_file.name} is not JSON: {exc}") from None
    if not isinstance(rule, dict) or not isinstance(rule.get("name"), str):
        raise click.ClickException(f"{rule_file.name}: a rule is a JSON object with a name")
    _show(call(url, token_file, "PUT", f"/v1/operator/rules/{_quote(rule['name'])}", rule))


@rules.command("list")
@URL
@TOKEN
def rules_list(url: str, token_file: Path) -> None:
    """The rules in force, in the order they are tried."""
    _show(call(url, token_file, "GET", "/v1/operator/rules"))



