"""The tools beside the product (registered on `homenet`): `bench` runs the benchmarks (bench/,
the `homenet.bench` package) and `conformance agent` the wire contract's kit. Apart from cli.py,
which runs the gateway: these measure and check it, and nothing in the product depends on them.
"""

from __future__ import annotations

from pathlib import Path

import click

from homenet import logs

from .cli import main


@main.group()
def bench() -> None:
    """Benchmarks: print medians and p99 against a floor measured in the same run."""


@bench.command("onboard")
@click.option("--count", default=200, show_default=True, help="Sequential onboardings per broker.")
@click.option("--broker", "brokers", multiple=True, type=click.Choice(["amqtt", "mosquitto"]),
              help="Brokers to measure (default: both).")
def bench_onboard(count: int, brokers: tuple[str, ...]) -> None:
    """Time from an agent's CONNACK to its confirmed config, against a trivial responder."""
    from homenet.bench.onboard import run_onboard

    run_onboard(count, list(brokers) or ["amqtt", "mosquitto"])


@bench.command("cloud")
@click.option("--homes", default=1000, show_default=True, type=click.IntRange(min=1), help="Simulated homes.")
@click.option("--devices", default=20, show_default=True, type=click.IntRange(min=1), help="Devices per home.")
@click.option("--servers", "servers", multiple=True, type=click.IntRange(min=1),
              help="`cloud run` processes on one PostgreSQL (repeatable; default 1 then 2).")
@click.option("--processes", default=2, show_default=True, help="Load generator processes.")
@click.option("--threads", default=16, show_default=True, help="Concurrent homes per load process.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), help="Results as JSON.")
def bench_cloud(homes: int, devices: int, servers: tuple[int, ...], processes: int, threads: int,
                json_out: Path | None) -> None:
    """Homes onboarding devices against `homenet cloud run` on PostgreSQL: req/s, p50/p99."""
    from homenet.bench.cloud import run_cloud

    run_cloud(homes, devices, list(servers) or [1, 2], processes, threads, json_out)


@bench.command("storm")
@click.option("--agents", "counts", multiple=True, type=click.IntRange(min=1),
              help="Agents that connect and register at once (repeatable; default 250, 1000, 5000).")
@click.option("--broker", "brokers", multiple=True, type=click.Choice(["amqtt", "gw-mosquitto", "mosquitto"]),
              help="amqtt: `gateway run` (broker and configurator in one process); gw-mosquitto: `gateway run` "
              "with engine mosquitto (its child); mosquitto: Mosquitto and `configurator run` (default: all).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds one run may take; then it stops.")
@click.option("--processes", default=2, show_default=True, help="Load generator processes.")
@click.option("--profile", type=click.Path(path_type=Path, dir_okay=False),
              help="py-spy the configurator process during each run; collapsed stacks to FILE-<broker>-<N>.txt.")
@click.option("--footprint/--no-footprint", default=True, show_default=True,
              help="Also measure an agent (start to CONNECT, RSS once configured) and the configurator "
              "at rest on a database of 1,000 and of 5,000 devices (up to 3 min each).")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), help="All results as JSON.")
@click.option("--keep", is_flag=True, help="Keep each run's temp dir (database, configurator log).")
@click.option("--renumber/--no-renumber", default=True, show_default=True,
              help="After each storm, restart the configurator with the LAN moved to another subnet and "
              "time until every device confirmed its new config.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1),
              help="Run every storm this many times; then, per broker, in how many every device was confirmed.")
def bench_storm(counts: tuple[int, ...], brokers: tuple[str, ...], timeout: float, processes: int,
                profile: Path | None, footprint: bool, json_out: Path | None, keep: bool, renumber: bool,
                repeat: int) -> None:
    """N new agents at once against a fresh configurator: time until all confirmed, CPU, RSS.
    Exit status 1 when a device was not confirmed in some run."""
    from homenet.bench.storm import BROKERS, run_storm

    if not run_storm(list(counts) or [250, 1000, 5000], list(brokers) or BROKERS, timeout, processes,
                     profile, footprint, json_out, keep, renumber, repeat):
        raise SystemExit(1)


@main.group()
def conformance() -> None:
    """Check an agent against the wire contract (docs/protocol.md, Conformance)."""


@conformance.command("agent", context_settings={"ignore_unknown_options": True})
@click.option("--json", "as_json", is_flag=True, help="The verdicts as one JSON document on stdout (for CI).")
@click.option("--answer-time", default=10.0, show_default=True, type=click.FloatRange(min=0.5),
              help="Seconds the agent has for each answer (register, result, reconnect).")
@click.option("--quiet-time", default=2.0, show_default=True, type=click.FloatRange(min=0.2),
              help="Seconds the kit watches for an answer that must not come.")
@click.option("--verbose", "-v", is_flag=True, help="Log what the kit's broker and configurator do (stderr).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def conformance_agent(as_json: bool, answer_time: float, quiet_time: float, verbose: bool,
                      command: tuple[str, ...]) -> None:
    """Play the gateway for the agent COMMAND and walk it through every rule of the contract.

    {url} in COMMAND becomes the kit's broker (mqtt://127.0.0.1:PORT), {data} a directory kept
    for the whole run (the agent's state, for the restart rule). Exit status 1 when a rule fails.

        homenet conformance agent -- ./my-agent --broker {url} --state {data}
    """
    import logging
    from importlib.util import find_spec

    from .conformance import Timing, Verdict, check_agent

    if find_spec("amqtt") is None:
        raise click.ClickException("the conformance kit runs the embedded broker: pip install 'homenet-iec62608[gateway]'")

    if verbose:
        logs.setup("debug", "info")
    else:  # the kit's broker refuses logins on purpose: its log lines are not the verdicts
        logging.getLogger().addHandler(logging.NullHandler())

    def line(v: Verdict) -> None:
        click.echo(f"{'PASS' if v.ok else 'FAIL'} {v.rule}: {v.seen}", err=as_json)

    try:
        report = check_agent(list(command), Timing(answer_time, quiet_time), line)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    passed = sum(v.ok for v in report.verdicts)
    if as_json:
        click.echo(report.as_json())
    click.echo(f"{passed} passed, {len(report.verdicts) - passed} failed", err=as_json)
    if not report.ok:
        tail = report.agent_log.splitlines()[-15:]
        if tail:
            click.echo("last lines of the agent's output:\n  " + "\n  ".join(tail), err=True)
        raise SystemExit(1)
