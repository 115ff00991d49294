"""Every mistake of a user's gets one line that names it (docs/errors.md): the real programs,
each given one wrong setting, flag or argument, exit 1 with `Error: ...` naming the key, value
or path, print no traceback, and create nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from homenet import DISTRIBUTION
from homenet.brokers import wait_listening
from homenet.netutil import free_port

from .harness import wait_until
from .processes import Process

BIN = Path(sys.executable).parent
HOMENET, AGENT = str(BIN / "homenet"), str(BIN / "homenet-agent")

LAN = '[configurator]\ndata_dir = "{gw}"\n[configurator.lan]\n'
CASES: dict[str, tuple[str, tuple[str, ...], str]] = {
    # case: (settings file, command, what the one line says)
    "subnet /33": (LAN + 'subnet = "192.168.1.0/33"\n', (HOMENET, "gateway", "run", "--config", "{conf}"),
                   "configurator.lan.subnet: '192.168.1.0/33' is not an IPv4 subnet: '33' is not a valid netmask"),
    "host bits set": (LAN + 'subnet = "192.168.1.7/24"\n', (HOMENET, "gateway", "run", "--config", "{conf}"),
                      "configurator.lan.subnet: '192.168.1.7/24' has host bits set: the subnet is 192.168.1.0/24"),
    "LAN gateway outside the subnet": (LAN + 'gateway = "10.0.0.1"\n', (HOMENET, "gateway", "run", "--config", "{conf}"),
                                       "configurator.lan: gateway 10.0.0.1 is outside the subnet 192.168.1.0/24"),
    "pool outside the subnet": (LAN + 'pool_end = "192.168.2.10"\n', (HOMENET, "gateway", "run", "--config", "{conf}"),
                                "configurator.lan: pool_end 192.168.2.10 is outside the subnet 192.168.1.0/24"),
    "listener without a port": ('[configurator]\ndata_dir = "{gw}"\n[broker]\nlisteners = ["localhost"]\n',
                                (HOMENET, "gateway", "run", "--config", "{conf}"),
                                "broker.listeners.0: 'localhost' is not HOST:PORT"),
    "port already in use": ("", (HOMENET, "gateway", "run", "--listen", "127.0.0.1:{busy}", "--data-dir", "{gw}"),
                            "listener 127.0.0.1:{busy}: port {busy} is already in use"),
    "data dir is a file": ("", (HOMENET, "gateway", "run", "--listen", "127.0.0.1:{free}", "--data-dir", "{file}/gw"),
                           "data directory {file}/gw: {file} is not a directory"),
    "beacon interface missing": ("", (HOMENET, "gateway", "run", "--listen", "127.0.0.1:{free}", "--data-dir", "{gw}",
                                      "--beacon-interface", "nosuch0"),
                                 "beacon interface nosuch0 not found (the LAN bridge, e.g. br0: see `ip link`"),
    "device id not valid": ("", (HOMENET, "devices", "approve", "bad id!", "--data-dir", "{gw}"),
                            "device id 'bad id!' is not valid: 1-63 of A-Z a-z 0-9 . _ -"),
    "device id with a slash": ("", (HOMENET, "devices", "forget", "a/b", "--data-dir", "{gw}"),
                               "device id 'a/b' is not valid"),
    "user name not valid": ("", (HOMENET, "users", "add", "bad name!", "--data-dir", "{gw}"),
                            "user name 'bad name!' is not valid"),
    "pairing code not six digits": ("", (HOMENET, "devices", "pair", "12345", "--data-dir", "{gw}"),
                                    "pairing code '12345' is not six digits (e.g. 229-670"),
    "broker URL without its colon": ("", (HOMENET, "devices", "approve", "nas-1", "--broker", "mqtt//host",
                                          "--data-dir", "{gw}"),
                                     "broker URL 'mqtt//host' is not mqtt://HOST[:PORT]"),
    "agent broker URL without its colon": ("", (AGENT, "run", "--broker", "mqtt//host", "--data-dir", "{gw}"),
                                           "broker URL 'mqtt//host' is not mqtt://HOST[:PORT]"),
    "unreachable broker": ("", (HOMENET, "users", "add", "alice", "--broker", "mqtt://127.0.0.1:{free}",
                                "--data-dir", "{gw}"),
                           "cannot reach the broker at mqtt://127.0.0.1:{free}: [Errno 111] Connection refused"),
    "no database": ("", (HOMENET, "devices", "list", "--data-dir", "{gw}"), "no configuration database at {gw}/homenet.db"),
}


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_each_mistake_gets_one_line_naming_it_and_creates_nothing(case: str, tmp_path: Path, busy_port: int) -> None:
    settings, command, message = CASES[case]
    gw, conf, file = tmp_path / "gw", tmp_path / "settings.toml", tmp_path / "a-file"
    file.write_text("")
    values = {"gw": str(gw), "conf": str(conf), "busy": str(busy_port), "free": str(free_port()), "file": str(file)}
    if settings:
        conf.write_text(settings.format(**values))
    before = sorted(tmp_path.rglob("*"))
    out = subprocess.run([a.format(**values) for a in command], capture_output=True, text=True, timeout=30)
    assert message.format(**values) in one_line_error(out)
    assert sorted(tmp_path.rglob("*")) == before  # not even the data directory


def test_a_data_dir_the_user_cannot_write_is_named(as_nobody: list[str], root_only_dir: Path) -> None:
    out = subprocess.run([*as_nobody, HOMENET, "gateway", "run", "--listen", f"127.0.0.1:{free_port()}",
                          "--data-dir", str(root_only_dir / "gw")], capture_output=True, text=True, timeout=30)
    assert one_line_error(out) == (f"Error: data directory {root_only_dir / 'gw'} cannot be made: {root_only_dir} "
                                   "is not writable by user nobody (uid 65534) (give --data-dir, or "
                                   "configurator.data_dir in the settings file)")
    assert list(root_only_dir.iterdir()) == []


def test_devices_list_without_permission_says_permission(as_nobody: list[str], root_only_dir: Path,
                                                         tmp_path: Path) -> None:
    from homenet.configurator.store import SqliteStore

    SqliteStore(root_only_dir / "homenet.db").close()  # a real database, mode 0600, owned by root
    out = subprocess.run([*as_nobody, HOMENET, "devices", "list", "--data-dir", str(root_only_dir)],
                         capture_output=True, text=True, timeout=30)
    assert one_line_error(out) == (f"Error: cannot read {root_only_dir / 'homenet.db'}: permission denied "
                                   "(run it as the gateway's user or root)")


def test_a_listener_in_the_bracket_form_users_type_is_accepted(tmp_path: Path, started: list[Process]) -> None:
    port = free_port()
    gateway = Process(tmp_path / "gw.log", HOMENET, "gateway", "run", "--listen", f"127.0.0.1:{port}",
                      "--listen", f"[::1]:{port}", "--data-dir", str(tmp_path / "gw"))
    started.append(gateway)
    wait_listening(port)
    wait_until(lambda: "online" in gateway.output(), timeout=20, what="configurator online")
    socket.create_connection(("::1", port), timeout=2).close()
    assert f"broker listening on 127.0.0.1:{port}, ::1:{port}" in gateway.output()


def test_an_unreachable_broker_is_named_with_the_cause_while_the_agent_retries(tmp_path: Path,
                                                                              started: list[Process]) -> None:
    port = free_port()
    agent = Process(tmp_path / "agent.log", AGENT, "run", "--broker", f"mqtt://127.0.0.1:{port}", "--device-id",
                    "lonely", "--collector", "simulated", "--data-dir", str(tmp_path / "a"))
    started.append(agent)
    wait_until(lambda: f"lonely cannot reach the broker at mqtt://127.0.0.1:{port}: Connection refused; "
               "retrying with backoff" in agent.output(), timeout=20, what="the reason named")
    assert agent.terminate() == 0


def test_operator_commands_find_the_configurator_where_it_runs(tmp_path: Path, started: list[Process]) -> None:
    """`configurator run --config F` connects to F's [configurator] broker: so does `devices ... --config F`."""
    port = free_port()
    conf = tmp_path / "settings.toml"
    conf.write_text(f'[configurator]\nbroker = "mqtt://127.0.0.1:{port}"\ndata_dir = "{tmp_path / "gw"}"\n')
    started.append(Process(tmp_path / "broker.log", HOMENET, "broker", "run", "--listen", f"127.0.0.1:{port}"))
    wait_listening(port)
    configurator = Process(tmp_path / "conf.log", HOMENET, "configurator", "run", "--config", str(conf))
    started.append(configurator)
    wait_until(lambda: "online" in configurator.output(), timeout=20, what="configurator online")
    out = subprocess.run([HOMENET, "devices", "forget", "nobody", "--config", str(conf)],
                         capture_output=True, text=True, timeout=30)
    assert one_line_error(out) == "Error: forget nobody: no device 'nobody'"  # the configurator's own answer


def test_the_gateway_extra_is_named_when_missing() -> None:
    """Without amqtt (an agent-only install, as tests/test_packaging.py makes for real)."""
    code = ("import sys, importlib.util; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'amqtt' else real(n, *a); "
            "from homenet.configurator.cli import main; sys.argv = ['homenet', 'broker', 'run']; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert one_line_error(out) == (f"Error: `homenet broker run` needs the gateway extra (amqtt not installed): "
                                   f"pip install '{DISTRIBUTION}[gateway]' (in a checkout: '.[gateway]')")
