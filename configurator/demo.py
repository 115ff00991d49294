"""`homenet demo`: a gateway and one simulated agent of each built-in type, in one process.

Everything real but the device side: the embedded amqtt broker on a free loopback port, the
configurator with its database in a temp dir, and agents speaking the wire contract.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from homenet.agent.app import build as build_agent
from homenet.broker.server import BrokerThread
from homenet.netutil import free_port
from homenet.schemas import Topics
from homenet.settings import AgentSettings, BrokerSettings, ConfiguratorSettings

from .app import build as build_configurator
from .lifecycle import State
from .profiles import PROFILES
from .table import device_table


def run_demo(timeout: float = 30.0) -> bool:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="homenet-demo-") as tmp:
        broker = BrokerThread(BrokerSettings(listeners=[f"127.0.0.1:{port}"]), Topics())
        broker.start()
        configurator = build_configurator(ConfiguratorSettings(broker=url, data_dir=Path(tmp, "gateway")))
        configurator.start()
        agents = [build_agent(AgentSettings(broker=url, device_id=f"demo-{kind}", device_type=kind,
                                            model=f"Demo {kind}", collector="simulated",
                                            data_dir=Path(tmp, kind)))
                  for kind in PROFILES]
        for agent in agents:
            agent.start()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                records = configurator.store.all()
                if len(records) == len(agents) and all(r.state == State.CONFIGURED for r in records):
                    break
                time.sleep(0.1)
            records = configurator.store.all()
            click.echo(device_table(records))
            gw = configurator.driver.state()
            click.echo(f"\ngateway ({gw.driver}, LAN {gw.lan}): {len(gw.reservations)} reservations, "
                       f"{len(gw.port_mappings)} port mappings, {len(gw.qos)} QoS rules, "
                       f"IGMP proxy {'on' if gw.igmp_proxy else 'off'}")
            done = sum(r.state == State.CONFIGURED for r in records)
            click.echo(f"{done}/{len(agents)} devices confirmed their configuration")
            return done == len(agents)
        finally:
            for agent in agents:
                agent.stop()
            configurator.stop()
            broker.stop()
