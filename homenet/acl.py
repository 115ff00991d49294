"""Who may publish and read what on the broker (pure: the amqtt plugin and the Mosquitto
dynamic-security provisioning both render these rules).

- configurator: everything under the topic root.
- device D (enrolled, username D): publish its own register, config/result, info, status,
  rpc/reply; read configurator/state and its own config, register/reply and rpc.
- unknown (no username; the client id is its device id): publish only its own register and
  status (its will: presence is not configuration); read configurator/state and its own
  register/reply.
- reader (read-only operator): read everything under the root but the secrets (devices'
  register/reply, which carries their broker password, and the command replies, which carry
  new operator passwords), publish nothing.
- operator: read everything but devices' register/reply, and publish configurator commands.
  Home Assistant logs in with an operator account: it also reads and writes its discovery
  tree (its birth message) and presses the buttons the configurator announced there.
- configurator: also Home Assistant's discovery tree (configurator/extensions/homeassistant.py).

The rules are one table, `RULES`: the `may_*` functions below read it, and so does
`homenet.configurator.dynsec`, which turns it into Mosquitto roles. Entries are topics
relative to the root; `TREE` is the whole tree (the root and everything under it) and
`{id}` stands for the client's own device id; `+` and a final `#` are MQTT's wildcards. An
entry starting with `/` is an absolute topic, outside the root: `HOME_ASSISTANT`, Home
Assistant's discovery tree under the prefix `Topics.discovery` (`{discovery}`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from homenet.schemas.topics import Topics, TopicError, check_device_id


class Role(StrEnum):
    CONFIGURATOR = "configurator"
    DEVICE = "device"
    UNKNOWN = "unknown"
    READER = "reader"
    OPERATOR = "operator"


DEVICE_PUBLISH = ("register", "config/result", "info", "status", "rpc/reply")
DEVICE_READ = ("config", "register/reply", "rpc")

TREE = "#"
OWN = "{id}"
OUTSIDE = "/"
HOME_ASSISTANT = "/{discovery}/#"
DISCOVERY = "{discovery}"
HA_PRESS = "ha/+/press"


def own(*channels: str) -> tuple[str, ...]:
    """Entries for channels of the client's own device topics."""
    return tuple(f"device/{OWN}/{c}" for c in channels)


@dataclass(frozen=True)
class Rules:
    publish: tuple[str, ...]
    receive: tuple[str, ...]
    any_filter: bool = False
    """May subscribe with any filter (`homenet/#`, `#`): what it receives is still checked
    topic by topic against `receive`. Otherwise only the exact topics in `receive`."""
    withheld: tuple[str, ...] = ()
    """Filters (`+` for one level) never delivered, whatever `receive` says: secrets."""


SECRETS = ("device/+/register/reply", "configurator/command/reply")


RULES: dict[Role, Rules] = {
    Role.CONFIGURATOR: Rules(publish=(TREE, HOME_ASSISTANT), receive=(TREE, HOME_ASSISTANT), any_filter=True),
    Role.DEVICE: Rules(publish=own(*DEVICE_PUBLISH), receive=("configurator/state", *own(*DEVICE_READ))),
    Role.UNKNOWN: Rules(publish=own("register", "status"), receive=("configurator/state", *own("register/reply"))),
    Role.READER: Rules(publish=(), receive=(TREE,), any_filter=True, withheld=SECRETS),
    Role.OPERATOR: Rules(publish=("configurator/command", HA_PRESS, HOME_ASSISTANT),
                         receive=(TREE, HOME_ASSISTANT), any_filter=True,
                         withheld=SECRETS[:1]),
}


def render(entry: str, topics: Topics, name: str) -> str:
    """An entry as an MQTT topic filter: `TREE` is `{root}/#`, `{id}` becomes `name` (a device
    id, or a broker's substitution pattern such as Mosquitto's `%c`)."""
    if entry.startswith(OUTSIDE):
        return entry[len(OUTSIDE):].replace(DISCOVERY, topics.discovery)
    return f"{topics.root}/#" if entry == TREE else f"{topics.root}/{entry.replace(OWN, name)}"


def _under(topics: Topics, topic: str) -> bool:
    return topic == topics.root or topic.startswith(topics.root + "/")


def _allowed(entries: tuple[str, ...], topics: Topics, name: str, topic: str) -> bool:
    for entry in entries:
        if entry == TREE:
            if _under(topics, topic):
                return True
            continue
        if OWN in entry:
            try:
                check_device_id(name)
            except TopicError:
                continue
        if _matches(render(entry, topics, name), topic):
            return True
    return False


def may_publish(role: Role, name: str, topics: Topics, topic: str) -> bool:
    return _allowed(RULES[role].publish, topics, name, topic)


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: `+` one level, a final `#` the rest (and the level above it)."""
    want, have = topic_filter.split("/"), topic.split("/")
    if want[-1] == "#":
        want = want[:-1]
        return len(have) >= len(want) and all(w in ("+", h) for w, h in zip(want, have))
    return len(want) == len(have) and all(w in ("+", h) for w, h in zip(want, have))


def may_receive(role: Role, name: str, topics: Topics, topic: str) -> bool:
    """Whether a message on `topic` is delivered to this client."""
    rules = RULES[role]
    if any(_matches(render(entry, topics, name), topic) for entry in rules.withheld):
        return False
    return _allowed(rules.receive, topics, name, topic)


def may_subscribe(role: Role, name: str, topics: Topics, topic_filter: str) -> bool:
    """Privileged roles may use any filter (`homenet/#`, `#`): what they receive is still
    checked topic by topic. Devices may only subscribe to the exact topics they may receive."""
    return RULES[role].any_filter or may_receive(role, name, topics, topic_filter)
