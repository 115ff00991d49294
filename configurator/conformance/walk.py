"""The conformance walk: the agent under test, led through the contract one rule at a time.

Theory of operation. The kit starts its own embedded broker (with broker accounts on, as a
real gateway has them) behind a relay (`relay.py`), a scripted configurator on it
(`gateway.py`), then the agent's command with `{url}` (the relay's URL) and `{data}` (a
directory kept for the run) filled in. The steps below run in order, each checking one or more
rules of docs/protocol.md; each rule ends as `Verdict(rule, ok, seen)`, where `seen` says what
the kit saw. A step whose rule is a precondition of the rest (`gate=True`) stops the walk when
it fails: every rule not reached is reported failed, `not reached`. Waits are short and
bounded (`Timing`); "must not answer" rules watch for `Timing.quiet` seconds.

Why one module of 500 lines: the walk is one ordered script (each step uses the state the
steps before it left: the agent's account, its pinned key, its last version), read top to
bottom against docs/protocol.md; split by rule it would need that state passed around.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from homenet.accounts import Accounts
from homenet.schemas import Topics
from homenet.schemas.messages import (Config, ConfigResult, IgmpItem, Ipv4Item, PortMappingItem, QosClass, QosItem,
                                      Rpc)
from homenet.schemas.results import result_problem
from homenet.schemas.signing import b64, unb64, verify

from .gateway import ScriptedGateway, Seen
from .relay import Relay, Session

EPOCH = 5
RULES: dict[str, str] = {
    "connect.session": "connects with client id = device id, clean_session false, a retained QoS 1 will "
                       "`{\"state\":\"offline\"}` on device/{id}/status",
    "connect.online": "publishes a retained `{\"state\":\"online\"}` on device/{id}/status once connected",
    "register.signed": "register: valid v1 envelope, from = topic id = body.device_id, public_key base64 of 32 "
                       "bytes, signed over the RFC 8785 bytes",
    "register.needs-credentials": "an agent with no broker account registers anonymously with needs_credentials true",
    "credentials.relogin": "given credentials, logs in again under the same client id with username = device id",
    "register.after-login": "registers again once logged in, needs_credentials false",
    "config.result": "answers a config with a retained config.result: re = the config's id, its version, one "
                     "item per agent item (none for gateway items), status following from the items",
    "config.retained-again": "ignores the retained config it already applied when it comes again",
    "config.stale-version": "ignores a config whose version is at or below the applied one",
    "config.older-epoch": "ignores a config from an epoch older than the applied config's",
    "config.other-key": "ignores a config not signed by the pinned configurator key",
    "rpc.ping": "answers rpc ping with rpc.reply, re = the rpc's id, ok true",
    "rpc.state": "answers rpc state with ok true and a result holding applied_version and in_force",
    "rpc.refresh": "answers rpc refresh with ok true and sends its info (signed, retained)",
    "rpc.replayed": "ignores a live message whose seq is not above the last accepted (a replayed rpc)",
    "rpc.other-key": "ignores an rpc not signed by the pinned configurator key",
    "configurator.new-key": "refuses a configurator/state signed by a new key: does not register with it",
    "config.new-version": "applies a newer version and answers it",
    "availability.dropped": "a dropped connection turns the status offline (the will) and the agent comes back "
                            "online by itself",
    "availability.clean-stop": "on SIGTERM publishes `offline` itself, then DISCONNECTs, then exits 0",
    "restart.saved-state": "after a restart: the same key, the saved account (no needs_credentials), "
                           "applied_version kept, the applied config not applied again",
    "credentials.refused-login": "when its login is refused (account gone), registers anonymously again with "
                                 "needs_credentials true",
    "seq.increasing": "one sequence counter for everything it sends, strictly increasing, across restarts",
    "signing.every-message": "every envelope it sends is signed by its key over the RFC 8785 bytes",
}


@dataclass
class Timing:
    answer: float = 10.0
    """How long the agent has for an answer (a register, a result, a reconnect)."""
    quiet: float = 2.0
    """How long the kit watches for an answer that must not come."""


@dataclass
class Verdict:
    rule: str
    ok: bool
    seen: str


@dataclass
class Report:
    verdicts: list[Verdict] = field(default_factory=list)
    agent_log: str = ""

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    def as_json(self) -> str:
        return json.dumps({"ok": self.ok, "passed": sum(v.ok for v in self.verdicts),
                           "failed": sum(not v.ok for v in self.verdicts),
                           "rules": [{**asdict(v), "text": RULES[v.rule]} for v in self.verdicts]}, indent=2)


class Stop(Exception):
    """A precondition of the rest of the walk failed."""


def _escaped_bytes(seen: Seen) -> bytes:
    unsigned = {k: v for k, v in seen.envelope.items() if k != "sig"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def explain_signature(seen: Seen, key: bytes | None) -> str:
    """Why a message's signature fails, with a guess at the usual mistakes."""
    if seen.verdict != "bad_signature" or key is None:
        return seen.verdict
    sig = unb64(str(seen.envelope.get("sig", ""))) or b""
    unsigned = {k: v for k, v in seen.envelope.items() if k != "sig"}
    for guess, data in (("\\u escapes instead of raw UTF-8", _escaped_bytes(seen)),
                        ("JSON with spaces", json.dumps(unsigned, sort_keys=True).encode())):
        if verify(key, sig, data):
            return f"bad_signature: it signs {guess}, not the RFC 8785 bytes"
    return "bad_signature: does not verify over the RFC 8785 bytes with the key it registered"


class Walk:
    def __init__(self, command: Sequence[str], timing: Timing | None = None, log: Callable[[Verdict], None] | None = None) -> None:
        self.command = list(command)
        self.timing = timing or Timing()
        self.report = Report()
        self._log = log
        self._dir = Path(tempfile.mkdtemp(prefix="homenet-conformance-"))
        self.data = self._dir / "agent-data"
        self.data.mkdir()
        self.topics = Topics()
        self.process: subprocess.Popen[bytes] | None = None
        self._agent_log = self._dir / "agent.log"

    # --- the parts ---------------------------------------------------------------------

    def run(self) -> Report:
        from homenet.brokers import Embedded

        accounts_file = self._dir / "broker-accounts.json"
        self.accounts = Accounts(accounts_file)
        broker = Embedded(accounts_file=accounts_file)
        broker.start()
        self.relay = Relay(("127.0.0.1", broker.port))
        self.url = f"mqtt://127.0.0.1:{self.relay.port}"
        try:
            self.gw = ScriptedGateway(broker.port, self.accounts, self.topics, EPOCH)
            try:
                self.gw.announce()
                self._steps()
            except Stop:
                pass
            finally:
                self._stop_agent()
                self.gw.close()
        finally:
            self.relay.close()
            broker.stop()
            self.report.agent_log = self._agent_log.read_text(errors="replace") if self._agent_log.exists() else ""
            self._cleanup()
        done = {v.rule for v in self.report.verdicts}
        for rule in RULES:
            if rule not in done:
                self._verdict(rule, False, "not reached: an earlier rule failed")
        return self.report

    def _cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def _verdict(self, rule: str, ok: bool, seen: str, gate: bool = False) -> bool:
        verdict = Verdict(rule, ok, seen)
        self.report.verdicts.append(verdict)
        if self._log:
            self._log(verdict)
        if gate and not ok:
            raise Stop(rule)
        return ok

    def _start_agent(self) -> None:
        argv = [a.replace("{url}", self.url).replace("{data}", str(self.data)) for a in self.command]
        log = self._agent_log.open("ab")
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its log, as it goes
        except OSError as exc:
            self._verdict("connect.session", False, f"cannot start {shlex.join(argv)}: {exc.strerror or exc}", gate=True)
        finally:
            log.close()

    def _stop_agent(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL; the exit code (None when it had to be killed)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None

    # --- helpers -----------------------------------------------------------------------

    @property
    def device(self) -> str:
        assert self.gw.device_id is not None
        return self.gw.device_id

    def _status(self, state: str, after: float, timeout: float | None = None) -> Seen | None:
        return self.gw.wait(lambda s: s.channel == "status" and _status_of(s) == state,
                            self.timing.answer if timeout is None else timeout, after)

    def _login_after(self, index: int, timeout: float | None = None) -> Session | None:
        """The first CONNECT after the `index`-th one that logs in with the device's account."""
        deadline = time.monotonic() + (self.timing.answer if timeout is None else timeout)
        while time.monotonic() < deadline:
            found = next((s for s in self.relay.mqtt_sessions()[index + 1:]
                          if s.connect and s.connect.username == self.device), None)
            if found:
                return found
            time.sleep(0.05)
        return None

    def _next(self, channel: str, after: float, match: Callable[[Seen], bool] = lambda s: True,
              timeout: float | None = None) -> Seen | None:
        return self.gw.wait(lambda s: s.channel == channel and match(s),
                            self.timing.answer if timeout is None else timeout, after)

    def _session_after(self, count: int, timeout: float | None = None) -> Session | None:
        deadline = time.monotonic() + (self.timing.answer if timeout is None else timeout)
        while time.monotonic() < deadline:
            sessions = self.relay.mqtt_sessions()
            if len(sessions) > count:
                return sessions[count]
            time.sleep(0.05)
        return None

    def _config(self, version: int, epoch: int = EPOCH, key: Any = None, retain: bool = True) -> tuple[str, bytes]:
        interface = next((i.get("name") for i in self._info.get("interfaces", []) if i.get("name")), "eth0")
        items = [Ipv4Item(interface=interface, address="192.168.77.20", prefix_len=24, gateway="192.168.77.1",
                          dns=["192.168.77.1"]),
                 QosItem(qos_class=QosClass.VIDEO, dscp=32), IgmpItem(enabled=True),
                 PortMappingItem(protocol="tcp", external_port=8443, internal_port=443)]
        self._last_config = Config(device_id=self.device, version=version, epoch=epoch, profile="conformance",
                                   items=items)
        return self.gw.send("config", "config", self._last_config, retain=retain, key=key)

    def _quiet(self, rule: str, channel: str, what: str, send: Callable[[], object],
               match: Callable[[Seen], bool] = lambda s: True) -> None:
        """`send`, then no message on `channel` that `match`es for `Timing.quiet` seconds."""
        since = time.monotonic()
        send()
        got = self._next(channel, since, match, timeout=self.timing.quiet)
        self._verdict(rule, got is None, f"no answer in {self.timing.quiet:g} s to {what}" if got is None
                      else f"answered {what}: {got.payload[:200].decode(errors='replace')}")

    def _quiet_result(self, rule: str, what: str, send: Callable[[], object]) -> None:
        """No config.result but the one already given (an agent may re-send that one)."""
        self._quiet(rule, "config/result", what, send, lambda s: s.body != self._result.body)

    def _rpc(self, method: str, **kwargs: Any) -> tuple[str, bytes]:
        return self.gw.send("rpc", "rpc", Rpc(method=method), **kwargs)

    # --- the walk ----------------------------------------------------------------------

    def _steps(self) -> None:
        self._info: dict[str, Any] = {}
        self._first_start()
        self._configs()
        self._rpcs()
        self._new_key()
        self._newer_version()
        self._dropped()
        self._clean_stop()
        self._restart()
        self._refused_login()
        self._whole_run()

    def _first_start(self) -> None:
        start = time.monotonic()
        self._start_agent()
        session = self._session_after(0)
        register = self._next("register", start)
        if session is None or session.connect is None:
            self._verdict("connect.session", False, "no MQTT CONNECT reached the broker", gate=True)
            return
        c = session.connect
        will = (c.will_payload or b"").decode(errors="replace")
        problems = [p for p, bad in (
            (f"client id {c.client_id!r} is not the device id {self.gw.device_id!r}", c.client_id != self.gw.device_id),
            ("clean_session is true", c.clean_session),
            (f"will on {c.will_topic!r}", c.will_topic != self.topics.device(c.client_id, "status")),
            (f"will payload {will!r}", _json(c.will_payload) != {"state": "offline"}),
            ("will not retained", not c.will_retain), (f"will QoS {c.will_qos}", c.will_qos != 1)) if bad]
        self._verdict("connect.session", not problems, "; ".join(problems) or
                      f"client id {c.client_id}, clean_session false, retained QoS 1 will {will} on "
                      f"{c.will_topic}", gate=self.gw.device_id is None)
        online = self._status("online", start)
        kept = self.gw.retained(self.topics.device(self.device, "status")) if online else None
        self._verdict("connect.online", _json(kept) == {"state": "online"},
                      "retained online status" if _json(kept) == {"state": "online"} else
                      f"online status, but the broker retains {kept!r}" if online else "no online status")
        if register is None:
            self._verdict("register.signed", False, f"no register within {self.timing.answer:.0f} s", gate=True)
            return
        self._info = register.body
        self._check_register(register)
        self._verdict("register.needs-credentials", register.body.get("needs_credentials") is True and
                      c.username is None, f"anonymous login: {c.username is None}; needs_credentials: "
                      f"{register.body.get('needs_credentials')}", gate=True)
        relogin = self._login_after(0)
        ok = bool(relogin and relogin.connect and relogin.connect.username == self.device
                  and relogin.connect.client_id == self.device)
        self._verdict("credentials.relogin", ok, (f"logged in again as {relogin.connect.username!r} with client id "
                      f"{relogin.connect.client_id!r}" if relogin and relogin.connect else
                      f"no new login within {self.timing.answer:.0f} s of the credentials"), gate=True)
        again = self._next("register", register.at + 0.001)
        self._verdict("register.after-login", bool(again and again.verdict == "valid"
                      and again.body.get("needs_credentials") is False),
                      "registered again, needs_credentials false" if again and again.verdict == "valid"
                      and again.body.get("needs_credentials") is False else
                      f"got {again.body.get('needs_credentials') if again else 'no register'}", gate=True)

    def _check_register(self, register: Seen) -> None:
        key = unb64(str(register.body.get("public_key", "")))
        problems = []
        if register.envelope.get("from") != self.device or register.body.get("device_id") != self.device:
            problems.append(f"from {register.envelope.get('from')!r} / device_id {register.body.get('device_id')!r} "
                            f"on the topic of {self.device!r}")
        if key is None or len(key) != 32:
            problems.append("public_key is not standard padded base64 of 32 bytes")
        if register.verdict != "valid":
            problems.append(explain_signature(register, key))
        self._verdict("register.signed", not problems, "; ".join(problems) or
                      f"signed by key {b64(key or b'')[:12]}..., seq {register.seq}", gate=True)

    def _configs(self) -> None:
        start = time.monotonic()
        self.gw.config_version = 1
        self._config_id, self._config_payload = self._config(1)
        self._check_result("config.result", self._config_id, start, gate=True)
        config_topic = self.topics.device(self.device, "config")
        self._quiet_result("config.retained-again", "the same retained config again",
                           lambda: self.gw.publish(config_topic, self._config_payload, retain=True))
        self._quiet_result("config.stale-version", "a new config with version 1 again", lambda: self._config(1))
        self._quiet_result("config.older-epoch", f"config version 2 of epoch {EPOCH - 1} (the applied one is of "
                           f"epoch {EPOCH})", lambda: self._config(2, epoch=EPOCH - 1))
        self._quiet_result("config.other-key", "config version 2 signed by another key",
                           lambda: self._config(2, key=self.gw.other))
        # put the true config back as the retained one, for the restart later
        self.gw.publish(config_topic, self._config_payload, retain=True)

    def _check_result(self, rule: str, config_id: str, start: float, gate: bool = False) -> None:
        got = self._next("config/result", start, lambda s: s.body.get("re") == config_id
                         or s.body.get("version") == self._last_config.version)
        if got is None:
            self._verdict(rule, False, f"no config.result within {self.timing.answer:.0f} s", gate=gate)
            return
        problem = None
        try:
            result = ConfigResult.model_validate(got.body)
            problem = result_problem(result, self._last_config, config_id)
        except ValueError as exc:
            problem = f"not a config.result: {str(exc).splitlines()[0]}"
        if got.verdict != "valid":
            problem = explain_signature(got, self.gw.device_key)
        elif problem is None and self.gw.retained(got.topic) != got.payload:
            problem = "not retained"
        self._result = got
        self._verdict(rule, problem is None, problem or f"version {got.body['version']} {got.body['status']}: "
                      + ", ".join(f"{i['item']} {i['status']}" for i in got.body["items"]), gate=gate)

    def _rpcs(self) -> None:
        start = time.monotonic()
        ping_id, ping = self._rpc("ping")
        reply = self._next("rpc/reply", start, lambda s: s.body.get("re") == ping_id)
        self._verdict("rpc.ping", bool(reply and reply.verdict == "valid" and reply.body.get("ok") is True),
                      f"rpc.reply ok={reply.body.get('ok')} ({reply.verdict})" if reply else "no rpc.reply")
        start = time.monotonic()
        state_id, _ = self._rpc("state")
        reply = self._next("rpc/reply", start, lambda s: s.body.get("re") == state_id)
        result = reply.body.get("result", {}) if reply else {}
        self._verdict("rpc.state", bool(reply and reply.body.get("ok") is True and result.get("applied_version") == 1
                                        and isinstance(result.get("in_force"), dict)),
                      f"result applied_version={result.get('applied_version')}, in_force "
                      f"{'present' if isinstance(result.get('in_force'), dict) else 'missing'}" if reply
                      else "no rpc.reply")
        start = time.monotonic()
        refresh_id, _ = self._rpc("refresh")
        reply = self._next("rpc/reply", start, lambda s: s.body.get("re") == refresh_id)
        info = self._next("info", start)
        kept = self.gw.retained(info.topic) if info else None
        problems = [p for p, bad in (("no rpc.reply", reply is None),
                                     ("ok is not true", reply is not None and reply.body.get("ok") is not True),
                                     ("no info", info is None),
                                     (f"info {info.verdict if info else ''}", info is not None and info.verdict != "valid"),
                                     ("info not retained", info is not None and kept != info.payload)) if bad]
        self._verdict("rpc.refresh", not problems, "; ".join(problems) or "ok, and a signed retained info")
        # nothing else is asked meanwhile: any rpc.reply is an answer to what must get none
        self._quiet("rpc.replayed", "rpc/reply", "the ping published once more (same bytes, same seq)",
                    lambda: self.gw.publish(self.topics.device(self.device, "rpc"), ping))
        self._quiet("rpc.other-key", "rpc/reply", "a ping signed by another key",
                    lambda: self._rpc("ping", key=self.gw.other))

    def _new_key(self) -> None:
        self._quiet("configurator.new-key", "register", f"configurator/state of epoch {EPOCH + 1} signed by a new key",
                    lambda: self.gw.announce(epoch=EPOCH + 1, key=self.gw.other))
        self.gw.announce()

    def _newer_version(self) -> None:
        start = time.monotonic()
        self.gw.config_version = 2
        self._config_id, self._config_payload = self._config(2)
        self._check_result("config.new-version", self._config_id, start)

    def _dropped(self) -> None:
        start = time.monotonic()
        sessions = len(self.relay.mqtt_sessions())
        self.relay.cut()
        offline = self._status("offline", start)
        back = self._status("online", offline.at) if offline else None
        self._verdict("availability.dropped", bool(offline and back and len(self.relay.mqtt_sessions()) > sessions),
                      ("offline by its will, then online again" if back else "offline by its will, but it did not "
                       f"come back within {self.timing.answer:.0f} s") if offline else "no offline status (no will?)")
        self._next("register", start)  # it registers with the configurator again

    def _clean_stop(self) -> None:
        start = time.monotonic()
        session = self.relay.mqtt_sessions()[-1]
        code = self._stop_agent(self.timing.answer)
        session.closed.wait(2)
        offline = self._status("offline", start, timeout=2)
        problems = [p for p, bad in (("no offline status", offline is None),
                                     ("closed the connection without a DISCONNECT (the will said offline)",
                                      not session.disconnected_cleanly),
                                     (f"exit code {code}" if code is not None else "did not exit on SIGTERM",
                                      code != 0)) if bad]
        self._verdict("availability.clean-stop", not problems, "; ".join(problems) or
                      "offline published, DISCONNECT sent, exit code 0")

    def _restart(self) -> None:
        start = time.monotonic()
        sessions = len(self.relay.mqtt_sessions())
        before = max((s.seq for s in self.gw.seen if s.envelope), default=-1)
        self._start_agent()
        session = self._session_after(sessions)
        register = self._next("register", start)
        problems = []
        if session is None or session.connect is None or session.connect.username != self.device:
            problems.append("did not log in with its saved account")
        if register is None:
            problems.append("no register")
        else:
            if unb64(str(register.body.get("public_key", ""))) != self.gw.device_key:
                problems.append("a new key")
            if register.body.get("needs_credentials"):
                problems.append("needs_credentials true")
            if register.body.get("applied_version") != 2:
                problems.append(f"applied_version {register.body.get('applied_version')}, not 2")
            if register.seq <= before:
                problems.append(f"seq {register.seq} not above {before}, the last before the restart")
        time.sleep(self.timing.quiet)
        again = [s for s in self.gw.since(start, "config/result") if s.body != self._result.body]
        if again:
            problems.append(f"applied the config again: {again[0].payload[:160].decode(errors='replace')}")
        self._verdict("restart.saved-state", not problems, "; ".join(problems) or
                      "same key, saved account, applied_version 2, config not applied again", gate=True)

    def _refused_login(self) -> None:
        start = time.monotonic()
        self.accounts.remove(self.device)
        self.relay.cut()
        register = self._next("register", start, lambda s: s.body.get("needs_credentials") is True)
        sessions = self.relay.mqtt_sessions()
        anonymous = max((i for i, s in enumerate(sessions) if s.connect and s.connect.username is None), default=0)
        relogin = self._login_after(anonymous) if register else None
        self._verdict("credentials.refused-login", bool(register and relogin and relogin.connect
                                                        and relogin.connect.username == self.device),
                      "registered anonymously with needs_credentials true, then logged in with the new account"
                      if register and relogin else "registered anonymously, but did not log in again" if register
                      else f"no register with needs_credentials true within {self.timing.answer:.0f} s")

    def _whole_run(self) -> None:
        envelopes = [s for s in self.gw.seen if s.envelope and s.topic.startswith(f"{self.topics.root}/device/"
                                                                                  f"{self.device}/")]
        live = [s for s in envelopes if not s.retain]
        backwards = [(a, b) for a, b in zip(live, live[1:]) if b.seq <= a.seq and b.payload != a.payload]
        self._verdict("seq.increasing", not backwards, f"{len(live)} messages, seq {live[0].seq}..{live[-1].seq}"
                      if live and not backwards else
                      f"{backwards[0][1].kind} seq {backwards[0][1].seq} after {backwards[0][0].kind} seq "
                      f"{backwards[0][0].seq}" if backwards else "no messages")
        bad = [s for s in envelopes if s.verdict != "valid"]
        self._verdict("signing.every-message", not bad, f"{len(envelopes)} envelopes, all signed over RFC 8785 bytes"
                      if not bad else f"{bad[0].kind}: {explain_signature(bad[0], self.gw.device_key)}")


def _json(payload: bytes | None) -> Any:
    try:
        return json.loads(payload or b"")
    except ValueError:
        return None


def _status_of(seen: Seen) -> str | None:
    value = _json(seen.payload)
    return value.get("state") if isinstance(value, dict) else None


def check_agent(command: Sequence[str], timing: Timing | None = None,
                log: Callable[[Verdict], None] | None = None) -> Report:
    """Run the walk against the agent `command` (with `{url}`, `{data}`); every rule's verdict."""
    if not command:
        raise ValueError("no agent command given: homenet conformance agent -- CMD ... {url} ...")
    if not any("{url}" in a for a in command):
        raise ValueError("the agent command has no {url}: the kit fills in the URL of its broker there")
    return Walk(command, timing, log).run()
