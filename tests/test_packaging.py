"""Installing and running homenet as docs/install.md says: a venv under /opt made from the
package itself, the shipped units checked by the real systemd-analyze, the example settings
files loaded by the real settings loader."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from homenet import DISTRIBUTION
from homenet.settings import AgentSettings, GatewaySettings, Section, load

from .conftest import require_program

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
UNITS = {"homenet-agent.service": 4.0, "homenet-gateway.service": 5.0}
"""Each unit and the `systemd-analyze security` exposure it must stay at or below (issue 12)."""


def run(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf key of a settings model, dotted: `configurator.lan.subnet`."""
    found = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, Section):
            found += keys(kind, f"{prefix}{name}.")
        else:
            found.append(prefix + name)
    return found


def named(text: str) -> set[str]:
    """Dotted keys a TOML file sets or shows commented out (`# key = ...`), by [section]."""
    section, found = "", set()
    for line in text.splitlines():
        if header := re.fullmatch(r"\[([a-z_.]+)\]", line.strip()):
            section = header.group(1) + "."
        elif key := re.match(r"#? ?([a-z_]+) = ", line):
            found.add(section + key.group(1))
    return found


@pytest.mark.parametrize("name,model", [("gateway.toml", GatewaySettings), ("agent.toml", AgentSettings)])
def test_example_settings_load_with_the_real_loader_and_show_every_key(name: str, model: type[Section]) -> None:
    path = PACKAGING / name
    load(model, path, {})  # raises SettingsError naming the key on any mistake
    assert set(keys(model)) - named(path.read_text()) == set()
    assert named(path.read_text()) - set(keys(model)) == set()


def test_a_venv_under_opt_installs_the_agent_then_the_gateway_and_the_units_verify(tmp_path: Path) -> None:
    """The Debian 12 path (pip refuses system-wide installs there): a venv at /opt/homenet,
    here under tmp_path; the agent-only install says in one line what `gateway run` needs."""
    analyze = require_program("systemd-analyze")
    wheels = tmp_path / "wheels"
    built = run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, REPO)
    assert built.returncode == 0, built.stderr
    wheel = next(wheels.glob("*.whl"))
    assert wheel.name.startswith(DISTRIBUTION.replace("-", "_") + "-")
    venv = tmp_path / "opt" / "homenet"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    pip = venv / "bin" / "pip"

    assert run(pip, "install", "--quiet", wheel).returncode == 0
    assert run(venv / "bin" / "homenet-agent", "--help").returncode == 0
    out = run(venv / "bin" / "homenet", "gateway", "run", "--data-dir", tmp_path / "gw")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"Error: `homenet gateway run` needs the gateway extra (amqtt, cryptography "
                                  f"not installed): pip install '{DISTRIBUTION}[gateway]' (in a checkout: '.[gateway]')")
    assert not (tmp_path / "gw").exists()

    assert run(pip, "install", "--quiet", f"{wheel}[gateway]").returncode == 0
    for command in (("homenet", "gateway", "--help"), ("homenet", "gateway", "run", "--help")):
        done = run(venv / "bin" / command[0], *command[1:])
        assert done.returncode == 0, done.stderr

    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS:  # as installed: pointing at the venv
        (units / unit).write_text((PACKAGING / unit).read_text().replace("/opt/homenet/", f"{venv}/"))
    verified = run(analyze, "verify", *(units / u for u in UNITS))
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_the_shipped_units_are_hardened_within_the_goal(unit: str) -> None:
    analyze = require_program("systemd-analyze")
    out = run(analyze, "security", "--offline=true", "--no-pager", PACKAGING / unit)
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert score, out.stdout + out.stderr
    assert float(score.group(1)) <= UNITS[unit], out.stdout
