"""`homenet conformance agent`: our own agent passes every rule; broken agents (test fixtures
in tests/agents/: `ok` for nothing, `\\u`-escaped signing, any key taken) fail the rules they
break, and the command says so in its exit status, its lines and its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from homenet.configurator.conformance import RULES

BIN = Path(sys.executable).parent
AGENTS = Path(__file__).parent / "agents"
AGENT_ARGS = ["run", "--broker", "{url}", "--data-dir", "{data}", "--device-id", "conf-1", "--device-type", "nas",
              "--collector", "simulated", "--executor", "simulated"]


def conformance(*agent: str, timeout: float = 120) -> tuple[int, dict, str]:
    done = subprocess.run([str(BIN / "homenet"), "conformance", "agent", "--json", "--answer-time", "8",
                           "--quiet-time", "1", "--", *agent], capture_output=True, text=True, timeout=timeout)
    return done.returncode, json.loads(done.stdout), done.stderr


def verdicts(report: dict) -> dict[str, dict]:
    return {v["rule"]: v for v in report["rules"]}


def test_our_agent_passes_every_rule() -> None:
    code, report, stderr = conformance(str(BIN / "homenet-agent"), *AGENT_ARGS)
    failed = [f"{v['rule']}: {v['seen']}" for v in report["rules"] if not v["ok"]]
    assert code == 0 and report["ok"] and not failed, f"{failed}\n{stderr[-3000:]}"
    assert sorted(verdicts(report)) == sorted(RULES) and report["passed"] == len(RULES)
    assert "PASS credentials.refused-login: " in stderr and f"{len(RULES)} passed, 0 failed" in stderr


def test_an_agent_that_confirms_ok_for_nothing_fails_the_result_rule() -> None:
    code, report, stderr = conformance(sys.executable, str(AGENTS / "ok_for_nothing.py"), *AGENT_ARGS)
    rules = verdicts(report)
    assert code == 1 and not report["ok"]
    assert rules["register.signed"]["ok"] and rules["credentials.relogin"]["ok"]
    assert not rules["config.result"]["ok"]
    assert "missing ipv4" in rules["config.result"]["seen"]
    assert "FAIL config.result: items do not match the config's agent items: missing ipv4" in stderr


def test_an_agent_that_signs_escaped_json_fails_the_signing_rule() -> None:
    code, report, _ = conformance(sys.executable, str(AGENTS / "escapes.py"), *AGENT_ARGS, "--model", "Télé-Box 4K")
    rules = verdicts(report)
    assert code == 1 and rules["connect.session"]["ok"]
    assert not rules["register.signed"]["ok"]
    assert "it signs \\u escapes instead of raw UTF-8, not the RFC 8785 bytes" in rules["register.signed"]["seen"]
    assert rules["config.result"]["seen"] == "not reached: an earlier rule failed"


def test_a_command_without_the_url_placeholder_is_refused_in_one_line() -> None:
    done = subprocess.run([str(BIN / "homenet"), "conformance", "agent", "--", "my-agent", "--broker", "x"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stderr.strip() == \
        "Error: the agent command has no {url}: the kit fills in the URL of its broker there"


def test_an_agent_that_cannot_be_started_fails_with_the_reason() -> None:
    code, report, _ = conformance("/nonexistent/agent", "{url}", timeout=60)
    rules = verdicts(report)
    assert code == 1 and "cannot start /nonexistent/agent" in rules["connect.session"]["seen"]


def test_an_agent_that_takes_any_key_fails_every_rule_about_the_pinned_key() -> None:
    code, report, _ = conformance(sys.executable, str(AGENTS / "any_key.py"), *AGENT_ARGS)
    rules = verdicts(report)
    assert code == 1 and rules["rpc.ping"]["ok"] and rules["config.stale-version"]["ok"]
    for rule in ("config.other-key", "rpc.other-key", "configurator.new-key"):
        assert not rules[rule]["ok"] and rules[rule]["seen"].startswith("answered "), rules[rule]
