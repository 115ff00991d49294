"""`homenet watch`: the tree as an operator wants to read it (the readable counterpart of
`mosquitto_sub -v -t 'homenet/#' | jq`).

One line per message: time, the topic under the root (the tree), the kind, the sender and
the body, without the envelope's bookkeeping (id, seq, time, v), the signature and empty
fields, with keys cut to a fingerprint-length prefix. Colour on a terminal (by kind and outcome: a failed
result or an error event in red). `--raw`: one JSON object per line, the payload parsed, for
`jq` and scripts. `format_line` and `raw_line` are pure; `watch` is the MQTT adapter.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from homenet.mqtt import BrokerUrl, make_client, session, set_nodelay

NOISE = ("v", "id", "seq", "time", "sig")
KEYS = ("public_key", "key")
COLOURS = {"register": "cyan", "register.reply": "cyan", "config": "blue", "configurator.state": "magenta",
           "gateway.state": "magenta", "rpc": "white", "rpc.reply": "white", "command": "yellow",
           "command.reply": "yellow", "info": "white"}


def _parse(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode(errors="replace")


def _short(value: Any) -> Any:
    """Keys are 44-char base64: the first 12 say which one it is. Empty fields say nothing."""
    if isinstance(value, dict):
        return {k: (v[:12] + "…" if k in KEYS and isinstance(v, str) and len(v) > 16 else _short(v))
                for k, v in value.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


def _outcome(kind: str, body: Any) -> str | None:
    """A colour for how it went, where the message says."""
    if not isinstance(body, dict):
        return None
    if kind == "event":
        return {"error": "red", "warning": "yellow"}.get(body.get("severity", ""), "green")
    if kind == "config.result":
        return "green" if body.get("status") == "ok" else "red"
    if kind in ("register.reply", "command.reply"):
        return "red" if body.get("status") == "rejected" or body.get("ok") is False else None
    if "state" in body and body["state"] in ("online", "offline"):
        return "green" if body["state"] == "online" else "bright_black"
    return None


def format_line(topic: str, payload: bytes, retained: bool, root: str, colour: bool, at: float | None = None) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(at))
    path = topic[len(root) + 1:] if topic.startswith(root + "/") else topic
    message = _parse(payload)
    if message is None:
        kind, sender, body = "cleared", "", "(retained message removed)"
    elif isinstance(message, dict) and "kind" in message and "body" in message:
        kind, sender = str(message["kind"]), str(message.get("from", ""))
        body = json.dumps(_short(message["body"]), separators=(",", ":"), ensure_ascii=False)
    else:  # status is a bare {"state": ...}; anything else as it came
        kind, sender = "status" if path.endswith("/status") else "-", ""
        body = json.dumps(_short(message), separators=(",", ":"), ensure_ascii=False)
    fields = [stamp, path.ljust(34), kind.ljust(18), sender.ljust(16), body]
    if retained:
        fields[1] = (path + " (r)").ljust(34)
    line = " ".join(fields)
    if not colour:
        return line
    hue = _outcome(kind, message.get("body") if isinstance(message, dict) and "body" in message else message)
    return " ".join([click.style(stamp, fg="bright_black"), click.style(fields[1], bold=True),
                     click.style(fields[2], fg=COLOURS.get(kind, "white")), click.style(fields[3], fg="bright_black"),
                     click.style(body, fg=hue) if hue else body])


def raw_line(topic: str, payload: bytes, retained: bool) -> str:
    return json.dumps({"topic": topic, "retained": retained, "payload": _parse(payload)}, separators=(",", ":"),
                      ensure_ascii=False)


def watch(url: str, topic_filter: str, login: tuple[str, str] | None, cafile: Path | None,
          show: Callable[[str, bytes, bool], bool], count: int = 0, stop: threading.Event | None = None) -> None:
    """Hand every message on `topic_filter` to `show` (True: it was shown) until `count` were
    shown (0: forever) or `stop`."""
    broker = BrokerUrl.parse(url)
    done, refused = stop or threading.Event(), []
    seen = 0
    client = make_client(f"watch-{time.time_ns() % 10**9}", clean_session=True,
                         username=login[0] if login else None, password=login[1] if login else None,
                         cafile=cafile if broker.tls else None)

    def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
            done.set()
            return
        set_nodelay(c)
        c.subscribe(topic_filter, qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        nonlocal seen
        if done.is_set():
            return
        if not show(msg.topic, bytes(msg.payload), bool(msg.retain)):
            return
        seen += 1
        if count and seen >= count:
            done.set()

    client.on_connect, client.on_message = on_connect, on_message
    with session(client, broker):
        done.wait()
    if refused:
        raise ConnectionError(f"the broker at {broker} refused the login: {refused[0]}")
