"""The operator's side of `configurator/command`: one command, one reply, then disconnect.

Operator commands go through the running configurator (never straight to its database file),
because the configurator owns the database and keeps the gateway in line with it.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

from homenet.keys import KeyPair
from homenet.mqtt import BrokerUrl, make_client, session, set_nodelay
from homenet.schemas import ContractError, Topics, decode, encode
from homenet.schemas.messages import Command, CommandReply

OPERATOR_KEY = "operator.key"
"""The gateway's operator key (0600 in the data directory, made with the configurator's
identity): every operator command is signed with it (the CLI on the gateway, the owner's page,
Home Assistant's buttons); the configurator refuses any other."""


def operator_key(data_dir: Path) -> KeyPair | None:
    """The gateway's operator key, from its data directory; None where there is none (not the
    gateway's data directory: a configurator with broker accounts then refuses the command)."""
    path = Path(data_dir) / OPERATOR_KEY
    return KeyPair.load_or_create(path) if path.exists() else None


def send_command(url: str, command: Command, root: str, login: tuple[str, str] | None = None,
                 cafile: Path | None = None, timeout: float = 10.0, key: KeyPair | None = None) -> CommandReply:
    """`key`: the gateway's operator key (`operator_key`); an unsigned command is refused."""
    broker = BrokerUrl.parse(url)
    topics = Topics(root)
    sender = f"operator-{uuid.uuid4().hex[:8]}"
    # operators keep no counter on disk: a microsecond clock keeps their seq rising
    msg_id, payload = encode("command", command, sender=sender, seq=time.time_ns() // 1000,
                             sign=key.sign if key else None)
    replies: list[CommandReply] = []
    done = threading.Event()
    client = make_client(sender, clean_session=True, username=login[0] if login else None,
                         password=login[1] if login else None, cafile=cafile if broker.tls else None)

    def on_connect(c: Any, *_: Any) -> None:
        set_nodelay(c)
        c.subscribe(topics.command_reply, qos=1)

    def on_subscribe(c: Any, *_: Any) -> None:
        c.publish(topics.command, payload, qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            _, reply = decode(msg.payload, expected_kind="command.reply")
        except ContractError:
            return
        if reply.re == msg_id:
            replies.append(reply)
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    with session(client, broker):
        if not done.wait(timeout):
            raise TimeoutError(f"no answer from a configurator via {broker} within {timeout:g} s "
                               "(is `homenet gateway run` running there?)")
        return replies[0]
